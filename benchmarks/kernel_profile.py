"""Where the kernel's time goes: a jax.profiler trace of each stage, summarised by operation.

Each stage (bases, pairs) is traced on its own after it has compiled. The trace's XLA
operations are reduced to self time (an event's duration less its children's) on the XLA
worker threads and grouped: SVD, tridiagonal reduction, GEMM, while-loop control, fused
elementwise work (in the pair stage mostly the bisection's Sturm counts). The executor's
containers are left out (their self time is mostly waiting for a worker); a stage's wall time
beyond the summed op time is dispatch, per-op overhead and idle cores. Host transfers are
timed by wall clock (on CPU they are copies that the trace does not separate from waiting).
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
import time

import numpy as np

CATEGORIES = (  # first match wins, on the lower-cased op (CPU) or kernel (GPU) name
    ("svd", re.compile(r"svd|gesdd|gesvd|bdsqr|jacobi")),
    ("tridiagonal reduction", re.compile(r"tridiagonal|sytrd|sytd2|latrd")),
    ("eigh", re.compile(r"eig|syevd|heevd|stedc|steqr")),
    ("qr", re.compile(r"\bqr\b|geqrf|orgqr|larfb")),
    ("gemm", re.compile(r"dot|gemm|matmul|ynn|xnn|convolution|xmma|cutlass|cublas")),
    ("while-loop control", re.compile(r"^while|^conditional|^call")),
    ("host transfer", re.compile(r"h2d|d2h|transfer|copy_to|copy_from|memcpy")),
    ("elementwise fusions", re.compile(r".")),
)


def _category(name: str) -> str:
  low = name.lower()
  for label, pattern in CATEGORIES:
    if pattern.search(low):
      return label
  return "elementwise fusions"


def self_times(trace_dir: str) -> dict[str, float]:
  """Seconds of self time per category of XLA's ops, from the newest trace in a directory."""
  files = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))
  if not files:
    return {}
  with gzip.open(files[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  threads = {(e.get("pid"), e.get("tid")): e["args"].get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  processes = {e.get("pid"): e["args"].get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  # CPU: XLA's worker threads run the ops. GPU/TPU: the device's 'XLA Ops' line if there is
  # one, else its streams (kernels).
  op_lines = {p for (p, _), name in threads.items()
              if processes.get(p, "").startswith("/device:") and name == "XLA Ops"}

  def wanted(pid, tid) -> bool:
    thread, process = threads.get((pid, tid), ""), processes.get(pid, "")
    if process.startswith("/device:"):
      return thread == "XLA Ops" if pid in op_lines else True
    return thread.startswith("tf_XLA") or thread.startswith("tf_pjrt")

  by_thread = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and "dur" in e and wanted(e.get("pid"), e.get("tid")):
      by_thread[(e.get("pid"), e.get("tid"))].append(e)
  totals = collections.Counter()
  for evs in by_thread.values():
    evs.sort(key=lambda e: (e["ts"], -e["dur"]))
    stack: list[list] = []  # [end, event, child time]
    def close(until):
      while stack and stack[-1][0] <= until:
        end, ev, child = stack.pop()
        if "thunkexecutor" not in ev["name"].lower():  # containers; their self time is waiting
          totals[_category(ev["name"])] += max(ev["dur"] - child, 0.0)
        if stack:
          stack[-1][2] += ev["dur"]
    for e in evs:
      close(e["ts"])
      stack.append([e["ts"] + e["dur"], e, 0.0])
    close(float("inf"))
  return {k: v / 1e6 for k, v in totals.most_common()}


def _traced(fn, trace_dir: str):
  import jax
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  options.host_tracer_level = 2
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True, profiler_options=options)
  t = time.perf_counter()
  try:
    out = fn()
  finally:
    wall = time.perf_counter() - t
    jax.profiler.stop_trace()
  return out, wall


def profile(reps: np.ndarray, threshold: float, mesh=None, max_pairs: int = 128) -> dict:
  """Profiles the bases of all representations and the pair stage on `max_pairs` pairs.

  The pair stage is sampled because on CPU it runs one pair at a time, and a trace of every
  op of thousands of pairs outgrows memory when it is read back (24 GB at 1,770 pairs).
  """
  import jax

  from engine import svcca
  everything = svcca.all_pairs(reps.shape[0])
  pairs = everything[np.random.default_rng(0).permutation(len(everything))[:max_pairs]]
  svcca.pair_scores(svcca.compute_bases(reps[:2], threshold=threshold, warn=False), pairs % 2,
                    mesh=mesh)  # compiles the sample's shape outside the trace
  out = {"pairs_profiled": int(len(pairs)), "pairs_total": int(len(everything))}
  with tempfile.TemporaryDirectory() as tmp:
    bases, wall = _traced(lambda: jax.block_until_ready(
        svcca.compute_bases(reps, threshold=threshold, warn=False)), f"{tmp}/bases")
    out["bases"] = {"wall_s": wall, "self_s": self_times(f"{tmp}/bases")}
    _, wall = _traced(lambda: svcca.pair_scores(bases, pairs, mesh=mesh), f"{tmp}/pairs")
    out["pairs"] = {"wall_s": wall, "self_s": self_times(f"{tmp}/pairs")}
  t = time.perf_counter()
  on_device = jax.block_until_ready(jax.device_put(reps))
  out["host_to_device_s"] = time.perf_counter() - t
  t = time.perf_counter()
  np.asarray(bases.u)
  out["bases_to_host_s"] = time.perf_counter() - t
  out["input_mb"] = reps.nbytes / 2**20
  out["bases_mb"] = np.asarray(bases.u).nbytes / 2**20
  del on_device
  return out
