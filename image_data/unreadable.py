"""The one policy for unreadable images, in fine-tuning and pre-training alike.

An image that cannot be decoded (empty, truncated, corrupt, not an image, decompression-bomb sized:
`cells.read_image` raises `UnreadableImage`) is skipped: it never enters a loss or a metric and never
stops a run by itself. It is recorded by name and counted once per distinct image, however often a run
meets it (every epoch, in training and evaluation, in several processes or workers): `UnreadableImages`
is that record. Runs report the count and the names (the log, the output folder's metadata file).

How a batch leaves the image out is the trainer's: fine-tuning drops it from its batch; pre-training
keeps every batch the same shape (distributed and XLA steps need equal shapes on every process) and
gives the image weight 0 in the loss. Data where nothing is readable is an error, not a silent run:
a pre-training step without a readable image, a fine-tuning set without one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

UNREADABLE_NAMES_SHOWN = 5  # names printed in a message; records keep all of them


class UnreadableImages:
    """The distinct unreadable images a run has met, by name (insertion order kept; `names()` sorted)."""

    def __init__(self, names: Iterable[str] = ()):
        self._names: dict[str, None] = dict.fromkeys(names)

    def add(self, names: Iterable[str]) -> int:
        """Record `names`; returns how many of them were not known yet."""
        before = len(self._names)
        self._names.update(dict.fromkeys(names))
        return len(self._names) - before

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def names(self) -> list[str]:
        return sorted(self._names)

    def summary(self, shown: int = UNREADABLE_NAMES_SHOWN) -> str:
        """'3 unreadable image(s): a.jpg, b.png, c.gif' (the first `shown` names)."""
        names = self.names()
        more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
        return f"{len(names)} unreadable image(s): {', '.join(names[:shown])}{more}"
