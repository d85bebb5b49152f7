"""The GPU paths, checked on CPU where they run there: mixed precision with float32 master weights in both
trainers, layouts on a non-CPU device, torch.compile without graph breaks and without the standardized-weight
cache, the cache at inference, pinned non-blocking copies in pre-training, the ours -> timm weight mapping, and
benchmarks/benchmark_gpu.py's whole code path at tiny sizes on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, randomize_
from PIL import Image
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from modeling_bit import BitConfig, BitForImageClassification, BitModel
from modeling_bit.modeling_bit import BitEncoder, WeightStandardizedConv2d
from modeling_bit.weight_standardization import _cached_layout

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import gpu_networks  # noqa: E402

TINY = BitConfig.from_preset("bit-tiny")
GROUP_NORMS = 3 * sum(TINY.depths) + 1  # three per unit, and the final norm
CONVOLUTIONS = 1 + 3 * sum(TINY.depths) + len(TINY.depths)  # the stem, three per unit, a projection per stage


@pytest.fixture(autouse=True)
def fresh_accelerate_state(tmp_path, monkeypatch):
    """In-process training runs each start from a clean accelerate state and their own datasets cache."""
    from accelerate.state import AcceleratorState, GradientState

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of small JPEGs."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir()
        for index in range(8):
            pixels = rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{index}.jpg", quality=90)
    return root


def tiny_model(cls=BitForImageClassification, seed: int = 0):
    torch.manual_seed(seed)
    return randomize_(cls(BitConfig.from_preset("bit-tiny")), seed)


def safetensors_dtypes(folder) -> set[str]:
    return {str(tensor.dtype) for tensor in load_file(folder / "model.safetensors").values()}


class ConvolutionDtypes:
    """Forward hooks recording the dtype of every convolution output while registered."""

    def __init__(self, model):
        self.seen: set[torch.dtype] = set()
        self.hooks = [
            module.register_forward_hook(lambda module, args, output: self.seen.add(output.dtype))
            for module in model.modules()
            if isinstance(module, WeightStandardizedConv2d)
        ]

    def remove(self):
        for hook in self.hooks:
            hook.remove()


# --- mixed precision with float32 master weights -----------------------------------------------------------


def test_bit_finetune_bf16_runs_convolutions_in_bf16_on_float32_weights_and_saves_float32(tmp_path, image_folder):
    from transformers import TrainerCallback

    from finetune import cli

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.convolutions = ConvolutionDtypes(model)
            self.model = model

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            self.master_dtypes = {parameter.dtype for parameter in self.model.parameters()}
            self.momentum_dtypes = {s["momentum_buffer"].dtype for s in optimizer.state.values() if s}

    watch = Watch()
    output = tmp_path / "out"
    flags = ["--model", "bit-tiny", "--from-scratch", "--train-dir", str(image_folder), "--output-dir", str(output)]
    flags += ["--max-steps", "2", "--batch-size", "4", "--resolution", "40", "32", "--num-workers", "0", "--bf16"]
    assert cli.main(flags, callbacks=[watch]) == 0
    watch.convolutions.remove()
    assert watch.convolutions.seen == {torch.bfloat16}  # autocast
    assert watch.master_dtypes == watch.momentum_dtypes == {torch.float32}  # the optimizer updates float32
    assert safetensors_dtypes(output) == {"torch.float32"}


def test_pretraining_mixed_precision_autocasts_a_float32_model_and_logs_its_data_wait(tmp_path, image_folder):
    from pretraining import pretrain

    run = ["--model-preset", "bit-tiny", "--image-size", "32", "--train-dir", str(image_folder), "--max-steps", "2"]
    run += ["--global-batch-size", "4", "--per-device-batch-size", "4", "--warmup-steps", "0", "--logging-steps", "1"]
    run += ["--validation-examples", "0", "--dataloader-num-workers", "0", "--mixed-precision", "bf16"]
    result = pretrain.train([*run, "--output-dir", str(tmp_path / "out")])
    result.accelerator.end_training()
    model = result.model
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
    # accelerate wraps the prepared model's forward in autocast: a float32 call outside any autocast runs bf16.
    convolutions = ConvolutionDtypes(model)
    with torch.no_grad():
        logits = model(pixel_values=torch.rand(2, 3, 32, 32) * 2 - 1).logits
    convolutions.remove()
    assert convolutions.seen == {torch.bfloat16} and logits.dtype == torch.float32  # outputs back in float32
    assert safetensors_dtypes(result.final) == {"torch.float32"}
    log = [json.loads(line) for line in (tmp_path / "out" / "training_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2]
    assert all(0 <= entry["data_wait_fraction"] <= 1 and entry["images_per_second"] > 0 for entry in log)


def test_both_trainers_refuse_fp16_on_a_cpu_where_accelerate_would_train_in_float32(tmp_path, image_folder, capsys):
    from finetune import cli
    from image_data import InputError
    from pretraining import pretrain

    run = ["--model-preset", "bit-tiny", "--train-dir", str(image_folder), "--max-steps", "1"]
    with pytest.raises(InputError, match="fp16 .*needs a GPU"):
        pretrain.train([*run, "--mixed-precision", "fp16", "--output-dir", str(tmp_path / "pretrained")])
    flags = ["--model", "bit-tiny", "--from-scratch", "--train-dir", str(image_folder), "--fp16"]
    assert cli.main([*flags, "--output-dir", str(tmp_path / "finetuned")]) == 2
    error = capsys.readouterr().err
    assert "--fp16 needs a GPU" in error and "Use --bf16" in error and "Traceback" not in error
    assert not (tmp_path / "finetuned").exists()


def test_pretraining_batches_are_pinned_and_copied_without_blocking_on_cuda_only():
    from pretraining import data as upstream_data

    labels = upstream_data.LabelSpace(2, ["a", "b"], False)
    source = upstream_data.UpstreamData(list(range(8)), None, "image", "label", labels, 8, {})
    builder = upstream_data.BatchBuilder("image", "label", labels, 32, seed=0, train=True)
    for device, expected in (("cuda", True), ("cpu", False)):
        # Building the loader touches no device; iterating it would, which this CPU-only machine cannot.
        accelerator = types.SimpleNamespace(process_index=0, num_processes=1, device=torch.device(device))
        loader = upstream_data.build_train_loader(
            source,
            builder,
            accelerator,
            seed=0,
            per_device_batch_size=4,
            accumulation=1,
            start_step=0,
            total_steps=2,
            num_workers=0,
            shuffle_buffer_size=1,
            stream_positions={},
        )
        assert loader.pin_memory is expected and loader._non_blocking is expected


# --- layouts -------------------------------------------------------------------------------------------------


def test_training_layout_switch_is_cpu_only_and_cached_kernels_keep_the_weights_layout_off_cpu():
    # On CPU, training switches small feature maps back to the default layout (oneDNN's GroupNorm backward);
    # elsewhere (CUDA, here the meta device, which takes the same branch) channels-last input stays channels-last.
    small = torch.empty(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    with torch.enable_grad():
        assert BitEncoder._training_layout(small).is_contiguous()
        assert not BitEncoder._training_layout(small).is_contiguous(memory_format=torch.channels_last)
        on_meta = BitEncoder._training_layout(small.to("meta"))
        assert on_meta.is_contiguous(memory_format=torch.channels_last)
    kernel = torch.empty(8, 4, 3, 3)
    assert _cached_layout(kernel) == torch.channels_last  # CPU: channels-last for oneDNN
    assert _cached_layout(kernel.to("meta")) == torch.contiguous_format
    assert _cached_layout(kernel.to("meta").contiguous(memory_format=torch.channels_last)) == torch.channels_last


# --- the standardized-weight cache --------------------------------------------------------------------------


class CountGroupNorms(TorchFunctionMode):
    """Counts group norms: the network's own, and Weight Standardization's (one per convolution it standardizes)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.group_norm:
            self.count += 1
        return func(*args, **(kwargs or {}))


def group_norms_per_forward(model, pixel_values, forwards: int = 2) -> list[int]:
    counts = []
    for _ in range(forwards):
        with CountGroupNorms() as counter:
            model(pixel_values)
        counts.append(counter.count)
    return counts


def test_inference_standardizes_each_kernel_once_training_in_every_forward():
    model = tiny_model(BitModel)
    pixel_values = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert group_norms_per_forward(model.eval(), pixel_values) == [GROUP_NORMS + CONVOLUTIONS, GROUP_NORMS]
    assert group_norms_per_forward(model.train(), pixel_values) == [GROUP_NORMS + CONVOLUTIONS] * 2


@pytest.mark.parametrize("gradients", [True, False])
def test_under_autocast_the_cached_kernel_is_the_autocast_dtype_with_the_same_result(gradients):
    pixel_values = torch.rand(2, 3, 64, 64) * 2 - 1
    trainable = tiny_model(BitModel)  # standardized in the graph, cast to bf16 by autocast in each convolution
    # Frozen weights with gradients on, or inference: the cache (not oneDNN's float32 prepacking, under autocast).
    cached = tiny_model(BitModel).requires_grad_(False).eval()
    conv = cached.encoder.stages[0].layers[0].conv2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = trainable(pixel_values).last_hidden_state
        with torch.set_grad_enabled(gradients):
            got = cached(pixel_values).last_hidden_state
            kernel = conv.standardized._kernel
            cached(pixel_values)
        assert kernel.dtype == torch.bfloat16 and conv.standardized._kernel is kernel  # reused
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    with torch.set_grad_enabled(gradients):
        cached(pixel_values)
    assert conv.standardized._kernel.dtype == torch.float32  # outside autocast: recomputed in the weights' dtype


# --- torch.compile ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, with_labels", [(BitModel, False), (BitForImageClassification, False), (BitForImageClassification, True)]
)
def test_forward_compiles_without_graph_breaks_in_training_and_inference(cls, with_labels):
    model = tiny_model(cls)
    pixel_values = torch.rand(2, 3, 64, 64) * 2 - 1
    inputs = {"labels": torch.tensor([0, 1])} if with_labels else {}  # bit-finetune's Trainer passes labels
    for training in (True, False):
        torch._dynamo.reset()
        model.train(training)
        with torch.set_grad_enabled(training):
            explanation = torch._dynamo.explain(model)(pixel_values, **inputs)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
    torch._dynamo.reset()


def test_compiled_inference_bypasses_the_cache_and_sees_weight_edits():
    model = tiny_model().eval()
    compiled = torch.compile(model, backend="eager")
    pixel_values = torch.rand(2, 3, 64, 64) * 2 - 1
    convolutions = [module for module in model.modules() if isinstance(module, WeightStandardizedConv2d)]
    with torch.no_grad():
        compiled(pixel_values)
        assert all(conv.standardized._kernel is None for conv in convolutions)
        convolutions[-1].weight.mul_(-1.0)  # seen by eager through the version counter, by compiled as an input
        torch.testing.assert_close(compiled(pixel_values).logits, model(pixel_values).logits, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.skipif(
    not any(shutil.which(name) for name in ("g++", "c++", "clang++")),
    reason="torch.compile's inductor backend needs a C++ compiler on CPU; none is installed",
)
def test_inductor_compiled_inference_equals_eager():
    # One stage (stem, a unit with its projection, the final norm, the head): inductor compiles each kernel with the
    # C++ compiler, which is slow here.
    torch.manual_seed(0)
    config = BitConfig(depths=[1], hidden_sizes=[32], embedding_size=16, num_groups=8, layer_type="preactivation")
    model = randomize_(BitForImageClassification(config)).eval()
    pixel_values = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        eager = model(pixel_values).logits
        compiled = torch.compile(model, dynamic=False)(pixel_values).logits
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


# --- benchmarks/benchmark_gpu.py -----------------------------------------------------------------------------


def timm_layout_forward(state: dict, pixel_values: torch.Tensor, config: BitConfig) -> torch.Tensor:
    """BiT's forward (docs/recipe.md, "Architecture") on a state dict with timm ResNetV2's names: stem.conv,
    stages.S.blocks.U.{norm1,conv1,norm2,conv2,norm3,conv3,downsample.conv}, norm, head.fc (a 1x1 convolution)."""
    eps = config.weight_standardization_eps

    def conv(x, key, stride=1):
        kernel = state[key]
        mean = kernel.mean(dim=(1, 2, 3), keepdim=True)
        standardized = (kernel - mean) / torch.sqrt(kernel.var(dim=(1, 2, 3), unbiased=False, keepdim=True) + eps)
        return F.conv2d(x, standardized, stride=stride, padding=(kernel.shape[-1] - 1) // 2)

    def norm(x, key):
        return F.relu(F.group_norm(x, config.num_groups, state[key + ".weight"], state[key + ".bias"], eps=1e-5))

    x = F.max_pool2d(F.pad(conv(pixel_values, "stem.conv.weight", 2), (1, 1, 1, 1)), kernel_size=3, stride=2)
    for stage, depth in enumerate(config.depths):
        for unit in range(depth):
            block = f"stages.{stage}.blocks.{unit}."
            stride = 2 if stage > 0 and unit == 0 else 1
            pre = norm(x, block + "norm1")
            shortcut = conv(pre, block + "downsample.conv.weight", stride) if unit == 0 else x
            h = conv(pre, block + "conv1.weight")
            h = conv(norm(h, block + "norm2"), block + "conv2.weight", stride)
            x = conv(norm(h, block + "norm3"), block + "conv3.weight") + shortcut
    pooled = norm(x, "norm").mean(dim=(2, 3), keepdim=True)
    return F.conv2d(pooled, state["head.fc.weight"], state["head.fc.bias"]).flatten(1)


def test_timm_weight_mapping_gives_our_logits_through_timm_names():
    model = tiny_model().double().eval()
    pixel_values = (torch.rand(2, 3, 64, 64) * 2 - 1).double()
    state = gpu_networks.timm_state_dict(model.state_dict())
    assert state["head.fc.weight"].shape == (*model.classifier[1].weight.shape, 1, 1)
    with torch.no_grad():
        expected = model(pixel_values).logits
        got = timm_layout_forward(state, pixel_values, model.config)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(KeyError, match="no timm name"):
        gpu_networks.timm_state_dict({"bit.pooler.weight": torch.zeros(1)})


def test_benchmark_gpu_tiny_on_cpu_writes_the_table(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "benchmark_gpu.py"), "--tiny", "--device", "cpu"]
    # The eager backend: torch.compile traces the same code, without compiling kernels (inductor is tested above).
    command += ["--compile-backend", "eager", "--output-dir", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "benchmark_gpu.json").read_text())
    table = (tmp_path / "out" / "benchmark_gpu.md").read_text()
    modes = {(row["task"], row["mode"]) for row in results["rows"]}
    assert modes == {
        ("inference", "fp32"),
        ("inference", "bf16"),
        ("inference", "bf16 channels-last"),
        ("inference", "bf16 channels-last compiled"),
        ("training", "bf16"),
        ("training", "bf16 channels-last"),
        ("training", "bf16 channels-last compiled"),
    }
    expected_networks = {"ours", "floor", "stock"} | ({"timm"} if gpu_networks.timm_is_installed() else set())
    for row in results["rows"]:
        assert set(row["networks"]) == expected_networks
        assert all(value["images_per_second"] > 0 for value in row["networks"].values())
        assert set(row["ours_over"]) == expected_networks - {"ours"}
    parity = results["parity"]["bit-tiny @64 b4"]
    assert parity["floor"]["fp32"] < 1e-5 and parity["stock"]["fp32"] < 1e-4
    assert parity["floor"]["bf16"] < 1e-2 and parity["stock"]["bf16"] < 1e-2
    runs = results["trainers"]["runs"]
    # The tiny set fits in bit-finetune's memory budget: no run decodes it in the workers at every step.
    assert [run["trainer"] for run in runs] == [
        "bit-finetune, images decoded once into memory",
        "pretrain.py --channels-last",
    ]
    for run in runs:
        assert "error" not in run, run
        assert run["images_per_second"] > 0 and 0 <= run["data_wait_fraction"] <= 1
        assert run["over_bare"] == pytest.approx(run["images_per_second"] / run["bare_images_per_second"])
    assert {entry["crop"] for entry in results["trainers"]["decoding"]} == {64}
    assert results["trainers"]["decoding"][0]["finetune_ms_per_image"] > 0
    assert "| inference | bit-tiny @64 b4 | bf16 channels-last compiled |" in table
    assert "pretrain.py --channels-last" in table and "Parity" in table
