"""Exact canonical correlations in float32: designed subspaces whose correlations are known
(exact zeros beside exact ones, graded cosines, unequal ranks), each score within 2e-5 of the
float64 reference. Eigenvalues of a float32 Gram put zeros at ~sqrt(eps) and fail these."""
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from engine import svcca
from tests import reference

TOL = 2e-5


def _frame(rng, n: int, m: int) -> np.ndarray:
  """m orthonormal, centred directions in R^n."""
  z = rng.standard_normal((n, m))
  q, _ = np.linalg.qr(z - z.mean(axis=0))
  return q


def _mix(rng, q: np.ndarray, d: int) -> np.ndarray:
  """[n, d] data spanning exactly q's columns, every singular value equal (all kept at the
  0.99 cut); with d > rank the features are mixed and rank-deficient."""
  k = q.shape[1]
  assert d >= k, (d, k)
  rot, _ = np.linalg.qr(rng.standard_normal((d, d)))
  return 10.0 * q @ rot[:k]


def shared_and_orthogonal(seed: int, n: int, shared: int, only_a: int, only_b: int,
                          d_a: int, d_b: int):
  """Correlations: `shared` exact ones, the rest exact zeros; SVCCA = shared / min(k_a, k_b)."""
  rng = np.random.default_rng(seed)
  q = _frame(rng, n, shared + only_a + only_b)
  a = q[:, :shared + only_a]
  b = np.concatenate([q[:, :shared], q[:, shared + only_a:]], axis=1)
  return _mix(rng, a, d_a), _mix(rng, b, d_b), shared / min(shared + only_a, shared + only_b)


def graded(seed: int, n: int, cosines, extra_b: int, d_a: int, d_b: int):
  """Canonical correlations exactly `cosines` (zeros and ones among them), b with extra_b more
  directions orthogonal to a."""
  rng = np.random.default_rng(seed)
  k = len(cosines)
  q = _frame(rng, n, 2 * k + extra_b)
  c = np.asarray(cosines, np.float64)
  a = q[:, :k]
  b = np.concatenate([a * c + q[:, k:2 * k] * np.sqrt(1 - c * c), q[:, 2 * k:]], axis=1)
  return _mix(rng, a, d_a), _mix(rng, b, d_b), float(np.mean(c))


SHARED = [  # (shared, only_a, only_b, d_a, d_b)
    (2, 20, 10, 40, 24),
    (10, 10, 10, 32, 32),
    (1, 30, 5, 48, 6),
    (0, 12, 12, 16, 16),
    (24, 0, 8, 24, 40),
]
GRADED = [  # (cosines, extra_b, d_a, d_b)
    (np.linspace(1.0, 0.0, 16), 0, 16, 16),
    ([1.0, 1.0, 0.9, 0.5, 0.1, 0.0, 0.0, 0.0], 12, 20, 30),
    (np.geomspace(1.0, 1e-3, 24), 4, 40, 28),
    ([0.999, 0.99, 0.7, 0.3, 0.01, 1e-4], 20, 6, 40),
]


class ExactSpectraTest(parameterized.TestCase):

  @parameterized.parameters(*SHARED)
  def test_exact_zeros_beside_exact_ones(self, shared, only_a, only_b, d_a, d_b):
    x, y, exact = shared_and_orthogonal(0, 300, shared, only_a, only_b, d_a, d_b)
    ref = reference.svcca(x, y)
    self.assertAlmostEqual(ref, exact, delta=1e-9)  # the reference, against the design
    self.assertAlmostEqual(svcca.svcca(x.astype(np.float32), y.astype(np.float32)), ref,
                           delta=TOL)

  @parameterized.parameters(*GRADED)
  def test_graded_correlations(self, cosines, extra_b, d_a, d_b):
    x, y, exact = graded(1, 400, cosines, extra_b, d_a, d_b)
    ref = reference.svcca(x, y)
    self.assertAlmostEqual(ref, exact, delta=1e-9)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    self.assertAlmostEqual(svcca.svcca(x32, y32), ref, delta=TOL)
    self.assertAlmostEqual(svcca.svcca(y32, x32), ref, delta=TOL)

  def test_pwcca_on_distinct_correlations(self):
    """PWCCA weights variates, defined where correlations are distinct (here all are)."""
    for seed, (cosines, extra_b, d_a, d_b) in enumerate(GRADED[2:]):
      x, y, _ = graded(seed, 400, cosines, extra_b, d_a, d_b)
      x32, y32 = x.astype(np.float32), y.astype(np.float32)
      self.assertAlmostEqual(svcca.pwcca(x32, y32), reference.pwcca(x, y), delta=TOL)
      self.assertAlmostEqual(svcca.pwcca(y32, x32), reference.pwcca(y, x), delta=TOL)

  def test_one_stack_of_unequal_ranks(self):
    """All designs in one call: bases padded to the widest rank, every pair of the stack."""
    reps = []
    for i, case in enumerate(SHARED):
      reps += list(shared_and_orthogonal(10 + i, 256, *case)[:2])
    for i, (cosines, extra_b, d_a, d_b) in enumerate(GRADED):
      reps += list(graded(20 + i, 256, cosines, extra_b, d_a, d_b)[:2])
    ranks = {np.linalg.matrix_rank(r) for r in reps}
    self.assertGreater(len(ranks), 5)
    got = svcca.pairwise_svcca([r.astype(np.float32) for r in reps])
    for i in range(len(reps)):
      for j in range(i + 1, len(reps)):
        self.assertAlmostEqual(got[i, j], reference.svcca(reps[i], reps[j]), delta=TOL,
                               msg=f"pair {i}, {j}")

  def test_newton_schulz_nuclear_norm_is_exact_too(self):
    """The accelerators' GEMM-only spectrum, checked here on CPU on the same designs."""
    cases = ([shared_and_orthogonal(30 + i, 300, *c) for i, c in enumerate(SHARED)]
             + [graded(40 + i, 300, *c) for i, c in enumerate(GRADED)])
    norm = jax.jit(jax.vmap(svcca.nuclear_norm_newton_schulz))
    ms, kmin, refs = [], [], []
    for x, y, _ in cases:
      bases = svcca.compute_bases([x.astype(np.float32), y.astype(np.float32)], trim=False,
                                  warn=False)
      u = np.zeros((2, 300, 64), np.float32)
      u[:, :, :bases.u.shape[-1]] = np.asarray(bases.u)  # one padded width for the batch
      ms.append(u[0].T @ u[1])
      kmin.append(int(np.min(np.asarray(bases.rank))))
      refs.append(reference.svcca(x, y))
    got = np.asarray(norm(jnp.asarray(np.stack(ms)))) / np.asarray(kmin)
    np.testing.assert_allclose(got, refs, atol=TOL)


class GramBasesTest(parameterized.TestCase):
  """The float64-Gram bases (CPU, float32) against a float64 NumPy SVD of the same data."""

  @parameterized.parameters((120, 300), (300, 120), (200, 200))
  def test_span_values_and_weights_match_float64_svd(self, n, d):
    rng = np.random.default_rng(n + d)
    spectrum = np.geomspace(1.0, 1e-3, min(n, d))
    x = (rng.standard_normal((n, min(n, d))) * spectrum) @ rng.standard_normal((min(n, d), d))
    x = (x + 3.0).astype(np.float32)
    bases = svcca.compute_bases([x], metric="pwcca", trim=False, warn=False)
    xc = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    xc /= np.sqrt(np.mean(xc * xc))  # compute_bases works at unit RMS (scale-invariant scores)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    k = int(bases.rank[0])
    self.assertEqual(k, reference.kept_rank(s, 0.99))
    got_u = np.asarray(bases.u[0], np.float64)[:, :k]
    np.testing.assert_allclose(got_u @ got_u.T, u[:, :k] @ u[:, :k].T, atol=5e-5)
    np.testing.assert_allclose(np.asarray(bases.s[0])[:k], s[:k], rtol=1e-5)
    np.testing.assert_allclose(got_u @ np.asarray(bases.w[0], np.float64)[:k],
                               (u[:, :k] * s[:k]) @ vt[:k], atol=5e-5 * s[0])
    self.assertEqual(np.abs(np.asarray(bases.u[0])[:, k:]).max(initial=0.0), 0.0)

  def test_numerical_rank_of_rank_deficient_data(self):
    """threshold 1 (and CKA) keep the numerical rank: round-off directions are not counted."""
    rng = np.random.default_rng(3)
    for n, d, r in ((100, 60, 17), (50, 200, 23)):
      x = (rng.standard_normal((n, r)) @ rng.standard_normal((r, d))).astype(np.float32)
      for metric, threshold in (("svcca", 1.0), ("cka", 0.99)):
        bases = svcca.compute_bases([x], metric=metric, threshold=threshold, warn=False)
        self.assertEqual(int(bases.rank[0]), r, (n, d, metric))


if __name__ == "__main__":
  absltest.main()
