"""The sweep's pair stage against the kernel alone, on the stored activations of a finished run.

(a) kernel: bases once per (site, layer) place, then pair_scores and pair_null over the whole
    plan in one call each on bases joined to one width; compile (a first call) timed apart.
(b) sweep: scoring.score_chunks from the same store into a fresh checkpoint directory, as a
    rerun after deleting checkpoints/ does (bases, compiles and checkpoints included).
Both in one run, so their ratio is what counts on a shared machine.

  PYTHONPATH=$PWD python -m cli.sweep --output_dir=/tmp/sweep-speed-default
  PYTHONPATH=$PWD python -m benchmarks.sweep_pair_stage --run_dir=/tmp/sweep-speed-default
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from engine import distributed, extraction, null, pairs, planning, rundir, scoring, settings, svcca
from engine.sweep import pair_mesh

RESULTS = Path(__file__).parent / "results"


def _setup(run_dir: Path):
  s = settings.check(settings.of(output_dir=str(run_dir)))
  state = rundir.read_state(run_dir)
  where, keys, n = extraction.stored(run_dir, state, s.corpus.languages, s.corpus.modalities)
  sc = s.scoring
  plan = planning.make(sc.plan, keys, site_map=state["extracted"]["site_map"],
                       layer_counts=state["extracted"]["layer_counts"], pivot=sc.pivot)
  perms = null.permutations(n, sc.permutations, sc.null_seed)
  return s, where, n, plan, perms


def _places(s, where, n, plan, chunks) -> scoring.PlaceBases:
  sc = s.scoring
  return scoring.PlaceBases(where, n, pairs.plan_keys(plan), chunks, metric=sc.metric,
                            threshold=sc.threshold, dtype=sc.dtype, dims=sc.svd_dims)


def kernel(s, where, n, plan, perms, mesh) -> dict:
  chunks = pairs.chunk_plan(plan, max_pairs=s.run.chunk_pairs)
  places = _places(s, where, n, plan, chunks)
  start = time.perf_counter()
  parts, keys = [], []
  for place, held in places.keys.items():
    parts.append(places._compute(held))  # pylint: disable=protected-access
    keys += held
  bases = distributed.join_bases(parts)
  jax.block_until_ready(bases.u)
  bases_s = time.perf_counter() - start
  idx = pairs.index_pairs(plan, keys)
  out = {"bases_s": bases_s, "representations": len(keys), "width": int(bases.u.shape[-1])}
  for name, fn in (("scores", lambda: svcca.pair_scores(bases, idx, metric=s.scoring.metric,
                                                        mesh=mesh)),
                   ("null", lambda: null.pair_null(bases, idx, perms, metric=s.scoring.metric,
                                                   mesh=mesh))):
    start = time.perf_counter()
    first = fn()
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    again = fn()
    out[f"{name}_s"] = time.perf_counter() - start
    out[f"{name}_compile_s"] = max(0.0, first_s - out[f"{name}_s"])
    out[f"{name}_values"] = again
  return out


def sweep(s, where, n, plan, perms, mesh) -> dict:
  chunks = pairs.chunk_plan(plan, max_pairs=s.run.chunk_pairs)
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    places = _places(s, where, n, plan, chunks)
    manager = scoring.checkpointer(Path(tmp))
    result = scoring.score_chunks(plan, chunks, places, scoring.fresh(len(plan)), manager,
                                  metric=s.scoring.metric, perms=perms, mesh=mesh,
                                  progress=False)
    return {"seconds": time.perf_counter() - start, "chunks": len(chunks), "arrays": result}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--run_dir", default="/tmp/sweep-speed-default")
  parser.add_argument("--name", default="sweep_pair_stage")
  args = parser.parse_args()
  s, where, n, plan, perms = _setup(Path(args.run_dir))
  mesh = pair_mesh(s.run.devices)[0]
  load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
  k = kernel(s, where, n, plan, perms, mesh)
  w = sweep(s, where, n, plan, perms, mesh)
  load_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
  count, b = len(plan), perms.shape[0]
  kernel_s = k["bases_s"] + k["scores_s"] + k["null_s"]
  score_diff = float(np.abs(w["arrays"]["score"] - k["scores_values"].score).max())
  null_diff = float(np.abs(w["arrays"]["null_mean"] - k["null_values"].null_mean).max())
  observed_diff = float(np.abs(k["null_values"].score - k["scores_values"].score).max())
  report = {
      "pairs": count, "permutations": b, "n": n, "chunks": w["chunks"],
      "representations": k["representations"], "kernel_width": k["width"],
      "kernel": {"bases_s": k["bases_s"], "pair_scores_s": k["scores_s"],
                 "pair_null_s": k["null_s"], "pair_scores_compile_s": k["scores_compile_s"],
                 "pair_null_compile_s": k["null_compile_s"], "total_s": kernel_s,
                 "pairs_per_s": count / kernel_s, "permuted_pairs_per_s": count * b / kernel_s},
      "sweep": {"total_s": w["seconds"], "pairs_per_s": count / w["seconds"],
                "permuted_pairs_per_s": count * b / w["seconds"]},
      "ratio_sweep_over_kernel": kernel_s / w["seconds"],
      "max_abs_score_diff_sweep_vs_kernel": score_diff,
      "max_abs_null_mean_diff_sweep_vs_kernel": null_diff,
      "max_abs_null_observed_vs_pair_scores": observed_diff,
      "checkpoint_seconds": settings.Run().checkpoint_seconds,
      "uptime_before": load_before, "uptime_after": load_after,
  }
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
  kr, sw = report["kernel"], report["sweep"]
  md = [f"# Sweep pair stage vs kernel ({count} pairs, {b} permutations, n={n}, "
        f"{w['chunks']} chunks)", "",
        f"Load: before `{load_before}`; after `{load_after}`.", "",
        "| | seconds | pairs/s | permuted pairs/s |", "|---|---|---|---|",
        f"| kernel (bases + pair_scores + pair_null, compile excluded) | {kernel_s:.2f} | "
        f"{kr['pairs_per_s']:.0f} | {kr['permuted_pairs_per_s']:.0f} |",
        f"| sweep pair stage (score_chunks, all included) | {sw['total_s']:.2f} | "
        f"{sw['pairs_per_s']:.0f} | {sw['permuted_pairs_per_s']:.0f} |", "",
        f"Sweep / kernel throughput: **{report['ratio_sweep_over_kernel']:.2f}**.", "",
        f"Kernel parts: bases {kr['bases_s']:.2f} s, pair_scores {kr['pair_scores_s']:.2f} s "
        f"(compile {kr['pair_scores_compile_s']:.2f} s), pair_null {kr['pair_null_s']:.2f} s "
        f"(compile {kr['pair_null_compile_s']:.2f} s).", "",
        f"Max |score| difference sweep vs kernel: {score_diff:.2e}; null mean: {null_diff:.2e}; "
        f"null's observed score vs pair_scores: {observed_diff:.2e}."]
  (RESULTS / f"{args.name}.md").write_text("\n".join(md) + "\n")
  print("\n".join(md))


if __name__ == "__main__":
  main()
