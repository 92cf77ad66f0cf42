"""Permutation nulls, debiased CKA and fixed-dimension SVCCA against float64 NumPy references
and the statistics they promise (uniform p-values under a true null, power on shared signal)."""
import json
import os
import subprocess
import sys

import numpy as np
import scipy.stats
from absl.testing import absltest, parameterized

from engine import null, svcca
from tests import reference

TOL = 1e-5  # float32 kernel vs float64 reference, per permuted score statistic
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_DEVICES = r"""
import json, sys
from engine import sharding
sharding.simulate_cpu_devices(int(sys.argv[1]))
import jax
from engine import svcca
from tests.test_null import related_reps
reps = related_reps(seed=8, widths=(10, 20, 15, 12, 9))
out = {"devices": jax.device_count()}
for metric in svcca.METRICS:
  got = svcca.calibrated(reps, metric=metric, permutations=30, seed=3)
  out[metric] = {k: v.tolist() for k, v in got.items()}
print(json.dumps(out))
"""


def _margin(x, threshold=0.99) -> float:
  """Distance of the variance threshold from the nearest cumulative fraction (rank stability)."""
  s = np.linalg.svd(x - x.mean(0), compute_uv=False)
  frac = np.cumsum(s**2) / np.sum(s**2)
  return float(np.min(np.abs(frac - threshold)))


def related_reps(seed, n=40, widths=(10, 20, 15), latent=4, noise=1.0):
  """Representations sharing a latent signal, each with its own mixing, spectrum and offset."""
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((n, latent))
  reps = []
  for d in widths:
    mix = rng.standard_normal((latent, d))
    spectrum = np.geomspace(1.0, 0.1, d)
    reps.append(z @ mix + noise * rng.standard_normal((n, d)) * spectrum + 3.0 * rng.standard_normal(d))
  return reps


def independent_pairs(seed, count, n=32):
  """2 * count independent representations of several widths and spectra; pairs (2i, 2i + 1)."""
  rng = np.random.default_rng(seed)
  widths, decays = (4, 9, 12, 15), (1.0, 0.3, 0.05)
  reps = []
  for i in range(2 * count):
    d = widths[i % len(widths)]
    spectrum = np.geomspace(1.0, decays[(i // 3) % len(decays)], d)
    reps.append(rng.standard_normal((n, d)) * spectrum)
  return reps, np.arange(2 * count, dtype=np.int32).reshape(count, 2)


class PermutationsTest(absltest.TestCase):

  def test_seeded_reproducible_permutations(self):
    a = null.permutations(10, 50, seed=3)
    self.assertEqual(a.shape, (50, 10))
    self.assertEqual(a.dtype, np.int32)
    np.testing.assert_array_equal(np.sort(a, axis=1), np.tile(np.arange(10), (50, 1)))
    np.testing.assert_array_equal(a, null.permutations(10, 50, seed=3))
    self.assertFalse(np.array_equal(a, null.permutations(10, 50, seed=4)))
    self.assertGreater(len({tuple(p) for p in a}), 45)

  def test_bad_count_seed_and_n(self):
    for count in (0, 1, -5):
      with self.assertRaisesRegex(ValueError, f"permutations must be at least 2.*got {count}"):
        null.permutations(10, count, 0)
    with self.assertRaisesRegex(ValueError, "permutations must be an integer, got 2.5"):
      null.permutations(10, 2.5, 0)
    with self.assertRaisesRegex(ValueError, "seed must be a non-negative integer, got -1"):
      null.permutations(10, 5, -1)
    with self.assertRaisesRegex(ValueError, "seed must be an integer, got 'x'"):
      null.permutations(10, 5, "x")
    with self.assertRaisesRegex(ValueError, "at least 2 sentences, got n=1"):
      null.permutations(1, 5, 0)


class NullAgreementTest(parameterized.TestCase):

  @parameterized.parameters(*svcca.METRICS)
  def test_null_matches_direct_permutation(self, metric):
    reps = related_reps(seed=1)
    for r in reps:
      self.assertGreater(_margin(r), 1e-4, "test data too close to the rank threshold")
    pairs = np.array([[0, 1], [1, 0], [2, 1], [0, 2]])
    perms = null.permutations(40, 30, seed=7)
    bases = svcca.compute_bases(reps, metric=metric)
    got = null.pair_null(bases, pairs, perms, metric=metric)
    for p, (i, j) in enumerate(pairs):
      observed = reference.METRICS[metric](reps[i], reps[j])
      scores = reference.permutation_null(reps[i], reps[j], perms, metric)
      self.assertAlmostEqual(got.score[p], observed, delta=TOL)
      self.assertAlmostEqual(got.null_mean[p], np.mean(scores), delta=TOL)
      self.assertAlmostEqual(got.null_sd[p], np.std(scores, ddof=1), delta=TOL)
      margin = np.min(np.abs(scores - observed))
      if margin > 1e-4:  # counts compare exactly only away from ties
        self.assertEqual(got.exceed[p], np.sum(scores >= observed))
    np.testing.assert_array_equal(got.rank_a, np.asarray(bases.rank)[pairs[:, 0]])

  def test_blocking_of_permutations_changes_nothing(self):
    reps = related_reps(seed=2)
    bases = svcca.compute_bases(reps)
    perms = null.permutations(40, 23, seed=1)
    pairs = svcca.all_pairs(3)
    one = null.pair_null(bases, pairs, perms, metric="svcca", perm_chunk=24)
    for chunk in (1, 7):
      other = null.pair_null(bases, pairs, perms, metric="svcca", perm_chunk=chunk)
      for a, b in zip(one, other):
        np.testing.assert_allclose(a, b, atol=1e-6)

  def test_accelerator_gemm_only_null_matches(self):
    # The accelerators' block (Newton-Schulz nuclear norms, batched GEMMs), run on CPU.
    from engine import sharding
    reps = related_reps(seed=4, widths=(10, 20, 15, 12))
    bases = svcca.compute_bases(reps)
    pairs = svcca.all_pairs(4)
    perms = null.permutations(40, 25, seed=2)
    want = null.pair_null(bases, pairs, perms, metric="svcca")
    stack = np.concatenate([np.arange(40, dtype=np.int32)[None], perms,
                            np.tile(np.arange(40, dtype=np.int32), (4, 1))])  # 30 rows
    valid = np.arange(30) >= 1
    valid[26:] = False
    out = sharding.map_pairs(null._null_block("svcca", False, True),
                             (tuple(bases), stack.reshape(3, 10, 40), valid), pairs,
                             mesh=sharding.pair_mesh(), chunk_size=1)
    np.testing.assert_allclose(out[:, 0], want.score, atol=2e-5)
    np.testing.assert_allclose(out[:, 1], want.null_mean, atol=2e-5)
    np.testing.assert_allclose(out[:, 2], want.null_sd, atol=2e-5)

  def test_calibrated_is_reproducible_and_resumable_by_pair(self):
    reps = related_reps(seed=3, widths=(10, 20, 15, 12))
    full = svcca.calibrated(reps, permutations=40, seed=5)
    self.assertEqual(set(full), {"score", "null_mean", "null_sd", "z", "p_value", "rank_a", "rank_b"})
    self.assertEqual(full["score"].shape, (6,))
    again = svcca.calibrated(reps, permutations=40, seed=5)
    part = svcca.calibrated(reps, pairs=svcca.all_pairs(4)[3:], permutations=40, seed=5)
    other = svcca.calibrated(reps, permutations=40, seed=6)
    for key in full:
      np.testing.assert_array_equal(full[key], again[key])
      np.testing.assert_allclose(full[key][3:], part[key], atol=1e-7)
    self.assertFalse(np.allclose(full["null_mean"], other["null_mean"]))
    np.testing.assert_allclose(full["z"], (full["score"] - full["null_mean"]) / full["null_sd"])
    np.testing.assert_allclose(full["score"], svcca.pairwise(reps, pairs=svcca.all_pairs(4)), atol=1e-6)


class DevicesTest(absltest.TestCase):

  def test_four_devices_match_one(self):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", _DEVICES, "4"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    four = json.loads(proc.stdout.strip().splitlines()[-1])
    self.assertEqual(four["devices"], 4)
    reps = related_reps(seed=8, widths=(10, 20, 15, 12, 9))
    for metric in svcca.METRICS:
      one = svcca.calibrated(reps, metric=metric, permutations=30, seed=3)
      for key, value in one.items():
        np.testing.assert_allclose(four[metric][key], value, atol=1e-5, err_msg=f"{metric} {key}")


class NullStatisticsTest(parameterized.TestCase):

  @parameterized.parameters(*svcca.METRICS)
  def test_p_values_uniform_and_z_centred_on_independent_data(self, metric):
    reps, pairs = independent_pairs(seed=11, count=200)
    out = svcca.calibrated(reps, pairs, metric=metric, permutations=99, seed=2)
    ks = scipy.stats.kstest(out["p_value"], "uniform")
    self.assertGreater(ks.pvalue, 1e-3, f"{metric}: p-values not uniform (KS D={ks.statistic:.3f})")
    self.assertLess(abs(np.mean(out["z"])), 0.3)
    self.assertTrue(0.7 < np.std(out["z"]) < 1.3, np.std(out["z"]))

  def test_uniformity_check_rejects_a_broken_null(self):
    """Nearly-identity permutations (one swapped pair of sentences) keep the alignment: the
    check above must fail for such a null."""
    reps, pairs = independent_pairs(seed=11, count=200)
    bases = svcca.compute_bases(reps)
    rng = np.random.default_rng(0)
    swaps = np.tile(np.arange(32, dtype=np.int32), (99, 1))
    for row in swaps:
      a, b = rng.choice(32, 2, replace=False)
      row[[a, b]] = row[[b, a]]
    out = null.finish(null.pair_null(bases, pairs, swaps, metric="svcca"), 99)
    self.assertLess(scipy.stats.kstest(out["p_value"], "uniform").pvalue, 1e-6)

  @parameterized.parameters(*svcca.METRICS)
  def test_planted_shared_subspace_is_detected(self, metric):
    reps = related_reps(seed=4, n=64, widths=(12, 20, 16), latent=3, noise=0.5)
    out = svcca.calibrated(reps, metric=metric, permutations=199, seed=0)
    np.testing.assert_array_equal(out["p_value"], np.full(3, 1 / 200))
    self.assertTrue(np.all(out["z"] > 5), out["z"])


class DebiasedCkaTest(absltest.TestCase):

  def test_matches_unbiased_hsic_reference(self):
    reps = related_reps(seed=5, n=24, widths=(6, 30, 11))
    got = svcca.pairwise(reps, metric="cka_debiased")
    for i in range(3):
      for j in range(3):
        want = 1.0 if i == j else reference.cka_debiased(reps[i], reps[j])
        self.assertAlmostEqual(got[i, j], want, delta=1e-5)
    x, y = reps[0], reps[1]  # offsets kept: the estimator on the raw linear kernels
    raw = reference.unbiased_hsic
    want = raw(x @ x.T, y @ y.T) / np.sqrt(raw(x @ x.T, x @ x.T) * raw(y @ y.T, y @ y.T))
    self.assertAlmostEqual(got[0, 1], want, delta=1e-5)

  def test_near_zero_on_independent_data_where_biased_cka_is_not(self):
    rng = np.random.default_rng(0)
    reps = [rng.standard_normal((32, 8)) for _ in range(16)]
    upper = np.triu_indices(16, 1)
    biased = svcca.pairwise(reps, metric="cka")[upper]
    debiased = svcca.pairwise(reps, metric="cka_debiased")[upper]
    self.assertTrue(0.15 < np.mean(biased) < 0.25, np.mean(biased))
    self.assertLess(abs(np.mean(debiased)), 0.02)
    self.assertLess(np.min(debiased), 0)  # an unbiased estimate of zero goes both ways

  def test_needs_four_samples(self):
    x = np.random.default_rng(0).standard_normal((3, 4))
    with self.assertRaisesRegex(ValueError, "cka_debiased needs at least 4 samples, got 3"):
      svcca.pairwise([x, x], metric="cka_debiased")


class FixedDimsTest(absltest.TestCase):

  def test_same_rank_for_all_and_reference_scores(self):
    reps = related_reps(seed=6, widths=(10, 20, 15))
    bases = svcca.compute_bases(reps, dims=7)
    np.testing.assert_array_equal(bases.rank, [7, 7, 7])
    self.assertEqual(np.count_nonzero(np.asarray(bases.s)), 21)
    got = svcca.pair_scores(bases, svcca.all_pairs(3)).score
    for p, (i, j) in enumerate(svcca.all_pairs(3)):
      rho, _ = reference.canonical(reference.reduce_dims(reps[i], 7), reference.reduce_dims(reps[j], 7))
      self.assertAlmostEqual(got[p], np.mean(rho), delta=1e-5)
    out = svcca.calibrated(reps, permutations=20, dims=7)
    np.testing.assert_array_equal(out["rank_a"], [7, 7, 7])

  def test_refuses_dims_above_rank_or_n(self):
    reps = related_reps(seed=6, widths=(10, 20, 15))
    names = ["eng text", "eng speech", "deu text"]
    with self.assertRaisesRegex(ValueError, "^eng text: numerical rank 10 is below svd_dims=12"):
      svcca.compute_bases(reps, dims=12, names=names)
    with self.assertRaisesRegex(ValueError, "svd_dims=41 exceeds the number of samples n=40"):
      svcca.compute_bases(reps, dims=41)
    for bad in (0, -3, 2.5, True):
      with self.assertRaisesRegex(ValueError, "svd_dims must be a positive integer"):
        svcca.compute_bases(reps, dims=bad)
    with self.assertRaisesRegex(ValueError, "svd_dims applies to SVCCA and PWCCA"):
      svcca.compute_bases(reps, metric="cka", dims=5)


class NullInputErrorsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.reps = related_reps(seed=7)
    self.bases = svcca.compute_bases(self.reps)

  def test_bad_permutation_arrays(self):
    pairs = [[0, 1]]
    with self.assertRaisesRegex(ValueError, r"permutations must be an array \[B, n=40\]"):
      null.pair_null(self.bases, pairs, np.zeros((5, 39), np.int32), metric="svcca")
    with self.assertRaisesRegex(ValueError, "permutations must be at least 2"):
      null.pair_null(self.bases, pairs, null.permutations(40, 5, 0)[:1], metric="svcca")
    perms = null.permutations(40, 5, 0)
    perms[3, 0] = perms[3, 1]
    with self.assertRaisesRegex(ValueError, "permutations row 3 is not a permutation of 0..39"):
      null.pair_null(self.bases, pairs, perms, metric="svcca")
    with self.assertRaisesRegex(ValueError, "integer indices"):
      null.pair_null(self.bases, pairs, null.permutations(40, 5, 0) * 1.0, metric="svcca")

  def test_bad_metric_pairs_and_calibrated_arguments(self):
    perms = null.permutations(40, 5, 0)
    with self.assertRaisesRegex(ValueError, "unknown metric 'cca'"):
      null.pair_null(self.bases, [[0, 1]], perms, metric="cca")
    with self.assertRaisesRegex(ValueError, "PWCCA needs bases computed with metric='pwcca'"):
      null.pair_null(self.bases, [[0, 1]], perms, metric="pwcca")
    with self.assertRaisesRegex(ValueError, r"pair indices must lie in \[0, 3\)"):
      null.pair_null(self.bases, [[0, 3]], perms, metric="svcca")
    with self.assertRaisesRegex(ValueError, "permutations must be at least 2.*got 0"):
      svcca.calibrated(self.reps, permutations=0)
    with self.assertRaisesRegex(ValueError, "seed must be a non-negative integer, got -2"):
      svcca.calibrated(self.reps, permutations=10, seed=-2)
    result = null.pair_null(self.bases, [[0, 1]], perms, metric="svcca")
    with self.assertRaisesRegex(ValueError, "permutations must be at least 2.*got 0"):
      null.finish(result, 0)
    with self.assertRaisesRegex(ValueError, "permutations=5 is fewer than the null counts"):
      null.finish(result._replace(exceed=np.array([9])), 5)
    empty = null.pair_null(self.bases, np.zeros((0, 2), np.int32), perms, metric="svcca")
    self.assertEqual(null.finish(empty, 5)["p_value"].shape, (0,))


if __name__ == "__main__":
  absltest.main()
