"""Permutation-null throughput through engine.svcca.calibrated, with the floor this machine sets.

For each workload: `svcca.calibrated` end to end (bases, the seeded permutations and every
pair's null) timed after a first, compiling call, wall and process CPU seconds; the null part
(`null.pair_null` on bases computed once) timed the same way; and the floor of each permuted
score, one small spectrum of the padded width K: a batch of exact singular values of that size
timed alone (CPU seconds per matrix), which caps the null at cores / that time whatever the
rest costs. Null means and sds of a few pairs are checked against a float64 NumPy computation
(its own SVDs, the same permutations). One run, JSON + markdown:

  PYTHONPATH=$PWD python -m benchmarks.null_bench            # benchmarks/results/null.*
  PYTHONPATH=$PWD python -m benchmarks.null_bench --quick    # toy sizes, a smoke test
"""
from __future__ import annotations

import json
import os
import platform
import time

import numpy as np
from absl import app, flags

from benchmarks.data import make_reps

flags.DEFINE_string("out", "benchmarks/results", "Output directory.")
flags.DEFINE_string("stem", "", "File name stem (default null, null_quick).")
flags.DEFINE_bool("quick", False, "Toy sizes: a smoke test of the whole benchmark.")
flags.DEFINE_integer("repeats", 2, "Timed calls after the first (median reported).",
                     lower_bound=1)
FLAGS = flags.FLAGS

# (R, n, d, data, permutations, metrics, target permuted scores/s or None). The first is the
# default sweep's shape (n=64, kept rank ~30), the second a paper-scale one (n=1000, k ~285).
WORKLOADS = [
    (30, 64, 128, "activations", 200, ("svcca", "pwcca", "cka", "cka_debiased"), 100_000),
    (6, 1000, 1024, "activations", 100, ("svcca", "pwcca"), 300),
]
QUICK = [(6, 32, 24, "activations", 20, ("svcca", "cka"), None)]
CHECK_PAIRS = 3


def _timed(fn, repeats: int) -> dict:
  """First call (compiles) and the median of `repeats` more, wall and process CPU seconds."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  walls, cpus = [], []
  for _ in range(repeats):
    w, c = time.perf_counter(), time.process_time()
    fn()
    walls.append(time.perf_counter() - w)
    cpus.append(time.process_time() - c)
  wall, cpu = float(np.median(walls)), float(np.median(cpus))
  return {"first_s": first, "wall_s": wall, "cpu_s": cpu, "compile_s": max(0.0, first - wall)}


def spectrum_floor(k: int, n: int, count: int = 64, seed: int = 0) -> float:
  """CPU seconds per exact singular-value problem of size k (cross products of orthonormal
  bases in R^n), unbatched LAPACK calls in one jitted program, as the null runs them on CPU."""
  import jax
  import jax.numpy as jnp
  rng = np.random.default_rng(seed)

  def orth():
    return np.linalg.qr(rng.standard_normal((n, k)))[0]
  ms = jnp.asarray(np.stack([orth().T @ orth() for _ in range(count)]).astype(np.float32))
  fn = jax.jit(lambda m: jax.lax.map(lambda x: jnp.linalg.svd(x, compute_uv=False), m))
  fn(ms).block_until_ready()
  cpus = []
  for _ in range(3):
    c = time.process_time()
    fn(ms).block_until_ready()
    cpus.append(time.process_time() - c)
  return float(np.median(cpus)) / count


def _reference_null(x: np.ndarray, y: np.ndarray, perms: np.ndarray, threshold: float):
  """float64 SVCCA of x against y with y's rows permuted: own SVDs, no kernel code."""
  def basis(a):
    a = a.astype(np.float64) - a.mean(axis=0)
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    frac = np.cumsum(s * s) / np.sum(s * s)
    return u[:, : int(np.sum(frac < threshold)) + 1]
  ua, ub = basis(x), basis(y)
  k = min(ua.shape[1], ub.shape[1])
  scores = [np.linalg.svd(ua.T @ ub[p], compute_uv=False)[:k].mean() for p in perms]
  return float(np.mean(scores)), float(np.std(scores, ddof=1))


def workload(r: int, n: int, d: int, data: str, count: int, metric: str, repeats: int) -> dict:
  from engine import null, pair_metrics, sharding, svcca
  reps = make_reps(r, n, d, data)
  pairs = pair_metrics.all_pairs(r)
  bases = svcca.compute_bases(reps, metric=metric)
  perms = null.permutations(n, count, 0)
  out = {"R": r, "n": n, "d": d, "data": data, "metric": metric, "permutations": count,
         "pairs": len(pairs), "K": int(bases.u.shape[-1]),
         "rank_mean": float(np.mean(np.asarray(bases.rank))), "cores": sharding.host_cores()}
  scored = len(pairs) * count  # permuted scores (the observed one per pair not counted)
  end = _timed(lambda: svcca.calibrated(reps, metric=metric, permutations=count, seed=0), repeats)
  part = _timed(lambda: null.pair_null(bases, pairs, perms, metric=metric), repeats)
  out["calibrated"] = {**end, "per_s": scored / end["wall_s"], "per_cpu_s": scored / end["cpu_s"]}
  out["null_only"] = {**part, "per_s": scored / part["wall_s"], "per_cpu_s": scored / part["cpu_s"]}
  if metric == "svcca":
    import jax
    if jax.default_backend() == "cpu":  # accelerators use GEMM-only nuclear norms instead
      floor = spectrum_floor(out["K"], n)
      out["spectrum_cpu_s"] = floor
      out["spectrum_cap_per_s"] = out["cores"] / floor
    got = null.pair_null(bases, pairs[:CHECK_PAIRS], perms, metric=metric)
    ref = [_reference_null(reps[i], reps[j], perms, 0.99) for i, j in pairs[:CHECK_PAIRS]]
    out["max_abs_diff_null_mean"] = float(np.max(np.abs(got.null_mean - [m for m, _ in ref])))
    out["max_abs_diff_null_sd"] = float(np.max(np.abs(got.null_sd - [s for _, s in ref])))
  return out


def markdown(report: dict) -> str:
  meta = report["meta"]
  lines = [
      "# Permutation-null throughput (`engine.svcca.calibrated`)", "",
      "Permuted pair scores per second (pairs x permutations; the observed score not counted), "
      "medians of timed calls after a first, compiling one; wall and process CPU seconds (all "
      "threads). `calibrated` includes the bases and drawing the permutations; `null only` is "
      "`null.pair_null` on bases computed once. Spectrum floor: CPU seconds of one exact "
      "singular-value problem of the padded width K, timed alone; cap = cores / floor, what "
      "the null could reach if everything else were free.", "",
      "| R | n | d | kept rank / K | metric | B | calibrated s (compile s) | per s | per CPU-s "
      "| null only s | per s | spectrum floor CPU-us (cap /s) | target /s | met | null mean / sd vs float64 |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for w in report["workloads"]:
    cal, part = w["calibrated"], w["null_only"]
    floor = (f"{w['spectrum_cpu_s'] * 1e6:.1f} ({w['spectrum_cap_per_s']:,.0f})"
             if "spectrum_cpu_s" in w else "")
    target = w.get("target_per_s")
    met = "" if target is None else ("yes" if cal["per_s"] >= target else "no")
    check = (f"{w['max_abs_diff_null_mean']:.1e} / {w['max_abs_diff_null_sd']:.1e}"
             if "max_abs_diff_null_mean" in w else "")
    lines.append(
        f"| {w['R']} | {w['n']} | {w['d']} | {w['rank_mean']:.0f} / {w['K']} | {w['metric']} | "
        f"{w['permutations']} | {cal['wall_s']:.2f} ({cal['compile_s']:.1f}) | "
        f"{cal['per_s']:,.0f} | {cal['per_cpu_s']:,.0f} | {part['wall_s']:.2f} | "
        f"{part['per_s']:,.0f} | {floor} | {'' if target is None else f'{target:,}'} | {met} | "
        f"{check} |")
  lines += ["", f"Machine: {meta['machine']}, {meta['cpus']} CPUs, JAX {meta['jax']} on "
            f"{meta['backend']}; {meta['date']}; run took {meta['wall_s']:.0f} s; load average "
            f"(1, 5, 15 min) {'/'.join(f'{x:.1f}' for x in meta['load_average_start'])} at start, "
            f"{'/'.join(f'{x:.1f}' for x in meta['load_average'])} at end."]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  import jax
  start, load = time.perf_counter(), os.getloadavg()
  results = []
  for r, n, d, data, count, metrics, target in (QUICK if FLAGS.quick else WORKLOADS):
    for metric in metrics:
      print(f"R={r} n={n} d={d} {metric} B={count}", flush=True)
      results.append({**workload(r, n, d, data, count, metric, FLAGS.repeats),
                      "target_per_s": target if metric == "svcca" else None})
  from importlib import metadata
  meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "backend": jax.default_backend(),
          "jax": metadata.version("jax"), "date": time.strftime("%Y-%m-%d %H:%M"),
          "load_average_start": load, "load_average": os.getloadavg(),
          "wall_s": time.perf_counter() - start, "quick": FLAGS.quick}
  report = {"meta": meta, "workloads": results}
  os.makedirs(FLAGS.out, exist_ok=True)
  stem = os.path.join(FLAGS.out, FLAGS.stem or ("null_quick" if FLAGS.quick else "null"))
  with open(stem + ".json", "w") as f:
    json.dump(report, f, indent=1)
  table = markdown(report)
  with open(stem + ".md", "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  app.run(main)
