"""Kernel numerics under bad conditioning: a property test against the float64 NumPy reference.

Representations vary in width, rank (exactly rank-deficient), spectrum (decaying over up to six
decades), scale (1e-6..1e6) and offset (near-constant: variation down to 1e-3 of the mean).
Where the problem is well posed the kernel must agree with the reference; where it is not
(kept rank close to n) it must say so with a warning. float32 and float64 kernels must agree.

Compiling a pair program takes seconds, so every example shares one set of shapes: three drawn
representations plus an anchor of width 40 and kept rank 36, which fixes the padded width
(zero-padding and masking are exact, so the anchor does not touch the other pairs' scores).
"""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import svcca
from tests import reference

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # float32 kernel vs float64 reference, as in tests/test_svcca.py
THRESHOLD = 0.99
MARGIN = 1e-3  # cumulative-variance distance from the threshold below which the rank is a tie
WIDTH = 40
N = 80  # sentences in every example
LATENT = 6
KINDS = ("gaussian", "low_rank", "decaying", "near_constant")
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def anchor(n: int) -> np.ndarray:
  """Width 40, flat spectrum of rank 36: kept rank 36 at threshold 0.99, so K = 40 always."""
  rng = np.random.default_rng(12345)
  g = rng.standard_normal((n, 36))
  q, _ = np.linalg.qr(g - g.mean(0))  # centred, orthonormal columns
  v, _ = np.linalg.qr(rng.standard_normal((WIDTH, 36)))
  return 3.0 * q @ v.T


def representation(n: int, d: int, kind: str, scale: float, knob: float, z: np.ndarray,
                   seed: int) -> np.ndarray:
  """One [n, d] representation sharing the latent z with its siblings.

  knob: rank for 'low_rank', decades of spectral decay for 'decaying', log10 of the
  variation-to-offset ratio for 'near_constant'.
  """
  rng = np.random.default_rng(seed)
  signal = z @ rng.standard_normal((z.shape[1], d)) + 0.5 * rng.standard_normal((z.shape[0], d))
  if kind == "low_rank":
    rank = max(1, min(d, int(knob)))
    basis = np.c_[z, rng.standard_normal((n, 8))][:, :rank] + 0.3 * rng.standard_normal((n, rank))
    signal = basis @ rng.standard_normal((rank, d))
  elif kind == "decaying":
    signal = signal * np.geomspace(1.0, 10.0**-knob, d)
  x = scale * signal / np.abs(signal).max()
  if kind == "near_constant":
    x = x + scale / 10.0**knob * (1.0 + rng.random(d))  # offset: variation / offset ~ 10**knob
  return x


@st.composite
def problems(draw, n: int):
  z = np.random.default_rng(draw(st.integers(0, 2**31))).standard_normal((n, LATENT))
  reps = []
  for _ in range(3):
    kind = draw(st.sampled_from(KINDS))
    knob = {"gaussian": 0.0, "low_rank": draw(st.integers(1, 8)),
            "decaying": draw(st.floats(1.0, 6.0)),
            "near_constant": draw(st.floats(-3.0, 0.0))}[kind]
    reps.append(representation(n, draw(st.integers(1, WIDTH)), kind,
                                10.0**draw(st.floats(-6.0, 6.0)), knob, z,
                                draw(st.integers(0, 2**31))))
  return reps


def margin(x: np.ndarray) -> float:
  s = np.linalg.svd(x - x.mean(0), compute_uv=False)
  frac = np.cumsum(s**2) / np.sum(s**2)
  return float(np.min(np.abs(frac - THRESHOLD)))


def reference_rank(x: np.ndarray) -> int:
  return reference.kept_rank(np.linalg.svd(x - x.mean(0), compute_uv=False), THRESHOLD)


def kernel(reps, metric):
  """(scores [R, R], kept ranks [R], warnings) of the kernel on reps + the anchor."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = svcca.pairwise(reps, metric=metric, threshold=THRESHOLD)
    rank = np.asarray(svcca.compute_bases(reps, metric=metric, threshold=THRESHOLD,
                                          warn=False).rank)
  return got, rank, [str(w.message) for w in caught if w.category is RuntimeWarning]


@settings(max_examples=20, **SETTINGS)
@given(data=st.data())
def test_kernel_matches_reference_where_well_posed(data):
  n = N
  reps = data.draw(problems(n)) + [anchor(n)]
  stable = [margin(x) > MARGIN for x in reps]
  want_rank = [reference_rank(x) for x in reps]
  for metric in svcca.METRICS:
    got, rank, warned = kernel(reps, metric)
    assert np.isfinite(got).all(), metric
    if metric not in svcca.FULL_RANK_METRICS:
      for i, ok in enumerate(stable):
        if ok:
          assert rank[i] == want_rank[i], (metric, i)
      close = [i for i in range(len(reps)) if rank[i] >= svcca.RANK_WARNING_FRACTION * n]
      assert bool(warned) == bool(close), (metric, rank.tolist(), warned)
    for i in range(3):
      for j in range(3):
        if i == j or not (stable[i] and stable[j]) or metric not in svcca.FULL_RANK_METRICS and (
            rank[i] >= n / 2 or rank[j] >= n / 2):
          continue
        want = reference.METRICS[metric](reps[i], reps[j], threshold=THRESHOLD)
        assert abs(got[i, j] - want) <= TOL, (metric, i, j, got[i, j], want)


@settings(max_examples=8, **SETTINGS)
@given(n=st.sampled_from([12, 48]), d=st.lists(st.sampled_from([6, 12, 24, 40, 64]), min_size=2,
                                                max_size=2),
       seed=st.integers(0, 2**31))
def test_warns_exactly_when_rank_approaches_n(n, d, seed):
  """n close to d (or below it): CCA degenerates, and the kernel says so."""
  rng = np.random.default_rng(seed)
  reps = [rng.standard_normal((n, w)) for w in d]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    rank = np.asarray(svcca.compute_bases(reps).rank)
  messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
  for i, x in enumerate(reps):
    if margin(x) > MARGIN:
      assert rank[i] == reference_rank(x)
  degenerate = (rank >= svcca.RANK_WARNING_FRACTION * n).any()
  assert bool(messages) == bool(degenerate), (rank.tolist(), messages)
  if degenerate:
    assert f"close to the number of samples n={n}" in messages[0]


# --------------------------------------------------------------------- float32 vs float64

def battery() -> list[list[np.ndarray]]:
  """Fixed cases across the conditioning space, three representations each."""
  z = np.random.default_rng(0).standard_normal((N, LATENT))
  r = lambda d, kind, scale, knob, seed: representation(N, d, kind, scale, knob, z, seed)
  return [
      [r(30, "gaussian", 1.0, 0, 1), r(20, "gaussian", 1.0, 0, 2), r(7, "gaussian", 1.0, 0, 3)],
      [r(30, "gaussian", 1e-6, 0, 4), r(25, "gaussian", 1e6, 0, 5), r(1, "gaussian", 1e3, 0, 6)],
      [r(40, "low_rank", 1.0, 2, 7), r(40, "low_rank", 1e2, 5, 8), r(9, "low_rank", 1e-3, 1, 9)],
      [r(30, "decaying", 1.0, 6, 10), r(35, "decaying", 1e-4, 3, 11), r(12, "gaussian", 1, 0, 12)],
      [r(30, "near_constant", 1.0, -3, 13), r(10, "near_constant", 1e4, -3, 14),
       r(20, "near_constant", 1e-5, -1, 15)],
  ]


_FLOAT64 = r"""
import json, sys
import numpy as np
from engine import sharding
sharding.set_dtype("float64")
from engine import svcca
data = np.load(sys.argv[1])
out = {}
for c in range(int(data["cases"])):
  reps = [data[f"{c}_{i}"] for i in range(4)]
  out[c] = {m: svcca.pairwise(reps, metric=m).tolist() for m in svcca.METRICS}
print(json.dumps(out))
"""


def test_float32_and_float64_agree(tmp_path):
  cases = [reps + [anchor(N)] for reps in battery()]
  arrays = {f"{c}_{i}": x for c, reps in enumerate(cases) for i, x in enumerate(reps)}
  np.savez(tmp_path / "cases.npz", cases=len(cases), **arrays)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  proc = subprocess.Popen([sys.executable, "-c", _FLOAT64, str(tmp_path / "cases.npz")], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  with warnings.catch_warnings():  # the float32 side runs meanwhile
    warnings.simplefilter("ignore")
    f32 = {c: {m: svcca.pairwise(reps, metric=m) for m in svcca.METRICS}
           for c, reps in enumerate(cases)}
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  f64 = json.loads(stdout.strip().splitlines()[-1])
  for c, reps in enumerate(cases):
    for m in svcca.METRICS:
      got64 = np.asarray(f64[str(c)][m])
      np.testing.assert_allclose(f32[c][m], got64, atol=TOL, err_msg=f"case {c} {m}")
      for i, j in [(0, 1), (0, 2), (1, 2), (2, 0)]:
        want = reference.METRICS[m](reps[i], reps[j], threshold=THRESHOLD)
        assert abs(got64[i, j] - want) < 1e-8, (c, m, i, j, got64[i, j], want)


# --------------------------------- beyond float32's reach (centred and scaled in float64 first)

@pytest.mark.parametrize("metric", svcca.METRICS)
def test_offset_beyond_float32_resolution_is_not_a_wrong_number(metric):
  z = np.random.default_rng(0).standard_normal((N, LATENT))
  x = representation(N, 30, "near_constant", 1.0, -8, z, 1)  # variation 1e-8 of the offset
  y = representation(N, 20, "gaussian", 1.0, 0, z, 2)
  want = reference.METRICS[metric](x, y, threshold=THRESHOLD)
  try:
    got = svcca.pairwise([x, y, y[:, :5], anchor(N)], metric=metric)[0, 1]
  except ValueError as e:
    assert "float32" in str(e)  # refusing, and saying why, is fine too
    return
  assert abs(got - want) <= TOL, (got, want)


@pytest.mark.parametrize("scale", [1e-12, 1e9])
def test_cka_at_extreme_scales(scale):
  z = np.random.default_rng(0).standard_normal((N, LATENT))
  x = representation(N, 30, "gaussian", scale, 0, z, 1)
  y = representation(N, 20, "gaussian", 1.0, 0, z, 2)
  got = svcca.pairwise([x, y, y[:, :5], anchor(N)], metric="cka")[0, 1]
  assert abs(got - reference.linear_cka(x, y)) <= TOL, got
