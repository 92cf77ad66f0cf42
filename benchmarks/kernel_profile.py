"""Where the kernel's time goes: a jax.profiler trace of each stage, summarised by operation.

Each stage (bases, pairs) is traced on its own after it has compiled. The trace's XLA
operations are reduced to self time (an event's duration less its children's) on the XLA
worker threads and grouped: SVD, tridiagonal reduction, GEMM, while-loop control, fused
elementwise work (in the pair stage mostly the bisection's Sturm counts) and the executor's
own time between ops (many tiny ops inside loops show up there). Host transfers are timed by
wall clock (on CPU they are copies that the trace does not separate from waiting).
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

CATEGORIES = (  # first match wins, on the lower-cased op name
    ("svd", re.compile(r"svd|gesdd|gesvd")),
    ("tridiagonal reduction", re.compile(r"tridiagonal|sytrd")),
    ("eigh", re.compile(r"eig|syevd|heevd")),
    ("qr", re.compile(r"\bqr\b|geqrf|orgqr")),
    ("gemm", re.compile(r"dot|gemm|matmul|ynn|xnn|convolution")),
    ("while-loop control", re.compile(r"^while|^conditional|^call")),
    ("executor overhead", re.compile(r"thunkexecutor")),
    ("host transfer", re.compile(r"h2d|d2h|transfer|copy_to|copy_from")),
    ("elementwise fusions", re.compile(r".")),
)


def _category(name: str) -> str:
  low = name.lower()
  for label, pattern in CATEGORIES:
    if pattern.search(low):
      return label
  return "elementwise fusions"


def self_times(trace_dir: str) -> dict[str, float]:
  """Seconds of self time per category on XLA worker threads, from the newest trace in a dir."""
  files = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))
  if not files:
    return {}
  with gzip.open(files[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  threads = {(e.get("pid"), e.get("tid")): e["args"].get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  by_thread = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      name = threads.get((e.get("pid"), e.get("tid")), "")
      if name.startswith("tf_XLA") or name.startswith("tf_pjrt"):
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
  totals = collections.Counter()
  for evs in by_thread.values():
    evs.sort(key=lambda e: (e["ts"], -e["dur"]))
    stack: list[list] = []  # [end, event, child time]
    def close(until):
      while stack and stack[-1][0] <= until:
        end, ev, child = stack.pop()
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


def profile(reps: np.ndarray, threshold: float, mesh=None) -> dict:
  """Profiles one all-pairs run (shapes should already be compiled by a timed run)."""
  import jax

  from engine import svcca
  pairs = svcca.all_pairs(reps.shape[0])
  out = {}
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
