r"""All-pairs SVCCA: this kernel against the field's per-pair NumPy reference, in one run.

  python -m benchmarks.svcca_bench                     # R=60, n=1000, d=256
  python -m benchmarks.svcca_bench --dims=256,1024 --reference_pairs=40
  python -m benchmarks.svcca_bench --quick             # a smoke test in seconds

The reference costs ~0.1-1 s a pair, so by default it is timed on a random sample of the
pairs and its per-pair median is multiplied out; `--reference_pairs=0` times all of them.
Writes JSON and a markdown table under --out.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("reps", 60, "Representations R (all R(R-1)/2 pairs are scored).")
flags.DEFINE_integer("samples", 1000, "Sentences n.")
flags.DEFINE_list("dims", ["256"], "Widths d, one workload each.")
flags.DEFINE_enum("data", "gaussian", ["gaussian", "activations"],
                  "gaussian: i.i.d. (kept rank ~ d, the worst case); activations: a shared "
                  "latent with a decaying spectrum plus noise, like real layer outputs.")
flags.DEFINE_float("threshold", 0.99, "SVCCA variance threshold.")
flags.DEFINE_integer("repeats", 3, "Timed repeats of the kernel (median reported).")
flags.DEFINE_integer("reference_pairs", 24, "Pairs timed for the reference; 0 = all.")
flags.DEFINE_integer("devices", 0, "Simulated CPU devices (0: leave JAX's default).")
flags.DEFINE_string("out", "benchmarks/results", "Output directory.")
flags.DEFINE_bool("quick", False, "Tiny sizes: a smoke test of the whole benchmark.")


def make_reps(r: int, n: int, d: int, kind: str, seed: int = 0):
  import numpy as np
  rng = np.random.default_rng(seed)
  if kind == "gaussian":
    return rng.standard_normal((r, n, d)).astype(np.float32)
  latent = rng.standard_normal((n, d)) * np.geomspace(1.0, 1e-3, d)
  reps = np.empty((r, n, d), np.float32)
  for i in range(r):
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    reps[i] = latent @ mix + 0.01 * rng.standard_normal((n, d))
  return reps


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
  """The machine's float32 GEMM rate at HIGHEST precision, through the same XLA backend."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((size, size), jnp.float32)
  f = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
  f(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * size**3 / statistics.median(times) / 1e9


def pair_flops(n: int, k: int) -> float:
  """GEMM U_a^T U_b (2nk^2), Gram M^T M (2k^3), eigenvalues of a k x k matrix (~4/3 k^3)."""
  return 2 * n * k * k + 2 * k**3 + 4 / 3 * k**3


def bench_kernel(reps, threshold: float, repeats: int) -> dict:
  import jax
  import numpy as np

  from engine import sharding, svcca
  pairs = svcca.all_pairs(reps.shape[0])
  mesh = sharding.pair_mesh()

  def run():
    t0 = time.perf_counter()
    bases = svcca.compute_bases(reps, threshold=threshold, warn=False)
    jax.block_until_ready(bases.u)
    t1 = time.perf_counter()
    scores = svcca.pair_scores(bases, pairs, mesh=mesh).score
    t2 = time.perf_counter()
    return scores, bases, t1 - t0, t2 - t1

  t = time.perf_counter()
  scores, bases, _, _ = run()  # compiles
  compile_s = time.perf_counter() - t
  runs = [run() for _ in range(repeats)]
  base_s = statistics.median(r[2] for r in runs)
  pair_s = statistics.median(r[3] for r in runs)
  k = bases.u.shape[-1]
  flops = len(pairs) * pair_flops(reps.shape[1], k)
  return {"scores": scores, "pairs": len(pairs), "padded_rank": int(k),
          "mean_rank": float(np.mean(np.asarray(bases.rank))),
          "first_call_s": compile_s, "bases_s": base_s, "pairs_s": pair_s,
          "total_s": base_s + pair_s, "pair_stage_gflops": flops / pair_s / 1e9,
          "devices": sharding.device_summary(mesh)}


def bench_reference(reps, threshold: float, sample: int, seed: int = 0) -> dict:
  import numpy as np

  from benchmarks import google_svcca
  from engine import svcca
  pairs = svcca.all_pairs(reps.shape[0])
  if sample and sample < len(pairs):
    pairs = pairs[np.random.default_rng(seed).choice(len(pairs), sample, replace=False)]
  times, scores = [], []
  for i, j in pairs:
    t = time.perf_counter()
    scores.append(google_svcca.svcca(reps[i], reps[j], threshold))
    times.append(time.perf_counter() - t)
  per_pair = statistics.median(times)
  total_pairs = reps.shape[0] * (reps.shape[0] - 1) // 2
  return {"timed_pairs": len(pairs), "per_pair_s": per_pair,
          "total_s": per_pair * total_pairs, "extrapolated": len(pairs) < total_pairs,
          "pairs": pairs, "scores": np.asarray(scores)}


def workload(r: int, n: int, d: int) -> dict:
  reps = make_reps(r, n, d, FLAGS.data)
  kernel = bench_kernel(reps, FLAGS.threshold, FLAGS.repeats)
  ref = bench_reference(reps, FLAGS.threshold, FLAGS.reference_pairs)
  from engine import svcca
  index = {tuple(p): s for p, s in zip(svcca.all_pairs(r).tolist(), kernel["scores"])}
  diff = max(abs(index[tuple(p)] - s) for p, s in zip(ref["pairs"].tolist(), ref["scores"]))
  out = {k: v for k, v in kernel.items() if k != "scores"}
  out.update({"R": r, "n": n, "d": d, "data": FLAGS.data,
              "reference_per_pair_s": ref["per_pair_s"], "reference_total_s": ref["total_s"],
              "reference_timed_pairs": ref["timed_pairs"],
              "reference_extrapolated": ref["extrapolated"],
              "speedup": ref["total_s"] / kernel["total_s"],
              "max_abs_diff_vs_reference": float(diff)})
  return out


def markdown(results: list[dict], gemm: float) -> str:
  rows = ["| R | n | d | data | pairs | kept rank (mean / padded) | bases s | pairs s | kernel s "
          "| reference s/pair | reference s | speedup | pair stage GFLOP/s | % of GEMM | max diff |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    rows.append(
        f"| {r['R']} | {r['n']} | {r['d']} | {r['data']} | {r['pairs']} | "
        f"{r['mean_rank']:.0f} / {r['padded_rank']} | {r['bases_s']:.2f} | {r['pairs_s']:.2f} | "
        f"{r['total_s']:.2f} | {r['reference_per_pair_s']:.3f} | "
        f"{r['reference_total_s']:.0f}{'*' if r['reference_extrapolated'] else ''} | "
        f"{r['speedup']:.0f}x | {r['pair_stage_gflops']:.1f} | "
        f"{100 * r['pair_stage_gflops'] / gemm:.0f}% | {r['max_abs_diff_vs_reference']:.1e} |")
  note = (f"\nMeasured float32 GEMM (2048^3, HIGHEST precision): {gemm:.1f} GFLOP/s. "
          "Kernel times are medians of repeats after a compiling call; * = reference per-pair "
          "median times all pairs.\n")
  return "\n".join(rows) + "\n" + note


def main(argv):
  del argv
  if FLAGS.devices:
    from engine import sharding
    sharding.simulate_cpu_devices(FLAGS.devices)
  r, n, dims = FLAGS.reps, FLAGS.samples, [int(d) for d in FLAGS.dims]
  if FLAGS.quick:
    r, n, dims = 8, 200, [32]
  gemm = matmul_gflops(512 if FLAGS.quick else 2048)
  results = [workload(r, n, d) for d in dims]
  os.makedirs(FLAGS.out, exist_ok=True)
  stem = os.path.join(FLAGS.out, "svcca_quick" if FLAGS.quick else "svcca")
  meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "matmul_gflops": gemm,
          "date": time.strftime("%Y-%m-%d")}
  with open(stem + ".json", "w") as f:
    json.dump({"meta": meta, "results": results}, f, indent=2)
  table = markdown(results, gemm)
  with open(stem + ".md", "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  app.run(main)
