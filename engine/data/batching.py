"""Length-bucketed batches: similar lengths together, so padding (and wasted compute) is small."""
from __future__ import annotations

from typing import Sequence

import datasets
import numpy as np
import pyarrow.compute as pc


def length_buckets(lengths: Sequence[int] | np.ndarray, *, max_batch: int,
                   max_tokens: int | None = None) -> list[np.ndarray]:
  """Index arrays covering every item once, longest batches first.

  Items are sorted by length (descending, ties by index, so the result is deterministic) and cut
  greedily into batches of at most `max_batch` items whose padded size (batch size x longest
  item) stays within `max_tokens` (tokens or audio frames). An item longer than `max_tokens`
  gets a batch of its own. The first batch is the most memory-hungry, so out-of-memory shows
  up at once.
  """
  lengths = np.asarray(lengths)
  if lengths.ndim != 1 or (lengths.size and not np.issubdtype(lengths.dtype, np.integer)):
    raise ValueError(f"lengths must be a 1-D array of integers, got dtype {lengths.dtype} "
                     f"shape {lengths.shape}")
  if lengths.size and lengths.min() < 0:
    raise ValueError(f"lengths must be >= 0, got {int(lengths.min())}")
  if max_batch < 1:
    raise ValueError(f"max_batch must be >= 1, got {max_batch}")
  if max_tokens is not None and max_tokens < 1:
    raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
  order = np.lexsort((np.arange(lengths.size), -lengths.astype(np.int64)))
  batches, start = [], 0
  while start < order.size:
    longest = max(int(lengths[order[start]]), 1)
    size = max_batch if max_tokens is None else max(1, min(max_batch, max_tokens // longest))
    batches.append(order[start:start + size].astype(np.int64))
    start += size
  return batches


def audio_lengths(ds: datasets.Dataset) -> np.ndarray:
  """Samples per row of a corpus (0 where audio is None), read from Arrow without copying audio."""
  column = ds.with_format("arrow", columns=["audio"])[:]["audio"]
  return pc.fill_null(pc.list_value_length(column), 0).to_numpy().astype(np.int64)


def padding_fraction(lengths: Sequence[int] | np.ndarray, batches: list[np.ndarray]) -> float:
  """Share of a padded batch that is padding, over all batches (for checking a bucketing)."""
  lengths = np.asarray(lengths)
  padded = sum(len(b) * int(lengths[b].max()) for b in batches if len(b))
  return 0.0 if padded == 0 else 1.0 - float(lengths.sum()) / padded
