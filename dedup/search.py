"""Exact cosine nearest neighbours of downstream features among upstream features, in bounded memory.

The downstream features (queries) stay on the device; upstream features arrive in chunks (a stream: the
upstream set is never held whole). For every chunk, similarities are matrix products of query tiles with the
chunk, each tile at most `memory_bytes` of similarities, on the accelerator when there is one; the running top-k
of every query is merged with the chunk's, and every pair at or above the threshold is kept. So memory is the
queries, one chunk, one tile and the top-k lists, whatever the upstream size, and the result is exact: the same
neighbours as a full similarity matrix (ties aside). `FaissSearch` does the same with faiss's exact
inner-product kernels on CPU (`pip install faiss-cpu`), chunk by chunk.

Upstream rows are numbered in the order they were added (`offset`), across chunks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .errors import DedupInputError

# Similarities computed at a time: queries x upstream rows x 4 bytes (float32) at most this many bytes.
DEFAULT_MEMORY_BYTES = 256 * 1024**2
# Pairs at or above the threshold kept at most (a threshold far too low would otherwise fill memory with them).
MAX_PAIRS = 10_000_000


@dataclasses.dataclass
class SearchResult:
    """`similarities[i, r]` / `indices[i, r]`: query i's r-th nearest upstream row (-1 where fewer rows exist);
    `pairs`: (query, upstream row, similarity) for every pair at or above the threshold, by query then row."""

    similarities: np.ndarray
    indices: np.ndarray
    pairs: list[tuple[int, int, float]]


class ExactCosineSearch:
    """Exact top-k and threshold search of unit-norm `queries` (n, d) over upstream chunks, in torch."""

    def __init__(
        self,
        queries: np.ndarray,
        *,
        k: int,
        threshold: float,
        device: torch.device | str = "cpu",
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
    ):
        if k < 1:
            raise DedupInputError(f"--neighbours {k}: expected at least 1.")
        self.device = torch.device(device)
        self.queries = torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32), device=self.device)
        self.k = k
        self.threshold = float(threshold)
        self.memory_bytes = memory_bytes
        n = len(self.queries)
        self.best_similarities = torch.full((n, k), -torch.inf, device=self.device)
        self.best_indices = torch.full((n, k), -1, dtype=torch.long, device=self.device)
        self.pair_blocks: list[torch.Tensor] = []  # (count, 3) float64 rows: query, upstream row, similarity
        self.rows_seen = 0
        self.pair_count = 0

    def _keep_pairs(self, block: torch.Tensor) -> None:
        self.pair_count += len(block)
        if self.pair_count > MAX_PAIRS:
            raise DedupInputError(
                f"More than {MAX_PAIRS:,} pairs are at or above the threshold {self.threshold:g}: it is far too low for "
                "near-duplicates; raise --threshold (or let bit-dedup calibrate it)."
            )
        self.pair_blocks.append(block)

    def add(self, keys: np.ndarray | torch.Tensor) -> None:
        """Search one upstream chunk (m, d) of unit rows; its rows get the next `m` numbers."""
        keys = torch.as_tensor(keys, dtype=torch.float32).to(self.device, non_blocking=True)
        m = len(keys)
        if m == 0:
            return
        offset = self.rows_seen
        # Query tiles whose similarity block fits the budget; the chunk itself is split too when one query row
        # of it would not.
        key_step = max(1, min(m, self.memory_bytes // 4))
        for key_start in range(0, m, key_step):
            block = keys[key_start : key_start + key_step]
            query_step = max(1, self.memory_bytes // (4 * len(block)))
            for query_start in range(0, len(self.queries), query_step):
                queries = self.queries[query_start : query_start + query_step]
                similarities = queries @ block.T
                self._merge(similarities, query_start, offset + key_start)
        self.rows_seen += m

    def _merge(self, similarities: torch.Tensor, query_start: int, row_start: int) -> None:
        rows = slice(query_start, query_start + len(similarities))
        hits = (similarities >= self.threshold).nonzero()
        if len(hits):
            values = similarities[hits[:, 0], hits[:, 1]]
            self._keep_pairs(
                torch.stack(
                    [(hits[:, 0] + query_start).double(), (hits[:, 1] + row_start).double(), values.double()], dim=1
                ).cpu()
            )
        top = min(self.k, similarities.shape[1])
        values, indices = similarities.topk(top, dim=1)
        merged_values = torch.cat([self.best_similarities[rows], values], dim=1)
        merged_indices = torch.cat([self.best_indices[rows], indices + row_start], dim=1)
        best, order = merged_values.topk(self.k, dim=1)
        self.best_similarities[rows] = best
        self.best_indices[rows] = merged_indices.gather(1, order)

    def result(self) -> SearchResult:
        pairs: list[tuple[int, int, float]] = []
        if self.pair_blocks:
            table = torch.cat(self.pair_blocks).numpy()
            table = table[np.lexsort((table[:, 1], table[:, 0]))]
            pairs = [(int(query), int(row), float(value)) for query, row, value in table]
        similarities = self.best_similarities.cpu().numpy()
        indices = self.best_indices.cpu().numpy()
        indices[~np.isfinite(similarities)] = -1
        return SearchResult(similarities, indices, pairs)


class FaissSearch(ExactCosineSearch):
    """The same search with faiss's exact inner-product index (`IndexFlatIP`), one upstream chunk at a time."""

    def __init__(self, queries: np.ndarray, *, k: int, threshold: float, **_ignored):
        try:
            import faiss
        except ImportError as error:
            raise DedupInputError("--faiss needs the faiss package: pip install faiss-cpu (or faiss-gpu).") from error
        self.faiss = faiss
        super().__init__(queries, k=k, threshold=threshold, device="cpu")
        self.query_array = np.ascontiguousarray(queries, dtype=np.float32)

    def add(self, keys) -> None:
        keys = np.ascontiguousarray(np.asarray(keys), dtype=np.float32)
        m = len(keys)
        if m == 0:
            return
        index = self.faiss.IndexFlatIP(keys.shape[1])
        index.add(keys)
        limits, values, rows = index.range_search(self.query_array, self.threshold)
        if len(rows):
            queries = np.repeat(np.arange(len(self.query_array)), np.diff(limits.astype(np.int64)))
            self._keep_pairs(
                torch.from_numpy(np.stack([queries, rows + self.rows_seen, values], axis=1).astype(np.float64))
            )
        top = min(self.k, m)
        values, rows = index.search(self.query_array, top)
        merged_values = torch.cat([self.best_similarities, torch.from_numpy(values)], dim=1)
        merged_indices = torch.cat(
            [self.best_indices, torch.from_numpy(rows.astype(np.int64)) + self.rows_seen], dim=1
        )
        best, order = merged_values.topk(self.k, dim=1)
        self.best_similarities = best
        self.best_indices = merged_indices.gather(1, order)
        self.rows_seen += m


def make_search(queries: np.ndarray, *, k: int, threshold: float, device, use_faiss: bool = False, **options):
    return (FaissSearch if use_faiss else ExactCosineSearch)(
        queries, k=k, threshold=threshold, device=device, **options
    )
