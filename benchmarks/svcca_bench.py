r"""All-pairs SVCCA: this kernel against the ways the field computes it, in one run.

  python -m benchmarks.svcca_bench                 # paper-scale shapes + scaling curves
  python -m benchmarks.svcca_bench --quick         # the whole benchmark at toy sizes (< 60 s)
  python -m benchmarks.svcca_bench --curves= --samples=1000 --dims=1024   # one workload

Measured in the same run, on the same data:
- the kernel (engine.svcca): bases stage and pair stage timed separately (medians of repeats
  after a first call), with compile time taken from JAX's compile events;
- the field's reference: google/svcca's per-pair algorithm in NumPy (benchmarks.google_svcca);
- a naive per-pair JAX port and a per-pair PyTorch version (benchmarks.baselines);
- `repsim` (PyPI, C++/Eigen all-pairs), when installed and the shape is small enough.
Per-pair methods cost the same for every pair of a shape, so they are timed on a random sample
of pairs (at most --baseline_pairs, within --baseline_budget_s) and their median is multiplied
by the number of pairs; such totals are marked '*'. Scaling curves in R, n, d and device count
(each device count in its own process with simulated CPU devices) and a profile of where the
kernel's time goes complete the picture. Writes svcca[_quick].{json,md,png} under --out.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from benchmarks.data import make_reps

FLAGS = flags.FLAGS
flags.DEFINE_integer("reps", 60, "Representations R of the paper-scale workloads.")
flags.DEFINE_list("samples", ["1000", "2000"], "Sentences n of the paper-scale workloads.")
flags.DEFINE_list("dims", ["256", "1024", "4096"], "Widths d of the paper-scale workloads.")
flags.DEFINE_enum("data", "activations", ["gaussian", "activations"],
                  "activations: a latent with a decaying spectrum, mixed per representation, "
                  "plus noise (kept rank ~ d/3, like layer outputs); gaussian: i.i.d. (kept "
                  "rank ~ min(n, d), the worst case for the kernel).")
flags.DEFINE_float("threshold", 0.99, "SVCCA variance threshold.")
flags.DEFINE_integer("repeats", 3, "Timed kernel runs after the first (median reported).")
flags.DEFINE_float("kernel_budget_s", 300.0,
                   "Stop repeating a kernel workload once its timed runs pass this; if the first "
                   "call alone ran longer, it is the measurement (less its compile time).")
flags.DEFINE_list("baselines", ["numpy_once", "torch_once", "reference", "naive_jax", "torch",
                                "repsim"], "Methods to time beside the kernel.")
flags.DEFINE_integer("baseline_pairs", 8, "Most pairs timed per baseline and shape.")
flags.DEFINE_float("baseline_budget_s", 60.0, "Stop timing a baseline's pairs past this (>= 2).")
flags.DEFINE_integer("gemm_size", 2048, "Square float32 GEMM timed as the machine's ceiling.")
flags.DEFINE_string("torch_device", "cpu", "Device of the PyTorch baseline (cpu, cuda).")
flags.DEFINE_integer("repsim_max_width", 256,
                     "repsim (Jacobi SVDs) is timed only where min(n, d) is at most this.")
flags.DEFINE_list("curves", ["R", "n", "d", "devices"], "Scaling curves to measure.")
flags.DEFINE_list("curve_base", ["60", "1000", "256"], "R, n, d held fixed along the curves.")
flags.DEFINE_list("curve_R", ["8", "16", "32", "60", "120"], "R values of the R curve.")
flags.DEFINE_list("curve_n", ["250", "500", "1000", "2000"], "n values of the n curve.")
flags.DEFINE_list("curve_d", ["64", "128", "256", "512", "1024"], "d values of the d curve.")
flags.DEFINE_list("curve_devices", ["1", "2", "4", "8"], "Simulated CPU device counts.")
flags.DEFINE_integer("device_timeout_s", 900, "Limit for each device-count subprocess.")
flags.DEFINE_bool("profile", True, "Trace the kernel on one workload (where time goes).")
flags.DEFINE_list("profile_shape", ["60", "1000", "1024"], "R, n, d of the profiled workload.")
flags.DEFINE_integer("devices", 0, "Simulated CPU devices for this process (0: JAX's default).")
flags.DEFINE_integer("blas_threads", 0,
                     "Threads for OpenBLAS/OpenMP/MKL (NumPy, LAPACK under JAX, PyTorch), the "
                     "same for every method; 0 leaves the libraries' defaults (--quick: 1). On "
                     "a small machine shared with other work, 2 threads thrash.")
flags.DEFINE_string("out", "benchmarks/results", "Output directory.")
flags.DEFINE_string("stem", "", "File name stem of the results (default svcca, svcca_quick).")
flags.DEFINE_bool("quick", False, "Toy sizes: a smoke test of the whole benchmark.")
flags.DEFINE_string("render", "",
                    "Re-derive the FLOP columns of an existing results JSON and rewrite it with "
                    "its markdown and PNG (no measuring).")
flags.DEFINE_string("worker_out", "", "Internal: measure the kernel only, write JSON here.")

# Every new shape compiles the kernel anew (~10 s each on a busy 2-core machine), so --quick
# runs one shape, here and on 2 devices in a subprocess: its curves are single points.
QUICK = {"reps": 8, "samples": [200], "dims": [32], "curve_base": (8, 200, 32),
         "curve_R": [8], "curve_n": [200], "curve_d": [32], "curve_devices": [1, 2],
         "profile_shape": (8, 200, 32), "baseline_pairs": 3, "repeats": 2}
METHODS = ("numpy_once", "torch_once", "reference", "naive_jax", "torch", "repsim")
ALL_PAIRS = ("numpy_once", "torch_once")  # timed on every pair, bases once
LABELS = {"kernel": "this kernel", "numpy_once": "NumPy, bases once + batched svdvals",
          "torch_once": "PyTorch, bases once + batched svdvals",
          "reference": "google/svcca (NumPy, per pair)",
          "naive_jax": "naive JAX (jit per pair)", "torch": "PyTorch (per pair)",
          "repsim": "repsim (C++, all pairs)"}


# ----------------------------------------------------------------------------- kernel

_COMPILE_EVENTS: list[tuple[float, float]] = []  # (time seen, seconds)


def _listen_for_compiles() -> None:
  from jax import monitoring

  def on_event(name: str, seconds: float, **_) -> None:
    if name.startswith("/jax/core/compile/"):
      _COMPILE_EVENTS.append((time.perf_counter(), seconds))
  if not getattr(_listen_for_compiles, "done", False):
    monitoring.register_event_duration_secs_listener(on_event)
    _listen_for_compiles.done = True


_START = time.perf_counter()


def _log(msg: str) -> None:
  print(f"[{time.perf_counter() - _START:6.1f} s] {msg}", flush=True)


def _compile_s(since: float, until: float) -> float:
  return sum(s for t, s in _COMPILE_EVENTS if since <= t <= until)


def roofline_fields(r: int, n: int, d: int, k: int, bases_s: float, pairs_s: float,
                    gemm: float | None = None) -> dict:
  """FLOPs of both stages, their rates and (given the GEMM rate) their share of it."""
  from benchmarks import roofline
  flops_b = roofline.bases_flops(r, n, d)
  flops_p = r * (r - 1) // 2 * roofline.pair_flops(n, k)
  out = {"bases_gflop": flops_b / 1e9, "pairs_gflop": flops_p / 1e9,
         "bases_gflops": flops_b / bases_s / 1e9, "pairs_gflops": flops_p / pairs_s / 1e9}
  if gemm:
    out.update({"bases_pct_gemm": 100 * out["bases_gflops"] / gemm,
                "pairs_pct_gemm": 100 * out["pairs_gflops"] / gemm})
  return out


def bench_kernel(reps, threshold: float, repeats: int, budget_s: float, mesh=None) -> dict:
  """Bases and pair stage of the kernel: medians over runs after a first (compiling) call."""
  import jax
  import numpy as np

  from engine import sharding, svcca
  _listen_for_compiles()
  pairs = svcca.all_pairs(reps.shape[0])
  mesh = mesh or sharding.pair_mesh()

  cpu: list[tuple[float, float]] = []  # process CPU seconds of each stage, per timed run

  def run():
    c0, t0 = time.process_time(), time.perf_counter()
    bases = svcca.compute_bases(reps, threshold=threshold, warn=False)
    jax.block_until_ready(bases.u)
    c1, t1 = time.process_time(), time.perf_counter()
    scores = svcca.pair_scores(bases, pairs, mesh=mesh).score
    c2, t2 = time.process_time(), time.perf_counter()
    cpu.append((c1 - c0, c2 - c1))
    return scores, bases, (t0, t1, t2)

  scores, bases, (t0, t1, t2) = run()
  first = {"first_bases_s": t1 - t0, "first_pairs_s": t2 - t1,
           "compile_bases_s": _compile_s(t0, t1), "compile_pairs_s": _compile_s(t1, t2)}
  runs, spent = [], 0.0
  first_exec = (t2 - t0) - first["compile_bases_s"] - first["compile_pairs_s"]
  if first_exec <= budget_s:
    while len(runs) < max(repeats, 1) and (not runs or spent < budget_s):
      _, _, (a, b, c) = run()
      runs.append((b - a, c - b))
      spent += c - a
  timed_cpu = cpu[1:] or cpu
  cpu_fields = {"bases_cpu_s": statistics.median(c[0] for c in timed_cpu),
                "pairs_cpu_s": statistics.median(c[1] for c in timed_cpu)}
  if runs:
    bases_s = statistics.median(r[0] for r in runs)
    pairs_s = statistics.median(r[1] for r in runs)
  else:  # one run past the budget: its first call, less the compile time JAX reported
    bases_s = first["first_bases_s"] - first["compile_bases_s"]
    pairs_s = first["first_pairs_s"] - first["compile_pairs_s"]
  r, n, d = reps.shape
  k = int(bases.u.shape[-1])
  rank = np.asarray(bases.rank, np.float64)
  useful = 2.0 * n * float(rank[pairs[:, 0]] @ rank[pairs[:, 1]])  # 2 n k_a k_b, actual ranks
  return {"scores": scores, **cpu_fields, "useful_pairs_gflop": useful / 1e9,
          "useful_pairs_gflops": useful / pairs_s / 1e9, "pairs": len(pairs), "padded_rank": k,
          "mean_rank": float(np.mean(np.asarray(bases.rank))), "ranks": np.asarray(bases.rank),
          "runs": len(runs), "bases_s": bases_s, "pairs_s": pairs_s, "total_s": bases_s + pairs_s,
          **first, **roofline_fields(r, n, d, k, bases_s, pairs_s), "devices": sharding.device_summary(mesh), "device_count": int(mesh.size)}


# ----------------------------------------------------------------------------- baselines


def _per_pair(method: str):
  from benchmarks import baselines, google_svcca
  torch_device = FLAGS.torch_device if FLAGS.is_parsed() else "cpu"
  return {"reference": google_svcca.svcca, "naive_jax": baselines.naive_jax,
          "torch": functools.partial(baselines.torch_svcca, device=torch_device)}[method]


def bench_per_pair(method: str, reps, threshold: float, max_pairs: int, budget_s: float,
                   seed: int = 0) -> dict:
  """Median seconds per pair on a random sample of pairs, and the sampled scores."""
  import numpy as np

  from engine import svcca
  fn = _per_pair(method)
  pairs = svcca.all_pairs(reps.shape[0])
  order = np.random.default_rng(seed).permutation(len(pairs))[:max_pairs]
  warm_s = None
  if method == "naive_jax":  # compiles once per shape; the compile is reported, not averaged in
    t = time.perf_counter()
    fn(reps[pairs[order[0], 0]], reps[pairs[order[0], 1]], threshold)
    warm_s = time.perf_counter() - t
  times, scores, spent = [], [], 0.0
  for idx in order:
    i, j = pairs[idx]
    t = time.perf_counter()
    scores.append(fn(reps[i], reps[j], threshold))
    times.append(time.perf_counter() - t)
    spent += times[-1]
    if len(times) >= 2 and spent > budget_s:
      break
  return {"per_pair_s": statistics.median(times), "timed_pairs": len(times),
          "first_call_s": warm_s, "pairs": pairs[order[:len(times)]], "scores": np.asarray(scores)}


def bench_bases_once(method: str, reps, threshold: float) -> dict:
  """A like-for-like baseline over every pair, timed once (it takes ~20 s at paper scale)."""
  from benchmarks import baselines
  torch_device = FLAGS.torch_device if FLAGS.is_parsed() else "cpu"
  fn = {"numpy_once": baselines.numpy_bases_once,
        "torch_once": functools.partial(baselines.torch_bases_once, device=torch_device)}[method]
  fn(reps[:2], threshold)  # imports and first-call set-up, not timed
  timings: dict = {}
  cpu = time.process_time()
  scores = fn(reps, threshold, timings=timings)
  timings["cpu_s"] = time.process_time() - cpu
  return {"total_s": timings["bases_s"] + timings["pairs_s"], **timings, "scores": scores}


def bench_repsim(reps, threshold: float) -> dict:
  """repsim's all-pairs call on 1 and 2 representations, fitted to a per-basis + per-pair cost.

  T(M) = M a + M(M+1)/2 b (it also scores each representation with itself), so T(1) = a + b
  and T(2) = 2a + 3b.
  """
  import numpy as np

  from benchmarks import baselines
  if threshold != 0.99:
    return {"skipped": "repsim fixes the threshold at 0.99"}
  times = {}
  for m in (1, 2):
    t = time.perf_counter()
    out = baselines.repsim_svcca(reps[:m])
    times[m] = time.perf_counter() - t
  b = max(times[2] - 2 * times[1], 0.0)
  a = max(times[1] - b, 0.0)
  return {"per_basis_s": a, "per_pair_s": b, "score_01": float(np.asarray(out)[0, 1])}


def baseline_totals(name: str, result: dict, r: int) -> dict:
  pairs = r * (r - 1) // 2
  if name == "repsim":
    if "skipped" in result:
      return {"total_s": None, "note": result["skipped"]}
    return {"total_s": r * result["per_basis_s"] + r * (r + 1) / 2 * result["per_pair_s"],
            "note": "fitted from 1 and 2 representations"}
  return {"total_s": result["per_pair_s"] * pairs, "per_pair_s": result["per_pair_s"],
          "timed_pairs": result["timed_pairs"], "extrapolated": result["timed_pairs"] < pairs,
          "first_call_s": result["first_call_s"]}


# ----------------------------------------------------------------------------- workloads


class Runner:
  """Measures workloads, sharing data, kernel results and per-pair baseline timings by shape."""

  def __init__(self, cfg: dict, gemm: float):
    self.cfg, self.gemm = cfg, gemm
    self.kernel_cache: dict = {}
    self.baseline_cache: dict = {}

  def reps(self, r, n, d):
    return make_reps(r, n, d, self.cfg["data"])

  def workload(self, r: int, n: int, d: int, baselines: list[str]) -> dict:
    import numpy as np

    from benchmarks import baselines as bl
    from engine import svcca
    cfg = self.cfg
    data = self.reps(r, n, d)
    key = (r, n, d)
    if key not in self.kernel_cache:
      _log(f"kernel R={r} n={n} d={d}")
      self.kernel_cache[key] = bench_kernel(data, cfg["threshold"], cfg["repeats"],
                                            cfg["kernel_budget_s"])
    kernel = self.kernel_cache[key]
    index = {tuple(p): s for p, s in zip(svcca.all_pairs(r).tolist(), kernel["scores"])}
    out = {"R": r, "n": n, "d": d, "data": cfg["data"],
           **{k: v for k, v in kernel.items() if k not in ("scores", "ranks")},
           **roofline_fields(r, n, d, kernel["padded_rank"], kernel["bases_s"],
                             kernel["pairs_s"], self.gemm), "methods": {}}
    for name in baselines:
      if name in ALL_PAIRS:
        bkey = (name, r, n, d)
        if bkey not in self.baseline_cache:
          _log(f"  {name} R={r} n={n} d={d}")
          self.baseline_cache[bkey] = bench_bases_once(name, data, cfg["threshold"])
        res = self.baseline_cache[bkey]
        entry = {k: v for k, v in res.items() if k != "scores"}
        entry["max_abs_diff_vs_kernel"] = float(np.max(np.abs(res["scores"] - kernel["scores"])))
        entry["kernel_speedup"] = entry["total_s"] / kernel["total_s"]
        entry["bases_speedup"] = entry["bases_s"] / kernel["bases_s"]
        entry["pairs_speedup"] = entry["pairs_s"] / kernel["pairs_s"]
        out["methods"][name] = entry
        continue
      if name == "repsim":
        if not bl.repsim_available():
          out["methods"][name] = {"total_s": None, "note": "not installed (pip install repsim)"}
          continue
        if min(n, d) > cfg["repsim_max_width"]:
          out["methods"][name] = {"total_s": None,
                                  "note": f"min(n, d) > {cfg['repsim_max_width']}: Jacobi SVDs "
                                          "too slow to time here"}
          continue
      bkey = (name, n, d)
      if bkey not in self.baseline_cache:  # per-pair cost depends on the shape, not on R
        _log(f"  {name} n={n} d={d}")
        self.baseline_cache[bkey] = (bench_repsim(data, cfg["threshold"]) if name == "repsim"
                                     else bench_per_pair(name, data, cfg["threshold"],
                                                         cfg["baseline_pairs"],
                                                         cfg["baseline_budget_s"]))
      res = self.baseline_cache[bkey]
      entry = baseline_totals(name, res, r)
      if "pairs" in res and max(res["pairs"].max(), 0) < r:
        diffs = [abs(index[tuple(p)] - s) for p, s in zip(res["pairs"].tolist(), res["scores"])]
        entry["max_abs_diff_vs_kernel"] = float(max(diffs))
      if entry.get("total_s"):
        entry["kernel_speedup"] = entry["total_s"] / kernel["total_s"]
      out["methods"][name] = entry
    ref = self.baseline_cache.get(("reference", n, d))
    if ref is not None and ref["pairs"].max() < r:
      out["check"] = {"pairs": ref["pairs"].tolist(), "reference": ref["scores"].tolist(),
                      "kernel": [float(index[tuple(p)]) for p in ref["pairs"].tolist()]}
      out["max_abs_diff_vs_reference"] = float(
          np.max(np.abs(np.asarray(out["check"]["kernel"]) - ref["scores"])))
    return out


def device_curve(counts: list[int], runner: Runner) -> list[dict]:
  """Each device count in a fresh process (XLA fixes the CPU device count at start-up); the
  count this process already has is measured here."""
  import jax
  cfg = runner.cfg
  r, n, d = cfg["curve_base"]
  rows = []
  for count in counts:
    if count == len(jax.devices()):
      w = runner.workload(r, n, d, [])
      rows.append({k: w[k] for k in ("R", "n", "d", "bases_s", "pairs_s", "total_s", "runs",
                                     "devices", "device_count", "compile_bases_s",
                                     "compile_pairs_s")})
      continue
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "worker.json")
      cmd = [sys.executable, "-m", "benchmarks.svcca_bench", f"--devices={count}",
             f"--worker_out={path}", f"--reps={r}", f"--samples={n}", f"--dims={d}",
             f"--data={cfg['data']}", f"--threshold={cfg['threshold']}",
             f"--repeats={cfg['repeats']}", f"--kernel_budget_s={cfg['kernel_budget_s']}",
             f"--blas_threads={cfg['blas_threads']}"]
      _log(f"kernel on {count} devices (subprocess)")
      t = time.perf_counter()
      try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg["device_timeout_s"])
      except subprocess.TimeoutExpired:
        rows.append({"device_count": count, "error": f"timed out after {cfg['device_timeout_s']} s"})
        continue
      if proc.returncode != 0 or not os.path.exists(path):
        rows.append({"device_count": count, "error": proc.stderr.strip()[-500:]})
        continue
      with open(path) as f:
        row = json.load(f)
      row["process_s"] = time.perf_counter() - t
      rows.append(row)
  return rows


def worker() -> None:
  """One kernel workload on this process's devices, written as JSON (for the device curve)."""
  import jax
  r, n, d = FLAGS.reps, int(FLAGS.samples[0]), int(FLAGS.dims[0])
  res = bench_kernel(make_reps(r, n, d, FLAGS.data), FLAGS.threshold, FLAGS.repeats,
                     FLAGS.kernel_budget_s)
  out = {k: v for k, v in res.items() if k not in ("scores", "ranks")}
  out.update({"R": r, "n": n, "d": d, "jax_devices": len(jax.devices())})
  with open(FLAGS.worker_out, "w") as f:
    json.dump(out, f)


# ----------------------------------------------------------------------------- report


def _s(x) -> str:
  if x is None:
    return "-"
  return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _method_cell(entry: dict | None) -> str:
  if not entry or entry.get("total_s") is None:
    return "-"
  mark = "*" if entry.get("extrapolated") else ("†" if "per_basis_s" in entry or
                                                 entry.get("note", "").startswith("fitted") else "")
  ratio = entry["kernel_speedup"]
  return f"{_s(entry['total_s'])}{mark} ({ratio:.0f}x)" if ratio >= 10 else \
      f"{_s(entry['total_s'])}{mark} ({ratio:.1f}x)"


def markdown(report: dict) -> str:
  meta, lines = report["meta"], []
  methods = [m for m in METHODS if m in meta["baselines"]]
  lines += [f"## Paper-scale workloads (data: {meta['data']}, threshold {meta['threshold']})", "",
            "Seconds for all R(R-1)/2 pairs; in brackets how many times slower than the kernel.",
            "", "| R | n | d | pairs | kept rank mean / K | kernel bases s | kernel pairs s | "
            "kernel total s | compile s | " + " | ".join(LABELS[m] for m in methods) + " |",
            "|" + "---|" * (9 + len(methods))]
  for w in report["paper"]:
    lines.append(
        f"| {w['R']} | {w['n']} | {w['d']} | {w['pairs']} | {w['mean_rank']:.0f} / "
        f"{w['padded_rank']} | {_s(w['bases_s'])} | {_s(w['pairs_s'])} | {_s(w['total_s'])}"
        f"{'‡' if not w['runs'] else ''} | "
        f"{_s(w['compile_bases_s'] + w['compile_pairs_s'])} | "
        + " | ".join(_method_cell(w["methods"].get(m)) for m in methods) + " |")
  for w in report["paper"]:
    if "useful_pairs_gflops" in w:
      w["useful_pairs_pct_gemm"] = 100 * w["useful_pairs_gflops"] / meta["gemm_gflops"]
  like = [m for m in methods if m in ALL_PAIRS]
  if like:
    lines += ["", "## Like for like: bases once, batched pair spectra", "",
              "Each method's bases (one SVD per representation) and pair stage timed "
              "separately, over every pair, in this run; in brackets how many times slower "
              "than the kernel's same stage. Kernel times exclude compilation (its compile "
              "column); the pair stage's GEMM share counts only useful FLOPs, 2 n k_a k_b "
              "per pair at the actual kept ranks.", "",
              "| R | n | d | kernel bases s | kernel pairs s | kernel total s | compile s | "
              "pairs useful GFLOP/s (% GEMM) | "
              + " | ".join(f"{LABELS[m]}: bases s / pairs s / total s | max abs diff" for m in like)
              + " |", "|" + "---|" * (8 + 2 * len(like))]
    cpu_notes: list[str] = []
    for w in report["paper"]:
      cells = []
      for m in like:
        e = w["methods"].get(m) or {}
        if e.get("total_s") is None:
          cells += ["-", "-"]
          continue
        cells += [f"{_s(e['bases_s'])} ({e['bases_speedup']:.1f}x) / {_s(e['pairs_s'])} "
                  f"({e['pairs_speedup']:.1f}x) / {_s(e['total_s'])} "
                  f"({e['kernel_speedup']:.1f}x)", f"{e['max_abs_diff_vs_kernel']:.1e}"]
      useful = (f"{w['useful_pairs_gflops']:.0f} ({w['useful_pairs_pct_gemm']:.0f}%)"
                if "useful_pairs_gflops" in w else "-")
      if "bases_cpu_s" in w:
        cpu_notes.append(f"R={w['R']} n={w['n']} d={w['d']}: kernel "
                         f"{w['bases_cpu_s'] + w['pairs_cpu_s']:.3g} (bases "
                         f"{w['bases_cpu_s']:.3g}, pairs {w['pairs_cpu_s']:.3g})"
                         + "".join(f", {m} {w['methods'][m]['cpu_s']:.3g}" for m in like
                                   if "cpu_s" in (w["methods"].get(m) or {})))
      lines.append(f"| {w['R']} | {w['n']} | {w['d']} | {_s(w['bases_s'])} | {_s(w['pairs_s'])} "
                   f"| {_s(w['total_s'])} | {_s(w['compile_bases_s'] + w['compile_pairs_s'])} "
                   f"| {useful} | " + " | ".join(cells) + " |")
    if cpu_notes:
      lines += ["", "Process CPU seconds (all threads; on a loaded machine the work done, "
                "whatever the share of the cores it got): " + "; ".join(cpu_notes) + "."]
  lines += ["", "## Roofline and agreement", "",
            f"Measured float32 GEMM (XLA, {meta['gemm_size']}^3, HIGHEST precision, "
            f"{meta['backend']}): **{meta['gemm_gflops']:.1f} "
            "GFLOP/s**. FLOPs: bases = R thin SVDs (LAPACK gesdd's count, see "
            "benchmarks/roofline.py); pairs "
            "= per pair 2nK^2 (U_a^T U_b) + 8/3 K^3 (bidiagonalising it for its singular values), "
            "K the padded width computed with.", "",
            "| R | n | d | bases GFLOP | bases GFLOP/s | bases % GEMM | pairs GFLOP | "
            "pairs GFLOP/s | pairs % GEMM | max abs diff vs reference (pairs) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
  for w in report["paper"]:
    ref = w["methods"].get("reference", {})
    lines.append(
        f"| {w['R']} | {w['n']} | {w['d']} | {w['bases_gflop']:.1f} | {w['bases_gflops']:.1f} | "
        f"{w['bases_pct_gemm']:.0f}% | {w['pairs_gflop']:.1f} | {w['pairs_gflops']:.1f} | "
        f"{w['pairs_pct_gemm']:.0f}% | "
        + (f"{w['max_abs_diff_vs_reference']:.1e} ({ref.get('timed_pairs')})"
           if "max_abs_diff_vs_reference" in w else "-") + " |")
  for axis, rows in report["curves"].items():
    if not rows:
      continue
    lines += ["", f"## Scaling in {axis}", ""]
    if axis == "devices":
      lines += ["| devices | kernel bases s | kernel pairs s | pairs speedup vs 1 | note |",
                "|---|---|---|---|---|"]
      one = next((r["pairs_s"] for r in rows if r.get("device_count") == 1 and "pairs_s" in r), None)
      for r in rows:
        if "error" in r:
          lines.append(f"| {r['device_count']} | - | - | - | {r['error'][:80]} |")
        else:
          ratio = f"{one / r['pairs_s']:.2f}x" if one else "-"
          lines.append(f"| {r['device_count']} | {_s(r['bases_s'])} | {_s(r['pairs_s'])} | "
                       f"{ratio} | {r['devices']} |")
      continue
    lines += ["| R | n | d | kernel bases s | kernel pairs s | kernel total s | pairs % GEMM | "
              + " | ".join(LABELS[m] for m in methods) + " |", "|" + "---|" * (7 + len(methods))]
    for w in rows:
      lines.append(f"| {w['R']} | {w['n']} | {w['d']} | {_s(w['bases_s'])} | {_s(w['pairs_s'])} "
                   f"| {_s(w['total_s'])} | {w['pairs_pct_gemm']:.0f}% | "
                   + " | ".join(_method_cell(w["methods"].get(m)) for m in methods) + " |")
  prof = report.get("profile")
  if prof:
    lines += ["", f"## Where the time goes (R={prof['R']}, n={prof['n']}, d={prof['d']}, "
              "jax.profiler trace, self time on XLA threads)", ""]
    for stage in ("bases", "pairs"):
      ops = prof[stage]["self_s"]
      total = sum(ops.values()) or 1.0
      parts = ", ".join(f"{k} {_s(v)} s ({100 * v / total:.0f}%)" for k, v in ops.items()
                        if v / total >= 0.01)
      sample = (f" on {prof['pairs_profiled']} of {prof['pairs_total']} pairs"
                if stage == "pairs" and "pairs_profiled" in prof else "")
      lines.append(f"- {stage}{sample}: wall {_s(prof[stage]['wall_s'])} s, op time "
                   f"{_s(total)} s (summed over worker threads): {parts}")
    lines.append(f"- host transfers: input {prof['input_mb']:.0f} MB to device "
                 f"{_s(prof['host_to_device_s'])} s; bases {prof['bases_mb']:.0f} MB to host "
                 f"{_s(prof['bases_to_host_s'])} s")
    lines.append(f"- compile: bases {_s(prof['compile_bases_s'])} s, pairs "
                 f"{_s(prof['compile_pairs_s'])} s (JAX compile events on the first call)")
    if prof.get("note"):
      lines.append(f"- note: {prof['note']}")
  lines += ["", "Kernel times are medians of timed runs after a first, compiling call "
            "(`‡`: one call only, past --kernel_budget_s, less the compile time JAX reported). "
            "`*`: per-pair median over a random sample of pairs times the number of pairs "
            "(sampled pairs in the JSON). `†`: repsim timed on 1 and 2 representations and fitted "
            "to a per-basis plus per-pair cost. repsim's score is a different quantity (its 99% "
            "cut is taken on an orthonormal basis of the data, so it keeps nearly every "
            "direction; plain CCA in effect), so it is timed, not compared.",
            f"Machine: {meta['machine']}, {meta['cpus']} CPUs, JAX on {meta['device_kind']}, "
            f"PyTorch on {meta['torch_device']}, BLAS threads "
            f"{meta['blas_threads'] or 'library default'}; jax {meta['jax']}, torch "
            f"{meta['torch']}, repsim {meta['repsim']}; {meta['date']}; run took "
            f"{meta['wall_s']:.0f} s; load average (1, 5, 15 min) "
            + " at start, ".join("/".join(f"{v:.1f}" for v in meta[k]) for k in
                                 ("load_average_start", "load_average") if k in meta)
            + " at end (2 cores)."]
  return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
  """Four panels: seconds vs R, n, d (kernel stages and per-pair methods) and vs devices."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(13, 10))
  FigureCanvasAgg(fig)
  axes = fig.subplots(2, 2).ravel()
  colours = {"kernel": "#1f77b4", "bases": "#17becf", "pairs": "#9467bd", "reference": "#d62728",
             "numpy_once": "#e377c2", "torch_once": "#7f7f7f",
             "naive_jax": "#ff7f0e", "torch": "#2ca02c", "repsim": "#8c564b"}
  base = report["meta"]["curve_base"]
  for ax, axis, key in zip(axes, ("R", "n", "d"), ("R", "n", "d")):
    rows = report["curves"].get(axis) or []
    ax.set_title(f"all pairs vs {axis} (others: R={base[0]}, n={base[1]}, d={base[2]})")
    if not rows:
      ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
      continue
    x = [w[key] for w in rows]
    ax.plot(x, [w["total_s"] for w in rows], "o-", color=colours["kernel"], lw=2,
            label="this kernel (total)")
    ax.plot(x, [w["bases_s"] for w in rows], "s:", color=colours["bases"], label="kernel: bases")
    ax.plot(x, [w["pairs_s"] for w in rows], "^:", color=colours["pairs"], label="kernel: pairs")
    for m in METHODS:
      pts = [(w[key], w["methods"][m]["total_s"]) for w in rows
             if w["methods"].get(m, {}).get("total_s")]
      if pts:
        how = (" (fitted)" if m == "repsim" else "" if m in ALL_PAIRS
               else " (sampled pairs, multiplied out)")
        ax.plot(*zip(*pts), "x--", color=colours[m], label=LABELS[m] + how)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel({"R": "representations R", "n": "sentences n", "d": "width d"}[axis])
    ax.set_ylabel("seconds, all R(R-1)/2 pairs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  ax = axes[3]
  rows = [r for r in report["curves"].get("devices") or [] if "pairs_s" in r]
  ax.set_title(f"pair stage vs simulated CPU devices (R={base[0]}, n={base[1]}, d={base[2]})")
  if rows:
    x = [r["device_count"] for r in rows]
    ax.plot(x, [r["pairs_s"] for r in rows], "o-", color=colours["pairs"], label="kernel: pairs")
    ax.plot(x, [r["bases_s"] for r in rows], "s:", color=colours["bases"], label="kernel: bases")
    ax.plot(x, [rows[0]["pairs_s"] * x[0] / c for c in x], "k--", alpha=0.5,
            label="ideal 1/devices scaling")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
  else:
    ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
  ax.set_xlabel("devices (simulated on this machine's CPU cores)")
  ax.set_ylabel("seconds")
  ax.grid(True, which="both", alpha=0.3)
  fig.suptitle(f"All-pairs SVCCA scaling ({report['meta']['data']} data; "
               f"GEMM {report['meta']['gemm_gflops']:.0f} GFLOP/s)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- main


def config() -> dict:
  cfg = {"reps": FLAGS.reps, "samples": [int(x) for x in FLAGS.samples],
         "dims": [int(x) for x in FLAGS.dims], "curve_base": tuple(int(x) for x in FLAGS.curve_base),
         "curve_R": [int(x) for x in FLAGS.curve_R], "curve_n": [int(x) for x in FLAGS.curve_n],
         "curve_d": [int(x) for x in FLAGS.curve_d],
         "curve_devices": [int(x) for x in FLAGS.curve_devices],
         "profile_shape": tuple(int(x) for x in FLAGS.profile_shape),
         "baseline_pairs": FLAGS.baseline_pairs, "repeats": FLAGS.repeats}
  if FLAGS.quick:
    cfg.update(QUICK)
  threads = FLAGS.blas_threads
  if FLAGS.quick and not FLAGS["blas_threads"].present:
    threads = 1
  cfg.update({"data": FLAGS.data, "threshold": FLAGS.threshold, "blas_threads": threads,
              "kernel_budget_s": FLAGS.kernel_budget_s, "baseline_budget_s": FLAGS.baseline_budget_s,
              "repsim_max_width": FLAGS.repsim_max_width, "torch_device": FLAGS.torch_device, "device_timeout_s": FLAGS.device_timeout_s,
              "baselines": [b for b in FLAGS.baselines if b in METHODS],
              "curves": FLAGS.curves})
  return cfg


def _versions() -> dict:
  from importlib import metadata
  out = {}
  for pkg in ("jax", "torch", "repsim"):
    try:
      out[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      out[pkg] = "not installed"
  return out


def run(cfg: dict, partial_path: str | None = None) -> dict:
  from benchmarks import kernel_profile, roofline
  start, load_start = time.perf_counter(), os.getloadavg()
  paper: list[dict] = []
  curves: dict[str, list] = {}

  def save_partial():  # a long run leaves what it has measured so far
    if partial_path:
      with open(partial_path, "w") as f:
        json.dump(_jsonable({"meta": {"gemm_gflops": gemm, "gemm_size": gemm_size},
                             "paper": paper, "curves": curves}), f)

  gemm_size = 512 if FLAGS.quick else FLAGS.gemm_size
  gemm = roofline.gemm_gflops(gemm_size)
  runner = Runner(cfg, gemm)
  for n in cfg["samples"]:
    for d in cfg["dims"]:
      paper.append(runner.workload(cfg["reps"], n, d, cfg["baselines"]))
      save_partial()
  r0, n0, d0 = cfg["curve_base"]
  for axis, values in (("R", cfg["curve_R"]), ("n", cfg["curve_n"]), ("d", cfg["curve_d"])):
    if axis in cfg["curves"]:
      curves[axis] = []
      for v in values:
        shape = (v, n0, d0) if axis == "R" else (r0, v, d0) if axis == "n" else (r0, n0, v)
        curves[axis].append(runner.workload(*shape, cfg["baselines"]))
        save_partial()
  if "devices" in cfg["curves"]:
    curves["devices"] = device_curve(cfg["curve_devices"], runner)
    save_partial()
  profile = None
  if FLAGS.profile:
    r, n, d = cfg["profile_shape"]
    kernel = runner.workload(r, n, d, [])  # compiled and timed first
    _log(f"profile R={r} n={n} d={d}")
    profile = {"R": r, "n": n, "d": d, **kernel_profile.profile(runner.reps(r, n, d),
                                                                cfg["threshold"]),
               "compile_bases_s": kernel["compile_bases_s"],
               "compile_pairs_s": kernel["compile_pairs_s"],
               "bases_s": kernel["bases_s"], "pairs_s": kernel["pairs_s"]}
  import jax
  meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "gemm_gflops": gemm,
          "gemm_size": gemm_size, "backend": jax.default_backend(),
          "device_kind": jax.devices()[0].device_kind,
          "date": time.strftime("%Y-%m-%d %H:%M"), "quick": FLAGS.quick,
          "load_average_start": load_start, "load_average": os.getloadavg(), **_versions(),
          **{k: v for k, v in cfg.items() if not k.startswith("curve_") or k == "curve_base"},
          "wall_s": time.perf_counter() - start}
  return {"meta": meta, "paper": paper, "curves": curves, "profile": profile}


def _jsonable(x):
  import numpy as np
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  return x


def set_threads(count: int) -> None:
  """Before NumPy, JAX or PyTorch load their BLAS: every method gets the same thread count."""
  if count:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
      os.environ[var] = str(count)


def render(path: str) -> None:
  with open(path) as f:
    report = json.load(f)
  gemm = report["meta"]["gemm_gflops"]
  rows = report["paper"] + [w for axis, ws in report["curves"].items() if axis != "devices"
                            for w in ws]
  for w in rows:
    w.update(roofline_fields(w["R"], w["n"], w["d"], w["padded_rank"], w["bases_s"],
                             w["pairs_s"], gemm))
  stem = path[:-len(".json")]
  with open(path, "w") as f:
    json.dump(report, f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(markdown(report))
  plot(report, stem + ".png")


def main(argv):
  del argv
  if FLAGS.render:
    render(FLAGS.render)
    return
  cfg = config()
  set_threads(cfg["blas_threads"])
  if FLAGS.devices:
    from engine import sharding
    sharding.simulate_cpu_devices(FLAGS.devices)
  if FLAGS.worker_out:
    worker()
    return
  os.makedirs(FLAGS.out, exist_ok=True)
  stem = os.path.join(FLAGS.out, FLAGS.stem or ("svcca_quick" if FLAGS.quick else "svcca"))
  report = _jsonable(run(cfg, stem + ".partial.json"))
  _log("writing results")
  with open(stem + ".json", "w") as f:
    json.dump(report, f, indent=1)
  table = markdown(report)
  with open(stem + ".md", "w") as f:
    f.write(table)
  plot(report, stem + ".png")
  if os.path.exists(stem + ".partial.json"):
    os.remove(stem + ".partial.json")
  print(table)


if __name__ == "__main__":
  app.run(main)
