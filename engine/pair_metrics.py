"""Pair scores from bases: per pair one (k x n)(n x k) GEMM and a small spectrum, batched over
a sharded pair axis (engine.sharding). SVCCA and PWCCA read the singular values (and for
PWCCA the vectors) of U_a^T U_b; CKA and debiased CKA its weighted Frobenius norm.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from engine import sharding
from engine.bases import FULL_RANK_METRICS, HIGHEST, METRICS, Bases

class PairResult(NamedTuple):
  score: np.ndarray   # [P]
  rank_a: np.ndarray  # [P]
  rank_b: np.ndarray  # [P]


# ----------------------------------------------------------------------------- pair scores


def _cross(ua: jax.Array, ub: jax.Array) -> jax.Array:
  return jnp.einsum("nk,nl->kl", ua, ub, precision=HIGHEST)


def _svcca_pair(ua, sa, wa, ka, ub, sb, wb, kb):
  """Mean canonical correlation: singular values of U_a^T U_b, over min(k_a, k_b)."""
  del sa, sb, wa, wb
  m = _cross(ua, ub)
  if jax.default_backend() == "cpu":
    total = jnp.sum(_first(jnp.clip(singular_values(m), 0.0, 1.0), ka, kb))
  else:  # accelerators: GEMMs only, at their GEMM rate (no per-pair LAPACK)
    total = nuclear_norm_newton_schulz(m)
  return total / jnp.minimum(ka, kb)


def singular_values(m: jax.Array) -> jax.Array:
  """Descending singular values of a small square matrix, from the matrix itself.

  Eigenvalues of the Gram M^T M carry an absolute error of eps ||M||^2, which the square root
  turns into ~sqrt(eps): an exactly-zero canonical correlation read 3e-4 in float32. The SVD of
  M (bidiagonalisation, then values only) errs by eps ||M||, so zeros stay ~1e-7; measured on
  CPU it costs ~15% more than the Gram route at k ~ 290.
  """
  return jnp.linalg.svd(m, compute_uv=False)


NEWTON_SCHULZ_STEPS = 30


def nuclear_norm_newton_schulz(m: jax.Array, steps: int = NEWTON_SCHULZ_STEPS) -> jax.Array:
  """Sum of the singular values of M (||M|| <= 1: a cross product of orthonormal bases) as
  trace(Q^T M), Q the Newton-Schulz polar iterate X <- X (3 I - X^T X) / 2: GEMMs only.

  A singular value sigma grows 1.5x per step until it converges quadratically to 1; one not yet
  converged adds sigma (1 - f(sigma)) <= 1.5^-steps / 4-ish of error, so 30 steps leave < 2e-6
  per value, and rank-deficient directions (sigma ~ 1e-7) add ~1e-9. 4 K^3 flops a step: ~20x
  a pair's useful FLOPs at K=288, which an accelerator runs at GEMM rate and a CPU does not
  (there the SVD of M is ~5x faster), so it is the accelerator path only.
  """
  x = m / jnp.asarray(1.0 + 1e-4, m.dtype)  # singular values in (0, 1]: inside (0, sqrt 3)
  eye = jnp.eye(m.shape[-1], dtype=m.dtype)

  def step(x, _):
    a = jnp.matmul(jnp.swapaxes(x, -1, -2), x, precision=HIGHEST)
    return jnp.matmul(x, 1.5 * eye - 0.5 * a, precision=HIGHEST), None

  x, _ = jax.lax.scan(step, x, None, length=steps)
  return jnp.sum(x * m, axis=(-2, -1))


def eigenvalues(g: jax.Array) -> jax.Array:
  """Ascending eigenvalues of a symmetric matrix, without eigenvectors.

  Householder tridiagonalisation (LAPACK sytrd on CPU, cuSOLVER on GPU) then bisection on the
  tridiagonal: several times cheaper than eigvalsh, which computes eigenvectors it drops.
  TPUs have no tridiagonal reduction; they use their Jacobi eigh.
  """
  if jax.default_backend() == "tpu":
    return jnp.linalg.eigvalsh(g)
  _, d, e, _ = jax.lax.linalg.tridiagonal(g)
  return jax.scipy.linalg.eigh_tridiagonal(d, e, eigvals_only=True)


def _rho(ev: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.clip(ev, 0.0, 1.0))


def _top(values: jax.Array, ka, kb) -> jax.Array:
  """Keeps the last min(k_a, k_b) of ascending eigen-values: the rest are zero up to round-off,
  and round-off eigenvalues of 1e-8 would add 1e-4 each after the square root."""
  return jnp.where(jnp.arange(values.shape[-1]) >= values.shape[-1] - jnp.minimum(ka, kb), values, 0)


def _first(values: jax.Array, ka, kb) -> jax.Array:
  """Keeps the first min(k_a, k_b) of descending values: the rest are zero up to round-off."""
  return jnp.where(jnp.arange(values.shape[-1]) < jnp.minimum(ka, kb), values, 0)


def _pwcca_pair(ua, sa, wa, ka, ub, sb, wb, kb):
  """Projection-weighted CCA (Morcos et al. 2018), weighted on the first representation.

  Weights are how much of a's centred features each canonical variate of a accounts for,
  alpha_i = sum_j |<h_i, x_j>|, computed for the same canonical variates whose correlations
  they weight (the reference code mixes sides and adds the means back before weighting).
  The left singular vectors of U_a^T U_b give those variates; the SVD keeps the correlations
  exact where the eigenvalues of M M^T would put zeros at ~sqrt(eps).
  """
  del sa, sb, wb
  vecs, sv, _ = jnp.linalg.svd(_cross(ua, ub), full_matrices=False)  # descending
  rho = jnp.clip(sv, 0.0, 1.0)
  alpha = _first(jnp.sum(jnp.abs(jnp.matmul(vecs.T, wa, precision=HIGHEST)), axis=1), ka, kb)
  return jnp.sum(alpha * rho) / jnp.sum(alpha)


def _cka_pair(ua, sa, wa, ka, ub, sb, wb, kb):
  """Linear CKA from SVD bases: ||S_a U_a^T U_b S_b||_F^2 / (||S_a^2||_F ||S_b^2||_F)."""
  del wa, wb, ka, kb
  m = _cross(ua, ub) * sa[:, None] * sb[None, :]
  return jnp.sum(m * m) / (jnp.sqrt(jnp.sum(sa**4)) * jnp.sqrt(jnp.sum(sb**4)))


def _cka_debiased_pair(ua, sa, wa, ka, ub, sb, wb, kb):
  """Linear CKA with the unbiased HSIC estimator (Song et al. 2012), from SVD bases."""
  del wa, wb, ka, kb
  return hsic_cka(*hsic_terms(ua, sa), *hsic_terms(ub, sb), _cross(ua * sa, ub * sb), ua.shape[0])


def hsic_terms(u: jax.Array, s: jax.Array):
  """Per-representation parts of the unbiased HSIC of the linear kernel K = X X^T, X = U S.

  Returns diag(K) [n], tr K and ||K||_F^2 = sum s^4: with them every pair needs only
  ||X_a^T X_b||_F^2 and diag(K_a) . diag(K_b) (tests/reference.py has the n x n formula).
  """
  x = u * s
  diag = jnp.sum(x * x, axis=-1)
  return diag, jnp.sum(s * s), jnp.sum(s**4)


def hsic_cka(diag_a, tr_a, fro_a, diag_b, tr_b, fro_b, cross, n: int):
  """Debiased CKA from hsic_terms and the cross product X_a^T X_b.

  With centred X, 1^T K = 0, so for K~ = K - diag(K): tr(K~ L~) = tr(KL) - k.l,
  1^T K~ L~ 1 = k.l and 1^T K~ 1 = -tr K. Song et al.'s HSIC_1 times n(n-3) is then
  tr(KL) - n/(n-2) k.l + tr K tr L / ((n-1)(n-2)).
  """
  def hsic(kl, dot, tr_k, tr_l):
    return kl - n / (n - 2) * dot + tr_k * tr_l / ((n - 1) * (n - 2))
  ab = hsic(jnp.sum(cross * cross), jnp.dot(diag_a, diag_b, precision=HIGHEST), tr_a, tr_b)
  aa = hsic(fro_a, jnp.dot(diag_a, diag_a, precision=HIGHEST), tr_a, tr_a)
  bb = hsic(fro_b, jnp.dot(diag_b, diag_b, precision=HIGHEST), tr_b, tr_b)
  return ab / jnp.sqrt(aa * bb)


_PAIR_FNS = {"svcca": _svcca_pair, "pwcca": _pwcca_pair, "cka": _cka_pair,
             "cka_debiased": _cka_debiased_pair}


@functools.cache
def _pairs_fn(metric: str, chunk_size: int):
  """Scores a block of pairs in chunks: each chunk is one batched GEMM + batched eigensolves."""
  one = _PAIR_FNS[metric]

  def block(bases, pairs):
    u, s, w, rank = bases

    def score(pair):
      i, j = pair[0], pair[1]
      wi = w[i] if w is not None else None
      wj = w[j] if w is not None else None
      return one(u[i], s[i], wi, rank[i], u[j], s[j], wj, rank[j])

    return jax.lax.map(score, pairs, batch_size=chunk_size)

  return block


def score_pairs(bases: Bases | tuple, pairs: jax.Array, *, metric: str = "svcca",
                chunk_size: int = 16) -> jax.Array:
  """Pure, unsharded pair stage (jit-able): bases and int pairs [P, 2] -> scores [P]."""
  return _pairs_fn(metric, chunk_size)(tuple(bases), pairs)


def auto_chunk_size(n: int, k: int, d: int = 0, budget_bytes: int = 256 << 20,
                    itemsize: int = 4) -> int:
  """Pairs per chunk so the gathered bases of one chunk stay within a memory budget."""
  per_pair = 2 * n * k * itemsize + 2 * k * max(k, d) * itemsize
  return int(max(1, min(256, budget_bytes // max(per_pair, 1))))


def pair_scores(bases: Bases, pairs, *, metric: str = "svcca", mesh=None,
                chunk_size: int | None = None) -> PairResult:
  """Scores of the given index pairs [P, 2] over the sharded pair axis of `mesh`."""
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
  if metric == "pwcca" and bases.w is None:
    raise ValueError("PWCCA needs bases computed with metric='pwcca'")
  pairs = np.asarray(pairs, dtype=np.int32).reshape(-1, 2)
  r = bases.u.shape[0]
  if pairs.size and (pairs.min() < 0 or pairs.max() >= r):
    raise ValueError(f"pair indices must lie in [0, {r}); got range [{pairs.min()}, {pairs.max()}]")
  rank = np.asarray(bases.rank)
  if pairs.shape[0] == 0:
    empty = np.zeros((0,), np.float64)
    return PairResult(empty, rank[:0], rank[:0])
  _, n, k = bases.u.shape
  d = 0 if bases.w is None else bases.w.shape[-1]
  chunk = chunk_size or auto_chunk_size(n, k, d, itemsize=np.dtype(bases.u.dtype).itemsize)
  mesh = mesh or sharding.pair_mesh()
  sharding.single_threaded_lapack()
  threads = 1
  if metric not in FULL_RANK_METRICS and mesh.devices.flat[0].platform == "cpu":
    # jaxlib's batched CPU LAPACK kernels fan a batch out onto XLA's intra-op thread pool and
    # block until it drains. Two executions at once (several CPU devices, or several host
    # threads) can leave every pool thread such a waiter: a deadlock. One pair at a time
    # keeps each eigensolve unbatched; several devices already run at once, and a single
    # device is fed from one host thread per core, or its eigensolves would share one core.
    chunk = 1
    threads = sharding.host_cores() if mesh.size == 1 else 1
  scores = sharding.map_pairs(_pairs_fn(metric, chunk), tuple(bases),
                              pairs, mesh=mesh, chunk_size=chunk, threads=threads)
  return PairResult(np.asarray(scores, np.float64), rank[pairs[:, 0]], rank[pairs[:, 1]])


def all_pairs(r: int) -> np.ndarray:
  """Upper-triangle index pairs (i < j) of r representations."""
  i, j = np.triu_indices(r, k=1)
  return np.stack([i, j], axis=1).astype(np.int32)
