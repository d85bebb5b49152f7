"""The BiT model family: architecture, presets, parity, interop with stock transformers, caching, bad input."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers
from conftest import REPO_ROOT, randomize_, run_clean_python
from PIL import Image
from reference_bit import reference_forward

import modeling_bit
from modeling_bit import BitBackbone, BitConfig, BitForImageClassification, BitModel, bit_image_processor
from modeling_bit.modeling_bit import WeightStandardizedConv2d

# docs/recipe.md "Architecture": backbone parameter counts (no head).
PUBLISHED_BACKBONE_PARAMETERS = {
    "R50x1": 23_500_352,
    "R50x3": 211_174_080,
    "R101x1": 42_492_480,
    "R101x3": 381_789_888,
    "R152x2": 232_238_208,
    "R152x4": 928_340_224,
}


def tiny(**overrides) -> BitForImageClassification:
    return randomize_(BitForImageClassification(BitConfig.from_preset("bit-tiny", **overrides))).eval()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# --- presets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("upstream", ["S", "M"])
@pytest.mark.parametrize("arch", list(PUBLISHED_BACKBONE_PARAMETERS))
def test_published_presets_match_the_paper_without_allocating(upstream, arch):
    config = BitConfig.from_preset(f"BiT-{upstream}-{arch}")
    with torch.device("meta"):
        model = BitForImageClassification(config)
        output = model(torch.empty(2, 3, 224, 224), output_hidden_states=True)
    assert sum(p.numel() for p in model.bit.parameters()) == PUBLISHED_BACKBONE_PARAMETERS[arch]
    expected_labels = 1000 if upstream == "S" else 21843
    assert config.num_labels == expected_labels
    assert output.logits.shape == (2, expected_labels)
    width = int(arch.split("x")[1])
    assert [tuple(h.shape[1:]) for h in output.hidden_states] == [
        (64 * width, 56, 56),
        (256 * width, 56, 56),
        (512 * width, 28, 28),
        (1024 * width, 14, 14),
        (2048 * width, 7, 7),
    ]


def test_preset_names_are_case_insensitive_and_overridable():
    assert BitConfig.from_preset("bit-m-r101x3").to_dict() == BitConfig.from_preset("BiT-M-R101x3").to_dict()
    base = BitConfig.from_preset("bit-tiny")
    wide = BitConfig.from_preset("bit-tiny", width_factor=3, num_labels=7)
    assert wide.embedding_size == 3 * base.embedding_size
    assert wide.hidden_sizes == [3 * size for size in base.hidden_sizes]
    assert wide.num_labels == 7
    assert BitConfig.from_preset("BiT-M-R50x1-ILSVRC2012").num_labels == 1000


def test_small_presets_are_small():
    for name, limit in (("bit-tiny", 1_000_000), ("bit-small", 5_000_000)):
        model = BitForImageClassification(BitConfig.from_preset(name))
        assert sum(p.numel() for p in model.parameters()) < limit
        assert model(torch.randn(4, 3, 96, 96)).logits.shape == (4, 10)


def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(ValueError, match="BiT-M-R101x3") as error:
        BitConfig.from_preset("BiT-X-R9000")
    assert "bit-tiny" in str(error.value)
    with pytest.raises(ValueError, match="Unknown BiT preset None"):
        BitConfig.from_preset(None)


# --- numerics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(96, 96), (97, 101)])  # odd sizes exercise the stem's border padding
def test_logits_equal_an_independent_reference(size):
    model = tiny(width_factor=2).double()
    pixel_values = torch.randn(3, 3, *size, dtype=torch.float64)
    expected = reference_forward(model.state_dict(), pixel_values, model.config.depths, model.config.num_groups)
    with torch.no_grad():
        assert relative_error(model(pixel_values).logits, expected) < 1e-10
    model.train()  # the training path recomputes standardization in the graph
    assert relative_error(model(pixel_values).logits.detach(), expected) < 1e-10


def test_float32_inference_matches_reference_on_a_deeper_net():
    model = randomize_(BitForImageClassification(BitConfig.from_preset("bit-small"))).eval()
    pixel_values = torch.randn(2, 3, 128, 128)
    expected = reference_forward(
        {k: v.double() for k, v in model.state_dict().items()},
        pixel_values.double(),
        model.config.depths,
        model.config.num_groups,
    )
    with torch.inference_mode():
        assert relative_error(model(pixel_values).logits.double(), expected) < 1e-4


def test_gradients_equal_the_straightforward_formulation():
    model = tiny().double().train()
    pixel_values = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    labels = torch.tensor([0, 3, 5, 9])
    model(pixel_values, labels=labels).loss.backward()
    ours = {name: p.grad for name, p in model.named_parameters()}

    state = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    logits = reference_forward(state, pixel_values, model.config.depths, model.config.num_groups)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    for name, parameter in state.items():
        assert relative_error(ours[name], parameter.grad) < 1e-9, name


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny().double().train()
    pixel_values = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    labels = torch.tensor([1, 2])
    model(pixel_values, labels=labels).loss.backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    model(pixel_values, labels=labels).loss.backward()
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter.grad, plain[name], rtol=1e-10, atol=1e-12), name


# --- standardized-weight cache ---------------------------------------------------------------------


def fresh_logits(model, pixel_values):
    """Logits of an uncached copy with the same weights: what the model must compute."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        return clone(pixel_values).logits


def test_cache_is_reused_while_weights_are_unchanged():
    model = tiny()
    conv = model.bit.encoder.stages[0].layers[0].conv2
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        first = conv.standardized_weight()
        assert conv.standardized_weight() is first
    model.train()
    model(torch.randn(1, 3, 64, 64)).logits.sum().backward()
    assert conv.standardized._kernel is None  # training drops it


def test_cache_invalidated_by_optimizer_step():
    model = tiny()
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(pixel_values).logits
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    # Gradients set by hand: a forward with gradients (or a train()/eval() switch) would drop the cache
    # itself, and this must show that the step alone is seen.
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()
    with torch.no_grad():
        after = model(pixel_values).logits
    assert not torch.allclose(after, before)
    assert torch.allclose(after, fresh_logits(model, pixel_values), atol=1e-5)


def test_exported_graph_equals_eager_inference():
    model = tiny()
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        eager = model(pixel_values).logits
        exported = torch.export.export(model, (pixel_values,)).module()(pixel_values).logits
    assert relative_error(exported, eager) <= 1e-5


def test_cache_invalidated_by_load_state_dict_in_place_edit_and_dtype_move():
    model = tiny()
    other = tiny(num_labels=10)
    randomize_(other, seed=7)
    with torch.no_grad():
        other.bit.encoder.stages[1].layers[0].conv2.weight.mul_(-1.0).add_(0.1)
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        model(pixel_values)  # populate the caches
    model.load_state_dict(other.state_dict())
    expected = fresh_logits(other, pixel_values)
    with torch.inference_mode():
        assert torch.allclose(model(pixel_values).logits, expected, atol=1e-5)

    with torch.no_grad():
        model.bit.embedder.convolution.weight.mul_(0.5).add_(torch.randn_like(model.bit.embedder.convolution.weight))
    with torch.inference_mode():
        edited = model(pixel_values).logits
    assert torch.allclose(edited, fresh_logits(model, pixel_values), atol=1e-5)

    model.double()
    with torch.no_grad():
        assert torch.allclose(model(pixel_values.double()).logits.float(), edited, atol=1e-4)


def test_mode_switch_refreshes_edits_the_version_counter_cannot_see():
    model = tiny()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        before = model(pixel_values).logits
    model.bit.encoder.stages[0].layers[0].conv1.weight.data.mul_(-1.0)  # no version bump
    model.eval()
    with torch.inference_mode():
        after = model(pixel_values).logits
    assert not torch.allclose(after, before)
    assert torch.allclose(after, fresh_logits(model, pixel_values), atol=1e-5)


def test_copies_do_not_carry_the_cache_and_inference_mode_copies_work():
    model = tiny()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected = model(pixel_values).logits
        clone = copy.deepcopy(model)  # parameters become inference tensors: no version counter to cache on
        assert relative_error(clone(pixel_values).logits, expected) < 1e-5
    assert all(m.standardized._kernel is None for m in clone.modules() if isinstance(m, WeightStandardizedConv2d))


# --- heads, losses, outputs ----------------------------------------------------------------------


def test_loss_follows_problem_type():
    pixel_values = torch.randn(3, 3, 64, 64)
    single = tiny(num_labels=4)
    labels = torch.tensor([0, 3, 1])
    output = single(pixel_values, labels=labels)
    assert torch.allclose(output.loss, torch.nn.functional.cross_entropy(output.logits, labels))

    multi = tiny(num_labels=4, problem_type="multi_label_classification")
    targets = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]])
    output = multi(pixel_values, labels=targets)
    assert torch.allclose(output.loss, torch.nn.functional.binary_cross_entropy_with_logits(output.logits, targets))

    regression = tiny(num_labels=1)
    values = torch.tensor([0.5, -1.0, 2.0])
    output = regression(pixel_values, labels=values)
    assert torch.allclose(output.loss, torch.nn.functional.mse_loss(output.logits.squeeze(), values))


def test_outputs_follow_transformers_conventions():
    model = tiny()
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        output = model(pixel_values, output_hidden_states=True)
        as_tuple = model(pixel_values, output_hidden_states=True, return_dict=False)
        base = model.bit(pixel_values)
    assert torch.equal(as_tuple[0], output.logits)
    assert len(output.hidden_states) == 5
    assert base.pooler_output.shape == (2, 256, 1, 1)
    assert base.last_hidden_state.shape == (2, 256, 2, 2)


def test_backbone_returns_multiscale_features():
    config = BitConfig.from_preset("bit-tiny", out_features=["stem", "stage2", "stage4"])
    backbone = BitBackbone(config).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 128, 128)).feature_maps
    assert [tuple(f.shape[1:]) for f in features] == [(16, 32, 32), (64, 16, 16), (256, 4, 4)]
    assert backbone.channels == [16, 64, 256]


# --- interop with stock transformers -------------------------------------------------------------


@pytest.mark.parametrize("width", [1, 2])
def test_our_folder_loads_in_stock_transformers(tmp_path, width, ant_image_path):
    model = tiny(width_factor=width, num_labels=5, id2label={i: f"class_{i}" for i in range(5)})
    model.save_pretrained(tmp_path)
    bit_image_processor(96).save_pretrained(tmp_path)
    pixel_values = torch.randn(2, 3, 96, 96)
    torch.save(pixel_values, tmp_path / "input.pt")
    processed = bit_image_processor(96)(Image.open(ant_image_path), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        ours = model(pixel_values).logits
        ours_image = model(processed).logits.softmax(-1)[0]

    result = run_clean_python(
        f"""
        import torch, transformers
        from transformers import AutoModelForImageClassification, BitForImageClassification, pipeline
        folder = {str(tmp_path)!r}
        x = torch.load(folder + "/input.pt", weights_only=True)
        direct = BitForImageClassification.from_pretrained(folder).eval()
        auto = AutoModelForImageClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            logits = [direct(x).logits.tolist(), auto(x).logits.tolist()]
        classify = pipeline("image-classification", model=folder)
        top = classify({str(ant_image_path)!r}, top_k=5)
        direct.save_pretrained(folder + "/resaved_by_stock")
        result = {{"logits": logits, "auto_class": type(auto).__module__, "top": top}}
        """
    )
    resaved = BitForImageClassification.from_pretrained(tmp_path / "resaved_by_stock").eval()
    with torch.no_grad():
        assert relative_error(resaved(pixel_values).logits, ours) <= 1e-4
    assert result["auto_class"].startswith("transformers.models.bit")
    for logits in result["logits"]:
        assert relative_error(torch.tensor(logits), ours) <= 1e-4
    expected = sorted(((p.item(), f"class_{i}") for i, p in enumerate(ours_image)), reverse=True)
    assert [entry["label"] for entry in result["top"]] == [label for _, label in expected]
    assert [entry["score"] for entry in result["top"]] == pytest.approx([p for p, _ in expected], abs=1e-4)


# Configs stock transformers builds, as stock saves them. Ours build those that are BiT networks, at any width stock
# rounds (to multiples of 8) and group count it accepts; the others (not pre-activation, dilated, unpadded, or a
# last stage narrower than its head) are stock transformers' to build.
STOCK_CONFIGS = {
    # transformers' own BiT test configuration (`embeddings_size` is a typo there: the stem keeps 64 channels).
    "transformers-tests": {
        "embeddings_size": 10,
        "hidden_sizes": [8, 16, 32, 64],
        "depths": [1, 1, 2, 1],
        "num_groups": 1,
    },
    "bit-widths": {"embedding_size": 16, "hidden_sizes": [32, 64, 128, 256], "depths": [1, 2, 1, 1], "num_groups": 8},
    "same-padding": {
        "embedding_size": 16,
        "hidden_sizes": [32, 64, 128, 256],
        "depths": [1, 2, 1, 1],
        "num_groups": 8,
        "global_padding": "SAME",
        "embedding_dynamic_padding": True,
    },
    "rounded-widths-gelu": {
        "embedding_size": 12,
        "hidden_sizes": [12, 20, 44, 48],
        "depths": [1, 1, 1, 1],
        "num_groups": 4,
        "hidden_act": "gelu",
    },
    "same-without-stem-padding": {
        "embedding_size": 16,
        "hidden_sizes": [30, 64, 128, 256],
        "depths": [1, 1, 1, 1],
        "num_groups": 2,
        "global_padding": "same",
    },
    "dynamic-after-zero-padding": {
        "embedding_size": 8,
        "hidden_sizes": [8, 16, 32, 64],
        "depths": [1, 1, 1, 1],
        "num_groups": 1,
        "embedding_dynamic_padding": True,
    },
}
STOCK_ONLY_CONFIGS = {
    "hybrid": {
        "layer_type": "bottleneck",
        "global_padding": "SAME",
        "hidden_sizes": [8, 16, 32],
        "depths": [1, 1, 1],
        "num_groups": 1,
    },
    "dilated": {"output_stride": 16, "hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "num_groups": 1},
    "valid-padding": {
        "global_padding": "valid",
        "hidden_sizes": [8, 16, 32, 64],
        "depths": [1, 1, 1, 1],
        "num_groups": 1,
    },
    "last-stage-rounded": {"hidden_sizes": [8, 16, 32, 60], "depths": [1, 1, 1, 1], "num_groups": 1},
}


def test_every_config_stock_builds_still_loads_after_import_with_stock_logits(tmp_path):
    pixel_values = torch.randn(2, 3, 65, 80)
    torch.save(pixel_values, tmp_path / "input.pt")
    # The stock folders, their logits and backbone feature maps, from a process that never imported ours.
    stock = run_clean_python(
        f"""
        import torch, transformers
        root = {str(tmp_path)!r}
        x = torch.load(root + "/input.pt", weights_only=True)
        result = {{}}
        for name, fields in { ({**STOCK_CONFIGS, **STOCK_ONLY_CONFIGS})!r}.items():
            torch.manual_seed(0)
            model = transformers.BitForImageClassification(transformers.BitConfig(num_labels=3, **fields)).eval()
            with torch.no_grad():
                for parameter_name, parameter in model.named_parameters():
                    if "norm" in parameter_name or "classifier" in parameter_name:
                        parameter.add_(0.2 * torch.randn_like(parameter))
            model.save_pretrained(f"{{root}}/{{name}}")
            try:
                with torch.no_grad():
                    logits = model(x).logits.tolist()
            except RuntimeError:  # stock builds and saves it, but cannot run it
                logits = None
            features = None
            if name in {list(STOCK_CONFIGS)!r}:
                backbone = transformers.BitBackbone.from_pretrained(
                    f"{{root}}/{{name}}", out_features=["stem", "stage2", "stage4"]
                )
                with torch.no_grad():
                    features = [f.tolist() for f in backbone.eval()(x).feature_maps]
            result[name] = {{"logits": logits, "features": features, "names": sorted(model.state_dict())}}
        """
    )
    for name in STOCK_CONFIGS:
        folder = tmp_path / name
        assert type(transformers.AutoConfig.from_pretrained(folder)) is BitConfig, name
        auto = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
        direct = BitForImageClassification.from_pretrained(folder).eval()
        backbone = BitBackbone.from_pretrained(folder, out_features=["stem", "stage2", "stage4"]).eval()
        assert type(auto) is BitForImageClassification and sorted(direct.state_dict()) == stock[name]["names"], name
        with torch.no_grad():
            for model in (auto, direct):
                assert relative_error(model(pixel_values).logits, torch.tensor(stock[name]["logits"])) <= 1e-4, name
            features = backbone(pixel_values).feature_maps
        assert len(features) == 3
        for actual, expected in zip(features, stock[name]["features"], strict=True):
            assert relative_error(actual, torch.tensor(expected)) <= 1e-4, name
    for name in STOCK_ONLY_CONFIGS:
        auto = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / name).eval()
        assert type(auto) is transformers.BitForImageClassification, name
        if stock[name]["logits"] is not None:
            with torch.no_grad():
                assert relative_error(auto(pixel_values).logits, torch.tensor(stock[name]["logits"])) <= 1e-6, name


def test_auto_classes_return_ours_after_import(tmp_path):
    tiny().save_pretrained(tmp_path)
    assert type(transformers.AutoModel.from_pretrained(str(tmp_path))) is BitModel
    assert (
        type(transformers.AutoModelForImageClassification.from_pretrained(str(tmp_path))) is BitForImageClassification
    )
    assert type(transformers.AutoConfig.from_pretrained(str(tmp_path))) is BitConfig
    # (AutoBackbone.from_pretrained asks the Hub whether the name exists, even for a local folder.)
    assert type(transformers.AutoBackbone.from_config(BitConfig.from_preset("bit-tiny"))) is BitBackbone


def test_parameter_names_are_stock_names():
    config = BitConfig.from_preset("bit-tiny")
    stock = transformers.BitForImageClassification(transformers.BitConfig(**config.to_dict()))
    assert list(BitForImageClassification(config).state_dict()) == list(stock.state_dict())


def test_saved_preprocessor_is_bit_preprocessing(tmp_path, ant_image_path):
    bit_image_processor(160).save_pretrained(tmp_path)
    loaded = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    image = Image.open(ant_image_path)
    pixel_values = loaded(image, return_tensors="pt")["pixel_values"]
    resized = np.asarray(image.convert("RGB").resize((160, 160), Image.BILINEAR), dtype=np.float32)
    expected = (torch.from_numpy(resized) / 255.0 - 0.5) / 0.5
    assert pixel_values.shape == (1, 3, 160, 160)
    assert torch.allclose(pixel_values[0].permute(1, 2, 0), expected, atol=1e-5)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["do_center_crop"] is False and saved["crop_size"] == saved["size"] == {"height": 160, "width": 160}


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pixel_values, message",
    [
        (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), "dtype torch.uint8"),
        (torch.randn(1, 1, 64, 64), "got 1 channels"),
        (torch.randn(1, 3, 16, 64), "got 16x64"),
        (torch.randn(3, 64, 64), "got shape"),
        ([[0.0]], "got list"),
    ],
)
def test_bad_pixel_values_are_refused_clearly(pixel_values, message):
    with pytest.raises(ValueError, match=message):
        tiny()(pixel_values)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_groups": 5}, "num_groups=5 must divide"),
        ({"hidden_sizes": [30, 64, 128, 256], "num_groups": 32}, r"does not divide \[8, 16\]"),  # 30 -> 32, mid 8
        ({"hidden_act": "relu7"}, "hidden_act='relu7'"),
        ({"depths": [1, 1, 1, 1.5]}, "list of positive integers"),
        ({"depths": []}, "list of positive integers"),
        ({"layer_type": "resnet"}, "expected 'preactivation'"),
        ({"embedding_size": 0}, "embedding_size=0: expected a positive integer"),
        ({"embedding_size": -16}, "embedding_size=-16"),
        ({"width_factor": 1.5}, "width_factor=1.5"),
        ({"num_labels": -1}, "num_labels=-1"),
        ({"widht_factor": 3}, r"Unknown BitConfig field\(s\) \['widht_factor'\]"),
    ],
)
def test_configs_that_cannot_build_a_network_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        BitConfig.from_preset("bit-tiny", **overrides)


def test_variants_only_stock_builds_are_refused_by_our_classes_with_the_reason():
    for overrides, message in (
        ({"depths": [1, 1, 1]}, "the last stage is 128 channels wide"),  # three stages of bit-tiny's four widths
        ({"output_stride": 16}, "stage4 would be dilated"),
        ({"global_padding": "valid"}, "global_padding='VALID'"),
    ):
        with pytest.raises(ValueError, match=f"{message}.*stock transformers' classes"):
            BitForImageClassification(BitConfig.from_preset("bit-tiny", **overrides))


def test_hybrid_backbone_configs_are_left_to_stock_transformers():
    """After `import modeling_bit`, stock models with a non-BiT `bit` backbone (DPT-hybrid) work unchanged."""
    config = BitConfig.from_preset("bit-tiny", layer_type="bottleneck", global_padding="same")
    with pytest.raises(ValueError, match="layer_type='bottleneck'.*stock"):
        BitModel(config)
    assert type(transformers.AutoBackbone.from_config(config)) is transformers.BitBackbone
    dpt = """
        import torch, transformers
        config = transformers.DPTConfig(
            is_hybrid=True, hidden_size=64, num_hidden_layers=12, num_attention_heads=2, intermediate_size=64,
            image_size=64, neck_hidden_sizes=[256, 512, 64, 64], backbone_featmap_shape=[1, 1024, 4, 4],
        )
        torch.manual_seed(0)
        model = transformers.DPTForDepthEstimation(config).eval()
        with torch.no_grad():
            depth = model(torch.linspace(-1, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)).predicted_depth
        result = {"depth": depth.tolist()}
        """
    namespace = {}
    exec(textwrap.dedent(dpt), namespace)  # in this process, which imported modeling_bit
    stock = run_clean_python(dpt)
    assert namespace["result"]["depth"] == stock["depth"]


def test_modeling_bit_stands_alone_every_module_imports_without_the_packages_above_it():
    code = """
import importlib, json, pkgutil, sys
import modeling_bit
for module in pkgutil.walk_packages(modeling_bit.__path__, "modeling_bit."):
    if module.name != "modeling_bit.__main__":  # the demo runs when imported
        importlib.import_module(module.name)
above = sorted({name.split(".")[0] for name in sys.modules} & {"model_cards", "finetune", "pretraining"})
print(json.dumps({"imported": sorted(m for m in sys.modules if m.startswith("modeling_bit")), "above": above}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert {"modeling_bit.convert", "modeling_bit.by_name", "modeling_bit.checkpoint_reading"} <= set(
        result["imported"]
    )
    assert result["above"] == []


def test_package_registers_with_auto_config():
    assert transformers.AutoConfig.for_model("bit").__class__ is modeling_bit.BitConfig


def test_atomic_directory_replaces_only_on_success(tmp_path):
    from modeling_bit.file_utils import atomic_directory, atomic_write_text

    target = tmp_path / "folder"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "a.txt").write_text("second")
        raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]
    # The final rename itself fails (its staging folder is gone): the old folder is back under its name.
    with pytest.raises(FileNotFoundError), atomic_directory(target) as staging:
        staging.rmdir()
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    written = atomic_write_text(tmp_path / "b.txt", "x")
    assert written.stat().st_mode & 0o777 == 0o666 & ~umask


def test_demo_runs_on_a_real_image_and_refuses_bad_input_without_a_traceback(ant_image_path, tmp_path):
    demo = [sys.executable, "-m", "modeling_bit", "--resolution", "64"]
    done = subprocess.run([*demo, "--image", str(ant_image_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "logits (1, 10)" in done.stdout
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not an image")
    for arguments, message in [
        (["--preset", "bit-huge"], "Unknown BiT preset 'bit-huge'"),
        (["--image", str(not_an_image)], "not a readable image"),
        (["--resolution", "16"], "expected at least 32"),
    ]:
        done = subprocess.run([*demo, *arguments], capture_output=True, text=True, timeout=120)
        assert done.returncode != 0
        assert message in done.stderr and "Traceback" not in done.stderr
