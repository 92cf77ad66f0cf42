"""The sweep's pair stage: bases per (site, layer) place, chunks scored on the mesh with their
permutation null, and orbax checkpoints at most every --checkpoint_seconds (and at the first
and last chunk), so a killed sweep resumes with at most that much work to redo.

The null (engine.null) uses one seeded set of sentence permutations for every pair of the run
(`permutations`), so a resumed sweep scores the null of its remaining pairs exactly as an
uninterrupted one; the checkpoints hold its per-pair mean, sd and exceedance count with the
scores. The score itself stays svcca.pair_scores' (the kernel's, as without a null); the
exceedance count compares each null draw with the null kernel's own observed score, computed
with the same arithmetic as the draws, so ties compare exactly (the two scores differ by float32
round-off, ~3e-7 on the default run: one GEMM per pair there, a block of permutations here).

Bases are computed once per place for every representation there, kept while a pending chunk
still needs them, and joined for the chunk at hand (engine.distributed.join_bases; padding is
exact). Each chunk's bases and pairs are padded to bucketed shapes (`bucketed`), so the chunks
share a few compiled programs. Each process computes the bases of its own keys and the
processes exchange them (engine.distributed.gather_bases); its keys are one block of every
place, in process order, so the gathered bases are in the place's key order. Every process
takes part in orbax's checkpoints (process 0 writes them) and all agree when to save.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from tqdm.auto import tqdm

from engine import distributed, null, pairs, svcca
from engine.keys import Key
from engine.rundir import CHECKPOINT_DIR
from engine.settings import SweepError

# Test hook: the process SIGKILLs itself after this many chunks are checkpointed (resume tests);
# while it is set every chunk is checkpointed, so the count is of checkpoints.
KILL_AFTER_ENV = "XMODAL_SWEEP_KILL_AFTER_CHUNKS"
# Kept directions (K) are padded to a multiple of WIDTH_STEP, representations to a power of two,
# and pairs are scored in blocks of PAIR_BLOCK (fewer: a power of two), so the chunks of a sweep
# reuse a few compiled shapes instead of compiling their own. Small steps: the null's SVDs grow
# as K^3 and each padded pair costs a pair's permutations.
WIDTH_STEP = 8
PAIR_BLOCK = 64


def _bucket(count: int) -> int:
  return 1 << max(0, int(count) - 1).bit_length()


def bucketed(bases: svcca.Bases, idx: np.ndarray) -> tuple[svcca.Bases, np.ndarray]:
  """Bases and index pairs padded to bucketed shapes; exact: padded directions are zero columns
  the pair stage masks, padded representations are never paired, and the padded pairs (0, 0)
  come after the real ones, to be dropped."""
  r, _, k = bases.u.shape
  width = -(-k // WIDTH_STEP) * WIDTH_STEP
  features = None if bases.w is None else -(-bases.w.shape[-1] // WIDTH_STEP) * WIDTH_STEP
  padded = distributed.pad_bases(bases, width, features)
  extra = _bucket(r) - r
  if extra:
    rows = lambda x: np.pad(np.asarray(x), [(0, extra)] + [(0, 0)] * (np.ndim(x) - 1))
    padded = svcca.Bases(u=rows(padded.u), s=rows(padded.s),
                         w=None if padded.w is None else rows(padded.w),
                         rank=np.pad(np.asarray(padded.rank), (0, extra), constant_values=1))
  idx = np.asarray(idx, np.int32).reshape(-1, 2)
  size = _bucket(len(idx)) if len(idx) < PAIR_BLOCK else -(-len(idx) // PAIR_BLOCK) * PAIR_BLOCK
  idx = np.concatenate([idx, np.zeros((size - len(idx), 2), np.int32)])
  return padded, idx


def _concat(results: list[tuple]) -> tuple:
  return type(results[0])(*(np.concatenate(field) for field in zip(*results)))


def chunk_scores(bases: svcca.Bases, idx: np.ndarray, *, metric: str, perms: np.ndarray | None,
                 mesh) -> tuple[svcca.PairResult, null.NullResult | None]:
  """pair_scores (and pair_null) of index pairs [P, 2] on bucketed shapes, padding dropped."""
  count = len(idx)
  bases, idx = bucketed(bases, idx)
  blocks = [idx[i:i + PAIR_BLOCK] for i in range(0, len(idx), PAIR_BLOCK)]
  result = _concat([svcca.pair_scores(bases, b, metric=metric, mesh=mesh) for b in blocks])
  chance = None if perms is None else _concat(
      [null.pair_null(bases, b, perms, metric=metric, mesh=mesh) for b in blocks])
  cut = lambda r: type(r)(*(np.asarray(f)[:count] for f in r))
  return cut(result), None if chance is None else cut(chance)


class PlaceBases:
  """Bases per (site, layer) place, computed once, dropped when no pending chunk needs them."""

  def __init__(self, where: dict, n: int, keys: Sequence[Key], chunks: Sequence[pairs.Chunk], *,
               metric: str, threshold: float, dtype: str, dims: int | None = None):
    self.where, self.n = where, n
    self.options = dict(metric=metric, threshold=threshold, dtype=dtype, dims=dims)
    self.keys: dict[tuple, list[Key]] = {}
    for k in keys:
      self.keys.setdefault((k.site, k.layer), []).append(k)
    self.uses: dict[tuple, int] = {}
    for chunk in chunks:
      for place in chunk.group:
        self.uses[place] = self.uses.get(place, 0) + 1
    self.cache: dict[tuple, svcca.Bases] = {}

  def bases(self, chunk: pairs.Chunk) -> tuple[svcca.Bases, list[Key]]:
    """(joined Bases, their keys in order) for a chunk."""
    parts, keys = [], []
    for place in chunk.group:
      if place not in self.cache:
        self.cache[place] = self._compute(self.keys[place])
      parts.append(self.cache[place])
      keys += self.keys[place]
    return distributed.join_bases(parts), keys

  def _compute(self, keys: list[Key]) -> svcca.Bases:
    own = [k for k in keys if k in self.where]
    if own:
      try:
        local = svcca.compute_bases([self.where[k].load(k) for k in own],
                                    names=[k.name for k in own], warn=False, **self.options)
      except ValueError as e:
        if self.options["dims"] is None:
          raise
        raise SweepError(f"--svd_dims={self.options['dims']}: {e}") from None
    else:
      local = distributed.no_bases(self.n, self.options["dtype"],
                                   self.options["metric"] == "pwcca")
    bases = distributed.gather_bases(local)
    if len(bases.rank) != len(keys):
      raise SweepError(f"the processes hold {len(bases.rank)} of the {len(keys)} representations "
                       f"at {keys[0].site} layer {keys[0].layer}")
    return bases

  def release(self, chunk: pairs.Chunk) -> None:
    for place in chunk.group:
      self.uses[place] -= 1
      if self.uses[place] == 0:
        self.cache.pop(place, None)


NULL_FIELDS = ("null_mean", "null_sd", "exceed")


def fresh(size: int) -> dict[str, np.ndarray]:
  """What the checkpoints hold per plan position: a done flag, the score, both kept ranks, and
  the null's mean, sd and count of null scores >= the score (zero when the null is off)."""
  return {"done": np.zeros(size, bool), "score": np.zeros(size, np.float64),
          "rank_a": np.zeros(size, np.int64), "rank_b": np.zeros(size, np.int64),
          "null_mean": np.zeros(size, np.float64), "null_sd": np.zeros(size, np.float64),
          "exceed": np.zeros(size, np.int64)}


def checkpointer(out: Path) -> ocp.CheckpointManager:
  absl_logging.set_verbosity(absl_logging.WARNING)
  options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False)
  return ocp.CheckpointManager((out / CHECKPOINT_DIR).absolute(), options=options)


def restore(manager: ocp.CheckpointManager, size: int, where: Path) -> dict[str, np.ndarray]:
  """The latest checkpoint (fresh arrays when there is none); a damaged one is a SweepError
  naming it and the way out."""
  empty = fresh(size)
  step = manager.latest_step()
  if step is None:
    return empty
  path = where / str(step)
  redo = f"delete {where} and run again: the pairs are rescored from the stored activations"
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore(empty))
    restored = {name: np.array(value) for name, value in restored.items()}
  except Exception as e:  # pylint: disable=broad-except
    # orbax and tensorstore raise ValueError, KeyError, JSONDecodeError, ... with the whole
    # tensorstore spec in the message
    reason = " ".join(str(e).split("[tensorstore_spec")[0].split())[:160]
    raise SweepError(f"checkpoint {path} is damaged ({type(e).__name__}: {reason}); "
                     f"{redo}") from None
  done = restored["done"]
  if (any(restored[k].shape != v.shape or restored[k].dtype != v.dtype for k, v in empty.items())
      or not np.isfinite(restored["score"][done]).all()
      or not all(np.isfinite(restored[k][done]).all() for k in ("null_mean", "null_sd"))
      or (restored["exceed"][done] < 0).any()
      or (restored["rank_a"][done] < 1).any() or (restored["rank_b"][done] < 1).any()):
    raise SweepError(f"checkpoint {path} is damaged (inconsistent contents); {redo}")
  return restored


def score_chunks(plan: Sequence[pairs.Pair], pending: Sequence[pairs.Chunk], places: PlaceBases,
                 sweep: dict[str, np.ndarray], manager: ocp.CheckpointManager, *, metric: str,
                 perms: np.ndarray | None, mesh, progress: bool,
                 checkpoint_seconds: float = 15.0) -> dict[str, np.ndarray]:
  """Scores the pending chunks into `sweep` (fresh's arrays), checkpointing by time: a save
  costs more than a small chunk, so the first and last chunks, an interrupted sweep's finished
  chunks and otherwise one chunk per `checkpoint_seconds` are saved.

  perms: the run's permutations [B, n] (engine.null.permutations), or None for no null.
  """
  kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
  every = 0.0 if kill_after else checkpoint_seconds
  step = int(manager.latest_step() or 0)
  total = sum(len(c.plan_index) for c in pending)
  saved, unsaved, checkpoints = time.monotonic(), False, 0

  def save():
    nonlocal step, saved, unsaved, checkpoints
    step, unsaved = step + 1, False
    manager.save(step, args=ocp.args.StandardSave(sweep))
    manager.wait_until_finished()
    saved, checkpoints = time.monotonic(), checkpoints + 1

  with manager, tqdm(total=total, unit="pair", desc="pairs", dynamic_ncols=True,
                     disable=not progress) as bar:
    try:
      for run, chunk in enumerate(pending, start=1):
        bases, joined = places.bases(chunk)
        idx = pairs.index_pairs([plan[p] for p in chunk.plan_index], joined)
        result, chance = chunk_scores(bases, idx, metric=metric, perms=perms, mesh=mesh)
        places.release(chunk)
        at = chunk.plan_index
        for name in ("score", "rank_a", "rank_b"):
          sweep[name][at] = getattr(result, name)
        for name in NULL_FIELDS if chance is not None else ():
          sweep[name][at] = getattr(chance, name)
        sweep["done"][at] = True
        unsaved = True
        due = run in (1, len(pending)) or time.monotonic() - saved >= every
        if distributed.agree(int(due)):  # every process saves, or none
          save()
        bar.update(len(at))
        if kill_after and checkpoints >= kill_after:
          os.kill(os.getpid(), signal.SIGKILL)
    except BaseException:
      # an interrupted sweep keeps the chunks it finished (one process: others may be mid-chunk)
      if unsaved and jax.process_count() == 1:
        save()
      raise
  return sweep


def null_columns(sweep: dict[str, np.ndarray], permutations: int) -> dict[str, np.ndarray] | None:
  """The table's null columns (engine.null.finish: null_mean, null_sd, z, p_value) from the
  checkpointed arrays, z from the table's score; None when the null is off."""
  if not permutations:
    return None
  return null.finish(null.NullResult(*(sweep[k] for k in null.NullResult._fields)), permutations)
