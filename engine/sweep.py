"""The sweep: a corpus through a model into an activation store, then a comparison plan scored.

Stages, each its own module, read top to bottom in `run_sweep`:

  engine.settings    the settings, checked once (identity: what decides the numbers)
  engine.rundir      the output directory claimed (new, resumed, or refused) and its state
  engine.extraction  the corpus through the model into the store; the plan printed first
  engine.planning    the plan from the stored representations and the recorded site map
  engine.scoring     bases per place, chunks scored with their permutation null (engine.null)
                     on the mesh, orbax checkpoints
  engine.table       the results table written
  engine.replicates  on request (--bootstrap), the sentence bootstrap of the findings

Several processes (hosts, after engine.distributed.initialize) run one sweep in a directory
they all see: each extracts its block of the languages into its own store and computes the
bases of its block; the bases are all-gathered, the pairs are sharded over every process's
devices, and every process gets every score. Only process 0 writes sweep.json and the table;
failures in a stage that processes run on their own are exchanged (distributed.together), so
every process stops with the same one-line error.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Callable

import pandas as pd

from engine import distributed, extraction, model_checks, pairs, planning, rundir, scoring, settings
from engine import null, replicates, sharding, svcca
from engine.settings import Settings, SweepError
from engine.table import results_table, write_table


@dataclasses.dataclass
class SweepResult:
  output_dir: Path
  table: pd.DataFrame  # engine.table.COLUMNS
  plan: list
  chunks: int
  chunks_run: int
  degenerate: int  # representations whose kept rank is >= RANK_WARNING_FRACTION * n
  n: int
  sentence: replicates.SentenceBootstrap | None = None  # --bootstrap's, on process 0


def run_sweep(s: Settings, *, overwrite: bool = False,
              log: Callable[[str], None] = print) -> SweepResult:
  """Extracts, plans and scores a sweep in --output_dir (resuming what is there).

  With several processes every one calls this with the same settings; only process 0 logs and
  claims the output directory, and the others follow its state.
  """
  s = settings.check(s)
  out = Path(s.run.output_dir)
  mesh = pair_mesh(s.run.devices)  # before any work: a bad --devices fails at once
  if s.scoring.dtype == "float64":
    sharding.set_dtype("float64")
  leader = extraction.process()[0] == 0
  if s.report.bootstrap and extraction.process()[1] > 1:
    raise SweepError(f"--bootstrap={s.report.bootstrap} runs in one process, this sweep has "
                     f"{extraction.process()[1]}; resume it in one process with --bootstrap")
  if not leader:
    log, s = (lambda _: None), s.replace(progress=False)
  state = distributed.together(lambda: rundir.prepare(
      out, settings.identity(s), overwrite=overwrite,
      vet=lambda: model_checks.check_model(s.model)) if leader else None)[0]
  state, planned = extraction.extract_stage(out, state, s, log)
  where, keys, n = extraction.stored(out, state, s.corpus.languages, s.corpus.modalities)
  sc = s.scoring
  plan = planning.make(sc.plan, keys, site_map=state["extracted"]["site_map"],
                       layer_counts=state["extracted"]["layer_counts"], pivot=sc.pivot)
  perms = null.permutations(n, sc.permutations, sc.null_seed) if sc.permutations else None
  state = _claim_checkpoints(out, state, planning.digest(plan), _null_record(sc, n), log, leader)
  chunks = pairs.chunk_plan(plan, max_pairs=s.run.chunk_pairs)
  manager = scoring.checkpointer(out)
  sweep = scoring.restore(manager, len(plan), out / rundir.CHECKPOINT_DIR)
  pending = [c for c in chunks if not sweep["done"][c.plan_index].all()]
  _announce(s, plan, pending, mesh[1], int(sweep["done"].sum()), planned, log)
  places = scoring.PlaceBases(where, n, pairs.plan_keys(plan), pending, metric=sc.metric,
                              threshold=sc.threshold, dtype=sc.dtype, dims=sc.svd_dims)
  sweep = scoring.score_chunks(plan, pending, places, sweep, manager, metric=sc.metric,
                               perms=perms, mesh=mesh[0], progress=s.run.progress,
                               checkpoint_seconds=s.run.checkpoint_seconds)
  table = results_table(plan, sweep["score"], sweep["rank_a"], sweep["rank_b"],
                        model=s.model.name, metric=sc.metric, n=n,
                        null=scoring.null_columns(sweep, sc.permutations),
                        permutations=sc.permutations)
  if leader:
    write_table(table, out)
  sentence = (replicates.run(s, table, plan, where, n, mesh=mesh[0], log=log)
              if s.report.bootstrap else None)
  return SweepResult(out, table, plan, len(chunks), len(pending), degenerate(table), n,
                     sentence)


def pair_mesh(devices: str):
  """(Mesh, description) for --devices, refused as a SweepError."""
  try:
    return sharding.mesh_for(settings.parse_devices(devices))
  except ValueError as e:
    raise SweepError(str(e)) from None


def _null_record(scoring_settings: settings.Scoring, n: int) -> dict:
  """The null as sweep.json records it: how many permutations of the n sentences, which seed."""
  return {"permutations": scoring_settings.permutations, "seed": scoring_settings.null_seed,
          "n": n}


def _claim_checkpoints(out: Path, state: dict, digest: str, null_record: dict, log,
                       leader: bool) -> dict:
  """Records the plan's digest and the null; checkpoints of another plan are discarded, never
  restored."""
  if state.get("plan") == digest and state.get("null") == null_record:
    return state
  if state.get("plan") is not None and (out / rundir.CHECKPOINT_DIR).exists():
    log("the plan differs from the one checkpointed (the engine's plans changed?); "
        "scoring it afresh from the stored activations")
    if leader:
      shutil.rmtree(out / rundir.CHECKPOINT_DIR)
  state = {**state, "plan": digest, "null": null_record}
  if leader:
    rundir.write_state(out, state)
  distributed.barrier("sweep-plan")
  return state


def _announce(s: Settings, plan, pending, devices: str, done: int, planned: str | None,
              log) -> None:
  """The plan, unless it is the one printed before extraction (digest `planned`)."""
  if planning.digest(plan) != planned:
    log(planning.describe(plan, settings.describe(s), chunk_pairs=s.run.chunk_pairs,
                          heading="plan" if planned is None else "revised plan",
                          devices=devices, done=done))
  else:
    log(f"scoring {len(plan) - done} pairs in {len(pending)} chunks on {devices}")


def degenerate(table: pd.DataFrame) -> int:
  """Representations whose kept rank reaches svcca.RANK_WARNING_FRACTION of the sentences n,
  where CCA inflates scores (few sentences, as in quick runs on the bundled corpus)."""
  ranks = {}
  for side in ("a", "b"):
    cols = [f"{c}_{side}" for c in ("model", "language", "modality", "site", "layer")]
    ranks.update(zip(map(tuple, table[cols].to_numpy()), table[f"rank_{side}"]))
  n = int(table.n.iloc[0]) if len(table) else 0
  return sum(1 for rank in ranks.values() if rank >= svcca.RANK_WARNING_FRACTION * n)
