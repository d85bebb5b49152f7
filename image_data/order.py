"""The order a run reads its examples in: seeded per-epoch permutations, and a stream's shards per process.

A run's data order is a pure function of (seed, position), never of the number of processes or
DataLoader workers, nor of where a run was resumed: position p of an endless sequence of epochs is
example `permutation_e[p mod n]` of epoch e = p div n, and `permutation_e` is drawn from (seed, *salt, e).
(The salt lets a trainer keep its other draws, e.g. crops, on generators of their own.)
"""

from __future__ import annotations

from collections import OrderedDict

import datasets
import numpy as np
from datasets.distributed import split_dataset_by_node

EPOCHS_CACHED = 2  # a reader is within one epoch, or crossing into the next


class EpochOrder:
    """Position -> example index over epochs of `size` examples, each epoch a permutation seeded by
    (seed, *salt, epoch)."""

    def __init__(self, size: int, seed: int, salt: tuple[int, ...] = ()):
        self.size, self.seed, self.salt = int(size), int(seed), tuple(int(value) for value in salt)
        self._permutations: OrderedDict[int, np.ndarray] = OrderedDict()

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            rng = np.random.default_rng([self.seed, *self.salt, int(epoch)])
            self._permutations[epoch] = rng.permutation(self.size)
            if len(self._permutations) > EPOCHS_CACHED:
                self._permutations.popitem(last=False)
        return self._permutations[epoch]

    def index_of(self, position: int) -> int:
        epoch, offset = divmod(int(position), self.size)
        return int(self.permutation(epoch)[offset])


def shard_stream(
    stream: datasets.IterableDataset, seed: int, process_index: int, num_processes: int
) -> datasets.IterableDataset:
    """This process's share of a stream's shards (`split_dataset_by_node`), after a seeded shuffle of the
    shard order that is the same on every process and re-drawn each epoch (`set_epoch`).

    The buffer holds one example: `datasets` shuffles the shard order only through `shuffle`, and a buffer's
    content is not part of `datasets`' state_dict (a resume could not continue it); readers shuffle examples
    themselves.
    """
    stream = stream.shuffle(seed=seed, buffer_size=1)
    return split_dataset_by_node(stream, rank=process_index, world_size=num_processes)


def max_stream_workers(stream: datasets.IterableDataset, requested: int) -> int:
    """`datasets` gives each DataLoader worker whole shards: more workers than shards would idle or hang."""
    return max(0, min(requested, stream.num_shards))
