"""The sweep's pair stage: bases per (site, layer) place, chunks scored on the mesh with their
permutation null, and orbax checkpoints after every chunk, so a killed sweep resumes at the
chunk it was in.

The null (engine.null) uses one seeded set of sentence permutations for every pair of the run
(`permutations`), so a resumed sweep scores the null of its remaining pairs exactly as an
uninterrupted one; the checkpoints hold its per-pair mean, sd and exceedance count with the
scores.

Bases are computed once per place for every representation there, kept while a pending chunk
still needs them, and joined for the chunk at hand (engine.distributed.join_bases; padding is
exact). Each process computes the bases of its own keys and the processes exchange them
(engine.distributed.gather_bases); its keys are one block of every place, in process order, so
the gathered bases are in the place's key order. Every process takes part in orbax's
checkpoints (process 0 writes them).
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Sequence

import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from tqdm.auto import tqdm

from engine import distributed, null, pairs, svcca
from engine.keys import Key
from engine.rundir import CHECKPOINT_DIR
from engine.settings import SweepError

# Test hook: the process SIGKILLs itself after this many chunks are checkpointed (resume tests).
KILL_AFTER_ENV = "XMODAL_SWEEP_KILL_AFTER_CHUNKS"


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
                 perms: np.ndarray | None, mesh, progress: bool) -> dict[str, np.ndarray]:
  """Scores the pending chunks into `sweep` (fresh's arrays), checkpointing after each.

  perms: the run's permutations [B, n] (engine.null.permutations), or None for no null.
  """
  kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
  step = int(manager.latest_step() or 0)
  total = sum(len(c.plan_index) for c in pending)
  with manager, tqdm(total=total, unit="pair", desc="pairs", dynamic_ncols=True,
                     disable=not progress) as bar:
    for run, chunk in enumerate(pending, start=1):
      bases, joined = places.bases(chunk)
      idx = pairs.index_pairs([plan[p] for p in chunk.plan_index], joined)
      if perms is None:
        result = svcca.pair_scores(bases, idx, metric=metric, mesh=mesh)
      else:
        result = null.pair_null(bases, idx, perms, metric=metric, mesh=mesh)
      places.release(chunk)
      at = chunk.plan_index
      for name in ("score", "rank_a", "rank_b", *(NULL_FIELDS if perms is not None else ())):
        sweep[name][at] = getattr(result, name)
      sweep["done"][at] = True
      step += 1
      manager.save(step, args=ocp.args.StandardSave(sweep))
      manager.wait_until_finished()
      bar.update(len(at))
      if kill_after and run >= kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
  return sweep


def null_columns(sweep: dict[str, np.ndarray], permutations: int) -> dict[str, np.ndarray] | None:
  """The table's null columns (engine.null.finish: null_mean, null_sd, z, p_value) from the
  checkpointed arrays; None when the null is off."""
  if not permutations:
    return None
  return null.finish(null.NullResult(*(sweep[k] for k in null.NullResult._fields)), permutations)
