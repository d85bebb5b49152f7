"""Class names of the published BiT heads: WordNet synsets of ImageNet-21k and ILSVRC-2012, in head order.

Each data file holds one line per class of the head, in the head's order: the WordNet synset id, a tab, then
the synset's lemmas separated by commas (`n01440764<TAB>tench, Tinca tinca`). Provenance and licences are in
`README.md` beside this file.
"""

from __future__ import annotations

import collections
import functools
from importlib import resources

from ..variants import ILSVRC2012, IMAGENET21K, NUM_CLASSES

_FILES = {IMAGENET21K: "imagenet21k.tsv", ILSVRC2012: "ilsvrc2012.tsv"}


@functools.cache
def synsets_and_lemmas(dataset: str) -> tuple[tuple[str, str], ...]:
    """(synset id, lemmas) per class of `dataset`'s head, in head order."""
    if dataset not in _FILES:
        raise ValueError(f"No class names for {dataset!r}; known: {', '.join(_FILES)}.")
    text = resources.files(__name__).joinpath(_FILES[dataset]).read_text(encoding="utf-8")
    rows = tuple(tuple(line.split("\t", 1)) for line in text.splitlines())
    if len(rows) != NUM_CLASSES[dataset]:
        raise RuntimeError(f"{_FILES[dataset]} has {len(rows)} classes, expected {NUM_CLASSES[dataset]}: reinstall.")
    return rows


def label_names(dataset: str) -> list[str]:
    """Readable, unique class names: each synset's first lemma, with the synset id appended where two classes
    share that lemma (ILSVRC-2012 has two "crane" classes, the bird and the machine)."""
    rows = synsets_and_lemmas(dataset)
    first_lemmas = [lemmas.split(",")[0].strip() for _, lemmas in rows]
    counts = collections.Counter(first_lemmas)
    return [
        lemma if counts[lemma] == 1 else f"{lemma} ({synset})"
        for (synset, _), lemma in zip(rows, first_lemmas, strict=True)
    ]


def dataset_of_head(num_classes: int) -> str | None:
    """The dataset whose class list a head of `num_classes` outputs, if it is one of the published heads."""
    return next((dataset for dataset, count in NUM_CLASSES.items() if count == num_classes), None)


__all__ = ["ILSVRC2012", "IMAGENET21K", "dataset_of_head", "label_names", "synsets_and_lemmas"]
