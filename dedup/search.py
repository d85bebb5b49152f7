"""Exact cosine nearest neighbours of downstream features among upstream features, in bounded memory.

The downstream features (queries) stay on the device; upstream features arrive in chunks (a stream: the
upstream set is never held whole). For every chunk, similarities are matrix products of query tiles with the
chunk, each tile at most `memory_bytes` of similarities, on the accelerator when there is one; the running top-k
of every query is merged with the chunk's, and every pair at or above the threshold is kept. So memory is the
queries, one chunk, one tile and the top-k lists, whatever the upstream size, and the result is exact: the same
neighbours as a full similarity matrix (ties aside). `FaissSearch` does the same with faiss's exact
inner-product kernels on CPU (`pip install faiss-cpu`), chunk by chunk.

An item (an image) may have several features, its views (`dedup.features`): queries are (n, query views, d) and
chunks (m, key views, d), and the similarity of a query and an upstream item is the highest over their views.
Upstream items are numbered in the order they were added (`offset`), across chunks.
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
    """`similarities[i, r]` / `indices[i, r]`: query i's r-th nearest upstream item (-1 where fewer exist);
    `pairs`: (query, upstream item, similarity) for every pair at or above the threshold, by query then item."""

    similarities: np.ndarray
    indices: np.ndarray
    pairs: list[tuple[int, int, float]]


def with_views(features) -> np.ndarray | torch.Tensor:
    """(items, views, d) features; (items, d) ones are one view each."""
    return features[:, None] if features.ndim == 2 else features


class ExactCosineSearch:
    """Exact top-k and threshold search of unit-norm `queries` (n, [views,] d) over upstream chunks, in torch."""

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
        queries = with_views(np.ascontiguousarray(queries, dtype=np.float32))
        n, self.query_views, dim = queries.shape
        # Flattened: query i's views are rows i * query_views ... (i + 1) * query_views - 1.
        self.queries = torch.as_tensor(queries.reshape(n * self.query_views, dim), device=self.device)
        self.query_count = n
        self.k = k
        self.threshold = float(threshold)
        self.memory_bytes = memory_bytes
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
        """Search one upstream chunk (m, [views,] d) of unit rows; its items get the next `m` numbers."""
        keys = with_views(torch.as_tensor(keys, dtype=torch.float32)).to(self.device, non_blocking=True)
        m, key_views, dim = keys.shape
        if m == 0:
            return
        keys = keys.reshape(m * key_views, dim)
        views = self.query_views * key_views
        offset = self.rows_seen
        # Query tiles whose similarity block fits the budget; the chunk itself is split too when the views of one
        # query against it would not.
        key_step = max(1, min(m, self.memory_bytes // (4 * views)))
        for key_start in range(0, m, key_step):
            block = keys[key_start * key_views : (key_start + key_step) * key_views]
            items = len(block) // key_views
            query_step = max(1, self.memory_bytes // (4 * views * items))
            for query_start in range(0, self.query_count, query_step):
                queries = self.queries[query_start * self.query_views : (query_start + query_step) * self.query_views]
                similarities = queries @ block.T
                if views > 1:
                    similarities = similarities.view(-1, self.query_views, items, key_views).amax(dim=(1, 3))
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
        self.query_array = self.queries.numpy()

    def add(self, keys) -> None:
        keys = with_views(np.ascontiguousarray(np.asarray(keys), dtype=np.float32))
        m, key_views, dim = keys.shape
        if m == 0:
            return
        index = self.faiss.IndexFlatIP(dim)
        index.add(keys.reshape(m * key_views, dim))
        # Faiss answers per view row; a (query, item) pair is its views' best, so rows are folded onto items.
        limits, values, rows = index.range_search(self.query_array, self.threshold)
        if len(rows):
            queries = np.repeat(np.arange(len(self.query_array)), np.diff(limits.astype(np.int64)))
            self._keep_pairs(self._best_per_pair(queries // self.query_views, rows // key_views, values))
        # An item's best view is among a query view's top k * key_views rows (fewer rows than that would hold
        # k better items), and the query's best over its views is the best over their lists.
        top = min(self.k * key_views, m * key_views)
        values, rows = index.search(self.query_array, top)
        values = torch.from_numpy(values).view(self.query_count, self.query_views * top)
        items = torch.from_numpy(rows.astype(np.int64) // key_views).view(self.query_count, self.query_views * top)
        values, items = _best_distinct(values, items, self.k)
        merged_values = torch.cat([self.best_similarities, values], dim=1)
        merged_indices = torch.cat([self.best_indices, items + self.rows_seen], dim=1)
        best, order = merged_values.topk(self.k, dim=1)
        self.best_similarities = best
        self.best_indices = merged_indices.gather(1, order)
        self.rows_seen += m

    def _best_per_pair(self, queries: np.ndarray, items: np.ndarray, values: np.ndarray) -> torch.Tensor:
        """(count, 3) rows (query, upstream item, similarity), the best similarity of each (query, item) pair."""
        order = np.lexsort((-values, items, queries))
        queries, items, values = queries[order], items[order], values[order]
        first = np.ones(len(order), bool)
        first[1:] = (queries[1:] != queries[:-1]) | (items[1:] != items[:-1])
        table = np.stack([queries[first], items[first] + self.rows_seen, values[first]], axis=1)
        return torch.from_numpy(table.astype(np.float64))


def _best_distinct(values: torch.Tensor, items: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the `k` highest values of distinct items (an item's best), padded with -inf / -1."""
    # Highest first, then grouped by item (a stable sort keeps each group's best first): every later entry of a
    # group is a worse view of the same item and drops out.
    order = values.argsort(dim=1, descending=True, stable=True)
    values, items = values.gather(1, order), items.gather(1, order)
    order = items.argsort(dim=1, stable=True)
    values, items = values.gather(1, order), items.gather(1, order)
    repeated = torch.zeros_like(items, dtype=torch.bool)
    repeated[:, 1:] = items[:, 1:] == items[:, :-1]
    values = values.masked_fill(repeated | (items < 0), -torch.inf)
    top = min(k, values.shape[1])
    best_values, chosen = values.topk(top, dim=1)
    best_items = items.gather(1, chosen).masked_fill(~torch.isfinite(best_values), -1)
    padding = k - top
    return (
        torch.nn.functional.pad(best_values, (0, padding), value=-torch.inf),
        torch.nn.functional.pad(best_items, (0, padding), value=-1),
    )


def make_search(queries: np.ndarray, *, k: int, threshold: float, device, use_faiss: bool = False, **options):
    return (FaissSearch if use_faiss else ExactCosineSearch)(
        queries, k=k, threshold=threshold, device=device, **options
    )
