"""The JAX kernel against an independent float64 NumPy reference, plus its invariances."""
import functools
import json
import os
import subprocess
import sys
import threading
import time
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from engine import pair_metrics, sharding, svcca
from tests import reference

TOL = 1e-4  # float32 kernel vs float64 reference


def _margin(x, threshold=0.99) -> float:
  """Distance of the variance threshold from the nearest cumulative fraction (rank stability)."""
  s = np.linalg.svd(x - x.mean(0), compute_uv=False)
  frac = np.cumsum(s**2) / np.sum(s**2)
  return float(np.min(np.abs(frac - threshold)))


def random_reps(seed, n=300, widths=(24, 40, 32)):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((n, d)) for d in widths]


def structured_reps(seed, n=300, widths=(24, 40, 32, 40), latent=12):
  """Representations sharing a latent signal, each with its own mixing, spectrum and noise."""
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((n, latent))
  reps = []
  for i, d in enumerate(widths):
    mix = rng.standard_normal((latent, d)) * np.geomspace(3.0, 0.3, latent)[:, None]
    noise = rng.standard_normal((n, d)) * (0.3 + 0.2 * i)
    reps.append(z @ mix + noise + 5.0 * rng.standard_normal(d))  # offsets: centring matters
  return reps


class ReferenceAgreementTest(parameterized.TestCase):

  @parameterized.product(metric=svcca.METRICS, kind=("random", "structured"))
  def test_matrix_matches_reference(self, metric, kind):
    reps = (random_reps if kind == "random" else structured_reps)(seed=1)
    for r in reps:
      self.assertGreater(_margin(r), 1e-5, "test data too close to the rank threshold")
    got = svcca.pairwise(reps, metric=metric)
    for i in range(len(reps)):
      for j in range(len(reps)):
        want = 1.0 if i == j else reference.METRICS[metric](reps[i], reps[j], threshold=0.99)
        self.assertAlmostEqual(got[i, j], want, delta=TOL, msg=f"{metric} pair ({i}, {j})")

  def test_equal_width_stack(self):
    reps = np.stack(structured_reps(seed=2, widths=(32, 32, 32)))
    got = svcca.pairwise_svcca(reps)
    for i, j in [(0, 1), (0, 2), (1, 2)]:
      self.assertAlmostEqual(got[i, j], reference.svcca(reps[i], reps[j]), delta=TOL)
    self.assertEqual(got.shape, (3, 3))

  def test_pairs_argument_returns_those_scores(self):
    reps = structured_reps(seed=3)
    pairs = np.array([[0, 3], [2, 1], [1, 1], [3, 0]])
    got = svcca.pairwise_svcca(reps, pairs=pairs)
    self.assertEqual(got.shape, (4,))
    want = [reference.svcca(reps[i], reps[j]) for i, j in pairs]
    np.testing.assert_allclose(got, want, atol=TOL)

  def test_single_pair_functions(self):
    x, y = structured_reps(seed=4, widths=(20, 36))[:2]
    self.assertAlmostEqual(svcca.svcca(x, y), reference.svcca(x, y), delta=TOL)
    self.assertAlmostEqual(svcca.pwcca(x, y), reference.pwcca(x, y), delta=TOL)
    self.assertAlmostEqual(svcca.linear_cka(x, y), reference.linear_cka(x, y), delta=TOL)
    self.assertAlmostEqual(svcca.svcca(x, y, threshold=0.9), reference.svcca(x, y, 0.9), delta=TOL)

  def test_reorthogonalized_bases_score_the_same(self):
    """The QR pass GPUs get: orthonormal kept columns, same span, so the same scores."""
    reps = structured_reps(seed=4)
    pairs = svcca.all_pairs(len(reps))
    for metric in svcca.METRICS:
      plain = svcca.compute_bases(reps, metric=metric, reorthogonalize=False)
      fixed = svcca.compute_bases(reps, metric=metric, reorthogonalize=True)
      np.testing.assert_array_equal(np.asarray(plain.rank), np.asarray(fixed.rank))
      for u, k in zip(np.asarray(fixed.u), np.asarray(fixed.rank)):
        np.testing.assert_allclose(u[:, :k].T @ u[:, :k], np.eye(k), atol=1e-5)
        self.assertEqual(np.abs(u[:, k:]).max(initial=0.0), 0.0)
      got = svcca.pair_scores(fixed, pairs, metric=metric).score
      want = svcca.pair_scores(plain, pairs, metric=metric).score
      np.testing.assert_allclose(got, want, atol=1e-5, err_msg=metric)

  def test_chunking_and_padding_do_not_change_scores(self):
    """Batched chunks (the accelerator path) against one pair at a time (the CPU path)."""
    reps = structured_reps(seed=5)
    pairs = svcca.all_pairs(len(reps))
    for metric in svcca.METRICS:
      bases = tuple(svcca.compute_bases(reps, metric=metric))
      one = svcca.score_pairs(bases, jnp.asarray(pairs), metric=metric, chunk_size=1)
      four = svcca.score_pairs(bases, jnp.asarray(pairs), metric=metric, chunk_size=4)
      staged = svcca.pair_scores(svcca.Bases(*bases), pairs, metric=metric).score
      # float32 GEMMs of other batch shapes round differently: a few ulp of a score near 1.
      np.testing.assert_allclose(one, four, atol=3e-6, err_msg=metric)
      np.testing.assert_allclose(one, staged, atol=3e-6, err_msg=metric)

  def test_threaded_pair_stage_matches_one_execution(self):
    """Pairs cut over host threads (unevenly: padded, then dropped) give the same scores."""
    reps = structured_reps(seed=6, widths=(24, 40, 32, 40, 16))
    pairs = np.concatenate([svcca.all_pairs(5), [[3, 1], [4, 4]]]).astype(np.int32)  # 12
    mesh = sharding.pair_mesh(jax.devices()[:1])
    for metric in ("svcca", "pwcca"):
      bases = tuple(svcca.compute_bases(reps, metric=metric))
      block = pair_metrics._pairs_fn(metric, 1)
      one = sharding.map_pairs(block, bases, pairs, mesh=mesh, chunk_size=1)
      for threads in (2, 5):
        got = sharding.map_pairs(block, bases, pairs, mesh=mesh, chunk_size=1, threads=threads)
        self.assertEqual(got.shape, (12,))
        np.testing.assert_allclose(got, one, atol=1e-6, err_msg=f"{metric}, {threads} threads")
      want = [reference.METRICS[metric](reps[i], reps[j]) if i != j else 1.0 for i, j in pairs]
      np.testing.assert_allclose(one, want, atol=TOL, err_msg=metric)

  def test_host_map_keeps_order_and_uses_threads(self):
    seen = set()

    def work(i):
      seen.add(threading.get_ident())
      time.sleep(0.05)
      return jnp.full((2,), i)

    out = sharding.host_map(work, list(range(6)), workers=3)
    self.assertEqual([int(o[0]) for o in out], list(range(6)))
    self.assertGreater(len(seen), 1)
    self.assertLen(sharding.host_map(work, [7], workers=8), 1)

  def test_bases_from_host_threads_match_one_batched_call(self):
    reps = structured_reps(seed=8, widths=(24, 40, 32, 40, 16))
    for metric in svcca.METRICS:
      threaded = svcca.compute_bases(reps, metric=metric, parallel=True)
      batched = svcca.compute_bases(reps, metric=metric, parallel=False)
      np.testing.assert_array_equal(np.asarray(threaded.rank), np.asarray(batched.rank))
      np.testing.assert_allclose(threaded.s, batched.s, rtol=1e-5, atol=1e-6)
      for a, b in zip(np.asarray(threaded.u), np.asarray(batched.u)):  # same kept span
        np.testing.assert_allclose(a @ a.T, b @ b.T, atol=1e-5)
      pairs = svcca.all_pairs(len(reps))
      np.testing.assert_allclose(svcca.pair_scores(threaded, pairs, metric=metric).score,
                                 svcca.pair_scores(batched, pairs, metric=metric).score,
                                 atol=1e-5, err_msg=metric)


class PropertyTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.x, self.y = structured_reps(seed=7, widths=(32, 24))[:2]

  @parameterized.parameters(*svcca.METRICS)
  def test_self_similarity_is_one(self, metric):
    got = svcca.pairwise([self.x, self.x], metric=metric, pairs=[[0, 1]])[0]
    self.assertAlmostEqual(got, 1.0, delta=1e-5)

  @parameterized.parameters("svcca", "cka")
  def test_symmetry(self, metric):
    ab, ba = svcca.pairwise([self.x, self.y], metric=metric, pairs=[[0, 1], [1, 0]])
    self.assertAlmostEqual(ab, ba, delta=1e-6)

  @parameterized.parameters(*svcca.METRICS)
  def test_orthogonal_and_isotropic_scaling_invariance(self, metric):
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((self.x.shape[1],) * 2))
    qy, _ = np.linalg.qr(rng.standard_normal((self.y.shape[1],) * 2))
    base = svcca.pairwise([self.x, self.y], metric=metric, pairs=[[0, 1]])[0]
    rotated = svcca.pairwise([self.x @ q, self.y @ qy], metric=metric, pairs=[[0, 1]])[0]
    scaled = svcca.pairwise([1e3 * self.x, 1e-3 * self.y], metric=metric, pairs=[[0, 1]])[0]
    self.assertAlmostEqual(base, scaled, delta=TOL)
    if metric == "pwcca":
      # PWCCA's weights sum |loadings| over the original features: a rotation of the features
      # changes them, as the reference does too.
      want = reference.pwcca(self.x @ q, self.y @ qy)
      self.assertAlmostEqual(rotated, want, delta=TOL)
      self.assertGreater(abs(rotated - base), 1e-5)
    else:
      self.assertAlmostEqual(base, rotated, delta=TOL)

  @parameterized.parameters(*svcca.METRICS)
  def test_independent_noise_scores_far_below_related_data(self, metric):
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(self.y.shape)
    related = svcca.pairwise([self.x, self.y], metric=metric, pairs=[[0, 1]])[0]
    unrelated = svcca.pairwise([self.x, noise], metric=metric, pairs=[[0, 1]])[0]
    self.assertGreater(related, 0.6)
    self.assertLess(unrelated, 0.5 * related)

  @parameterized.parameters(*svcca.METRICS)
  def test_zero_padded_features_change_nothing(self, metric):
    padded = np.concatenate([self.x, np.zeros((self.x.shape[0], 17))], axis=1)
    a = svcca.pairwise([self.x, self.y], metric=metric, pairs=[[0, 1], [1, 0]])
    b = svcca.pairwise([padded, self.y], metric=metric, pairs=[[0, 1], [1, 0]])
    np.testing.assert_allclose(a, b, atol=1e-5)

  def test_rank_follows_threshold(self):
    bases = svcca.compute_bases([self.x], threshold=0.5)
    s = np.linalg.svd(self.x - self.x.mean(0), compute_uv=False)
    self.assertEqual(int(bases.rank[0]), reference.kept_rank(s, 0.5))
    u = np.asarray(bases.u[0])
    k = int(bases.rank[0])
    np.testing.assert_allclose(u[:, :k].T @ u[:, :k], np.eye(k), atol=1e-5)
    self.assertTrue(np.all(u[:, k:] == 0))


class JitVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_building_blocks(self):
    reps = structured_reps(seed=9, widths=(24, 24, 24))
    x = jnp.asarray(np.stack(reps), jnp.float32)
    pairs = jnp.asarray(svcca.all_pairs(3))
    for metric in svcca.METRICS:
      threshold = 1.0 if metric in svcca.FULL_RANK_METRICS else 0.99
      basis = self.variant(functools.partial(svcca.basis, threshold=threshold,
                                             with_weights=metric == "pwcca"))
      parts = [basis(r) for r in x]
      bases = svcca.Bases(*(None if parts[0][i] is None else jnp.stack([p[i] for p in parts])
                            for i in range(4)))
      score = self.variant(functools.partial(svcca.score_pairs, metric=metric, chunk_size=2))
      got = np.asarray(score(bases, pairs))
      want = [reference.METRICS[metric](reps[i], reps[j], threshold=threshold)
              for i, j in np.asarray(pairs)]
      np.testing.assert_allclose(got, want, atol=TOL, err_msg=metric)


class BadInputTest(parameterized.TestCase):

  def _reps(self):
    rng = np.random.default_rng(0)
    return [rng.standard_normal((50, 8)) for _ in range(3)]

  def test_nan_names_representation(self):
    reps = self._reps()
    reps[1][4, 2] = np.nan
    with self.assertRaisesRegex(ValueError, r"eng\.speech\.encoder\.3.*NaN or Inf.*sample 4"):
      svcca.compute_bases(reps, names=["a", "eng.speech.encoder.3", "c"])

  def test_inf(self):
    reps = self._reps()
    reps[2][0, 0] = np.inf
    with self.assertRaisesRegex(ValueError, "representation 2.*NaN or Inf"):
      svcca.pairwise_svcca(reps)

  def test_mismatched_samples(self):
    reps = self._reps()
    reps[2] = reps[2][:40]
    with self.assertRaisesRegex(ValueError, "representation 2: has 40 samples.*has 50"):
      svcca.pairwise_svcca(reps)

  def test_too_few_samples(self):
    with self.assertRaisesRegex(ValueError, "x: needs at least 2 samples"):
      svcca.svcca(np.ones((1, 3)), np.ones((1, 3)))

  def test_constant(self):
    reps = self._reps()
    reps[0] = np.full((50, 8), 3.0)
    with self.assertRaisesRegex(ValueError, "representation 0: is constant"):
      svcca.pairwise_svcca(reps)

  def test_bad_shape_metric_threshold_pairs(self):
    with self.assertRaisesRegex(ValueError, r"\[R, n, d\]"):
      svcca.pairwise_svcca(np.zeros((3, 4)))
    with self.assertRaisesRegex(ValueError, "unknown metric 'rsa'"):
      svcca.pairwise(self._reps(), metric="rsa")
    with self.assertRaisesRegex(ValueError, "threshold"):
      svcca.pairwise_svcca(self._reps(), threshold=1.5)
    with self.assertRaisesRegex(ValueError, r"pair indices must lie in \[0, 3\)"):
      svcca.pairwise_svcca(self._reps(), pairs=[[0, 3]])

  def test_warns_when_rank_close_to_n(self):
    rng = np.random.default_rng(0)
    reps = [rng.standard_normal((20, 30)) for _ in range(2)]
    with self.assertWarnsRegex(RuntimeWarning, "close to the number of samples n=20"):
      svcca.pairwise_svcca(reps)
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      svcca.pairwise_svcca([rng.standard_normal((200, 10)) for _ in range(2)])


_DEVICE_SCRIPT = r"""
import json, sys
import numpy as np
from engine import sharding
sharding.simulate_cpu_devices(int(sys.argv[1]))
if sys.argv[2] == "float64":
  sharding.set_dtype("float64")
import jax
from engine import sharding, svcca
from tests.test_svcca import structured_reps
reps = structured_reps(seed=11, widths=(24, 40, 32, 40, 16, 28))
assert jax.device_count() == int(sys.argv[1]), jax.devices()
out = {m: svcca.pairwise(reps, metric=m).tolist() for m in svcca.METRICS}
out["chunk1"] = svcca.pairwise_svcca(reps, pairs=svcca.all_pairs(6)).tolist()
# Wide enough that each device runs LAPACK eigensolves over many pairs at once.
wide = structured_reps(seed=3, n=600, widths=(160, 200, 180, 200, 120, 160), latent=48)
for m in ("svcca", "pwcca"):
  out["wide_" + m] = svcca.pairwise(wide, metric=m).tolist()
print(json.dumps(out))
"""


def _run_devices(count: int, dtype: str = "float32") -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _DEVICE_SCRIPT, str(count), dtype], env=env,
                        cwd=root, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


class DevicesTest(absltest.TestCase):

  def test_one_and_eight_devices_agree(self):
    one, eight = _run_devices(1), _run_devices(8)
    for key in one:
      # PWCCA's weights come from eigenvectors; with dozens of canonical correlations within
      # 1e-3 of each other, float32 LAPACK rounding (OpenBLAS threading differs with the number
      # of devices calling it) moves them by a few 1e-6.
      atol = 1e-5 if key == "wide_pwcca" else 1e-6
      np.testing.assert_allclose(one[key], eight[key], atol=atol, err_msg=key)

  def test_float64_matches_reference_tightly(self):
    got = _run_devices(2, "float64")
    reps = structured_reps(seed=11, widths=(24, 40, 32, 40, 16, 28))
    for metric in svcca.METRICS:
      for i, j in [(0, 1), (2, 5), (4, 3)]:
        want = reference.METRICS[metric](reps[i], reps[j], threshold=0.99)
        self.assertAlmostEqual(got[metric][i][j], want, delta=1e-9, msg=metric)


if __name__ == "__main__":
  absltest.main()
