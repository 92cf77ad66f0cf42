"""SVCCA, PWCCA and linear CKA for many representations at once.

The key idea (DESIGN.md, "The kernel"): after centring and truncating to the top singular
directions, U already has orthonormal columns and CCA is invariant to invertible rescaling,
so the canonical correlations of X and Y are the singular values of U_x^T U_y. Hence one SVD
per representation (`compute_bases`), and per pair only a (k x n)(n x k) GEMM and the singular
values of that k x k matrix (`pair_scores`), batched over a sharded pair axis. The data-dependent rank k is
handled with static shapes: bases are padded to a fixed width and masked.
"""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from engine import sharding

METRICS = ("svcca", "pwcca", "cka", "cka_debiased")
# Metrics that compare the full centred representations (nothing truncated, no small spectrum).
FULL_RANK_METRICS = ("cka", "cka_debiased")
HIGHEST = jax.lax.Precision.HIGHEST
# CCA between k-dimensional subspaces of R^n degenerates as k approaches n: two random
# k-dimensional subspaces already have large canonical correlations when k is a sizeable
# fraction of n. Warn past this fraction.
RANK_WARNING_FRACTION = 0.5


class Bases(NamedTuple):
  """Per-representation bases, padded to a common width K and masked beyond each rank.

  u:    [R, n, K] orthonormal kept directions of the centred data (zero columns past rank).
  s:    [R, K]    their singular values (zero past rank).
  w:    [R, K, d] diag(s) V^T, how each kept direction loads on the original features
        (PWCCA's weights need it); None for the other metrics.
  rank: [R]       kept rank.
  """
  u: Any
  s: Any
  w: Any
  rank: Any


class PairResult(NamedTuple):
  score: np.ndarray   # [P]
  rank_a: np.ndarray  # [P]
  rank_b: np.ndarray  # [P]


# ----------------------------------------------------------------------------- validation


def _name(names: Sequence[str] | None, i: int) -> str:
  return names[i] if names is not None else f"representation {i}"


def as_representations(reps, names: Sequence[str] | None = None) -> list[np.ndarray]:
  """Checks a stack [R, n, d] or a list of [n, d_i] arrays; errors name the representation."""
  if isinstance(reps, (list, tuple)):
    arrays = [np.asarray(r) for r in reps]
  else:
    stacked = np.asarray(reps)
    if stacked.ndim != 3:
      raise ValueError(f"expected representations as [R, n, d] or a list of [n, d] arrays, "
                       f"got an array of shape {stacked.shape}")
    arrays = list(stacked)
  if names is not None and len(names) != len(arrays):
    raise ValueError(f"{len(names)} names for {len(arrays)} representations")
  if not arrays:
    raise ValueError("no representations given")
  n0 = None
  for i, a in enumerate(arrays):
    name = _name(names, i)
    if a.ndim != 2:
      raise ValueError(f"{name}: expected a [n, d] array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number):
      raise ValueError(f"{name}: expected numbers, got dtype {a.dtype}")
    if a.shape[0] < 2:
      raise ValueError(f"{name}: needs at least 2 samples, has {a.shape[0]}")
    if a.shape[1] < 1:
      raise ValueError(f"{name}: has no features")
    if n0 is None:
      n0 = a.shape[0]
    elif a.shape[0] != n0:
      raise ValueError(f"{name}: has {a.shape[0]} samples but {_name(names, 0)} has {n0}; "
                       "all representations must describe the same sentences")
    finite = np.isfinite(a)
    if not finite.all():
      bad = np.argwhere(~finite)[0]
      raise ValueError(f"{name}: contains NaN or Inf (first at sample {bad[0]}, feature {bad[1]})")
    if not np.any(a != a[:1]):
      raise ValueError(f"{name}: is constant across samples (zero variance); CCA is undefined")
  return arrays


def _stack(arrays: list[np.ndarray], dtype) -> np.ndarray:
  """Centred, unit-RMS representations zero-padded to a common width.

  Centring and scaling happen in float64 before the cast: a large offset would otherwise
  round the variation away in float32, and scales near 1e-12 or 1e9 would under- or overflow
  CKA's fourth powers. Every metric here is invariant to both. Zero columns add no variance,
  so the padding is exact.
  """
  d = max(a.shape[1] for a in arrays)
  out = np.zeros((len(arrays), arrays[0].shape[0], d), dtype=dtype)
  for i, a in enumerate(arrays):
    centred = a.astype(np.float64) - a.mean(axis=0, dtype=np.float64)
    rms = np.sqrt(np.mean(centred * centred))
    out[i, :, : a.shape[1]] = centred / rms if rms > 0 else centred
  return out


# ----------------------------------------------------------------------------- bases


def _kept_rank(s: jax.Array, threshold: float, n: int, d: int) -> jax.Array:
  """Smallest k whose top-k squared singular values explain `threshold` of the variance.

  threshold >= 1 keeps the numerical rank. Singular values at round-off level never count.
  """
  var = s * s
  total = jnp.sum(var)
  eps = jnp.finfo(s.dtype).eps
  numerical = jnp.sum(s > s[0] * eps * max(n, d))
  if threshold >= 1.0:
    return numerical.astype(jnp.int32)
  frac = jnp.cumsum(var) / total
  k = jnp.sum(frac < threshold) + 1
  return jnp.clip(jnp.minimum(k, numerical), 1, s.shape[0]).astype(jnp.int32)


def basis(x: jax.Array, *, threshold: float = 0.99, with_weights: bool = False,
          reorthogonalize: bool = False):
  """One representation [n, d] -> masked (u [n, K], s [K], w [K, d] | None, rank), K = min(n, d).

  `reorthogonalize` replaces the kept columns of u by the Q of their QR (signs kept): float32
  GPU SVDs return u off orthogonal by ~5e-4, which shifts every score by as much.
  """
  n, d = x.shape
  xc = x - jnp.mean(x, axis=0, keepdims=True)
  u, s, vt = jnp.linalg.svd(xc, full_matrices=False)
  rank = _kept_rank(s, threshold, n, d)
  keep = jnp.arange(s.shape[0]) < rank
  s = jnp.where(keep, s, 0)
  u = jnp.where(keep[None, :], u, 0)
  if reorthogonalize:
    q, r = jnp.linalg.qr(u)
    sign = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(u.dtype)
    u = jnp.where(keep[None, :], q * sign[None, :], 0)
  w = (s[:, None] * vt) if with_weights else None
  return u, s, w, rank


_basis = jax.jit(basis, static_argnames=("threshold", "with_weights", "reorthogonalize"))


def _gram_basis(x: jax.Array, *, threshold: float, with_weights: bool):
  """`basis` from a float64 Gram matrix on the smaller side and its eigendecomposition.

  Measured on CPU (n=1000): 1.1-3.5x faster than the float32 SVD, and more accurate: the
  float64 Gram's eigenvalues err by eps64 ||X||^2, so kept singular values and the span at the
  cut are float32-exact, where the float32 SVD's span errs by eps32 sigma_1 / gap. Needs
  jax_enable_x64 while traced (`_x64`); round-off directions come out at ~sqrt(eps64) sigma_1,
  far below float32's numerical-rank cut, so float32 inputs only.
  """
  n, d = x.shape
  xd = x.astype(jnp.float64)
  xd = xd - jnp.mean(xd, axis=0, keepdims=True)
  if n <= d:
    lam, u = jnp.linalg.eigh(jnp.matmul(xd, xd.T, precision=HIGHEST))
    lam, u = lam[::-1], u[:, ::-1]
    s = jnp.sqrt(jnp.clip(lam, 0.0))
    w = jnp.matmul(u.T, xd, precision=HIGHEST) if with_weights else None  # diag(s) V^T
  else:
    lam, v = jnp.linalg.eigh(jnp.matmul(xd.T, xd, precision=HIGHEST))
    lam, v = lam[::-1], v[:, ::-1]
    s = jnp.sqrt(jnp.clip(lam, 0.0))
    u = jnp.matmul(xd, v, precision=HIGHEST) / jnp.where(s > 0, s, 1.0)[None, :]
    w = (s[:, None] * v.T) if with_weights else None
  rank = _kept_rank(s.astype(x.dtype), threshold, n, d)
  keep = jnp.arange(s.shape[0]) < rank
  u = jnp.where(keep[None, :], u, 0).astype(x.dtype)
  s = jnp.where(keep, s, 0).astype(x.dtype)
  w = w.astype(x.dtype) if w is not None else None
  return u, s, w, rank


_gram_basis_jit = jax.jit(_gram_basis, static_argnames=("threshold", "with_weights"))


@functools.partial(jax.jit, static_argnames=("threshold", "with_weights"))
def _gram_bases(x: jax.Array, *, threshold: float, with_weights: bool):
  return jax.vmap(functools.partial(_gram_basis, threshold=threshold,
                                    with_weights=with_weights))(x)


def _x64(fn):
  """fn run with float64 enabled (thread-local), for the float64 steps of a float32 pipeline."""
  def run(*args, **kwargs):
    with jax.enable_x64(True):
      return jax.block_until_ready(fn(*args, **kwargs))
  return run


@functools.partial(jax.jit, static_argnames=("threshold", "with_weights", "reorthogonalize"))
def _bases(x: jax.Array, *, threshold: float, with_weights: bool, reorthogonalize: bool):
  return jax.vmap(functools.partial(basis, threshold=threshold, with_weights=with_weights,
                                    reorthogonalize=reorthogonalize))(x)


def _metric_threshold(metric: str, threshold: float) -> float:
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f"threshold must be in (0, 1], got {threshold}")
  # CKA compares the full centred representations: nothing is truncated.
  return 1.0 if metric in FULL_RANK_METRICS else float(threshold)


def compute_bases(reps, *, metric: str = "svcca", threshold: float = 0.99,
                  names: Sequence[str] | None = None, dtype=None,
                  trim: bool = True, warn: bool = True,
                  reorthogonalize: bool | None = None, parallel: bool = True,
                  dims: int | None = None) -> Bases:
  """One SVD per representation, never one per pair (on CPU in float32: the eigendecomposition
  of its float64 Gram matrix, `_gram_basis`).

  Returns bases padded to K columns; with `trim` K is cut to the largest kept rank (rounded up
  to a multiple of 8 so similar sweeps share compiled shapes), which shrinks every pair GEMM.
  `dims` keeps exactly that many directions for every representation instead of a variance
  threshold (fixed-dimension SVCCA), so scores of different families share one null level.
  """
  threshold = _metric_threshold(metric, threshold)
  arrays = as_representations(reps, names)
  if metric == "cka_debiased" and arrays[0].shape[0] < 4:
    raise ValueError(f"cka_debiased needs at least 4 samples, got {arrays[0].shape[0]}")
  if dims is not None:
    _check_dims(dims, metric, arrays[0].shape[0])
    threshold = 1.0  # the numerical rank, checked against dims below
  sharding.single_threaded_lapack()
  dtype = np.dtype(dtype or sharding.default_dtype())
  x = _stack(arrays, dtype)
  on_cpu = jax.default_backend() == "cpu"
  if reorthogonalize is None:  # CPU LAPACK's u is orthogonal to float32 round-off already
    reorthogonalize = not on_cpu
  options = dict(threshold=threshold, with_weights=metric == "pwcca",
                 reorthogonalize=bool(reorthogonalize))
  one, batched = functools.partial(_basis, **options), functools.partial(_bases, **options)
  if on_cpu and dtype == np.float32 and not reorthogonalize:
    gram = dict(threshold=threshold, with_weights=metric == "pwcca")
    one = _x64(functools.partial(_gram_basis_jit, **gram))
    batched = _x64(functools.partial(_gram_bases, **gram))
  if on_cpu and parallel:  # a batched CPU LAPACK call mostly keeps one core busy: feed them all
    parts = sharding.host_map(one, list(x), sharding.host_cores())
    u, s, w, rank = jax.tree.map(lambda *leaves: jnp.stack(leaves), *parts)
  else:
    u, s, w, rank = batched(x)
  rank_np = np.asarray(rank)
  n = x.shape[1]
  if dims is not None:
    u, s, w, rank, rank_np = _fix_dims(u, s, w, rank_np, dims, names)
  if warn and metric not in FULL_RANK_METRICS:
    _warn_degenerate(rank_np, n, names)
  if trim:
    k = min(u.shape[-1], int(math.ceil(rank_np.max() / 8) * 8))
    u, s = u[..., :k], s[..., :k]
    w = w[:, :k] if w is not None else None
  return Bases(u=u, s=s, w=w, rank=rank)


def _check_dims(dims, metric: str, n: int) -> None:
  if isinstance(dims, bool) or not isinstance(dims, (int, np.integer)) or dims < 1:
    raise ValueError(f"svd_dims must be a positive integer, got {dims!r}")
  if metric in FULL_RANK_METRICS:
    raise ValueError(f"svd_dims applies to SVCCA and PWCCA; {metric} compares full representations")
  if dims > n:
    raise ValueError(f"svd_dims={dims} exceeds the number of samples n={n}; use at most {n - 1}")


def _fix_dims(u, s, w, rank: np.ndarray, dims: int, names):
  """Keeps the top `dims` directions of each basis; refuses a representation of lower rank."""
  short = np.flatnonzero(rank < dims)
  if short.size:
    i = int(short[0])
    raise ValueError(f"{_name(names, i)}: numerical rank {rank[i]} is below svd_dims={dims}; "
                     "lower svd_dims")
  keep = jnp.arange(u.shape[-1]) < dims
  u = jnp.where(keep, u, 0)
  s = jnp.where(keep, s, 0)
  w = jnp.where(keep[:, None], w, 0) if w is not None else None
  rank = np.full_like(rank, dims)
  return u, s, w, jnp.asarray(rank), rank


def _warn_degenerate(rank: np.ndarray, n: int, names) -> None:
  close = np.flatnonzero(rank >= RANK_WARNING_FRACTION * n)
  if close.size:
    worst = int(close[np.argmax(rank[close])])
    warnings.warn(
        f"{close.size} representation(s) keep a rank close to the number of samples n={n} "
        f"(e.g. {_name(names, worst)}: rank {rank[worst]}); CCA degenerates there and scores are "
        "inflated. Use more sentences or a lower threshold.", RuntimeWarning, stacklevel=3)


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


# ----------------------------------------------------------------------------- public API


def all_pairs(r: int) -> np.ndarray:
  """Upper-triangle index pairs (i < j) of r representations."""
  i, j = np.triu_indices(r, k=1)
  return np.stack([i, j], axis=1).astype(np.int32)


def pairwise(reps, *, metric: str = "svcca", threshold: float = 0.99, pairs=None, mesh=None,
             names: Sequence[str] | None = None, chunk_size: int | None = None) -> np.ndarray:
  """Scores for `pairs` [P, 2] -> [P], or with pairs=None the [R, R] matrix.

  SVCCA and CKA are symmetric, so the matrix is filled from the upper triangle with ones on
  the diagonal; PWCCA weights on its first argument, so every ordered pair is computed.
  """
  bases = compute_bases(reps, metric=metric, threshold=threshold, names=names)
  if pairs is not None:
    return pair_scores(bases, pairs, metric=metric, mesh=mesh, chunk_size=chunk_size).score
  r = bases.u.shape[0]
  if metric == "pwcca":
    ii, jj = np.nonzero(~np.eye(r, dtype=bool))
    idx = np.stack([ii, jj], axis=1)
  else:
    idx = all_pairs(r)
  scores = pair_scores(bases, idx, metric=metric, mesh=mesh, chunk_size=chunk_size).score
  out = np.eye(r, dtype=np.float64)
  out[idx[:, 0], idx[:, 1]] = scores
  if metric != "pwcca":
    out[idx[:, 1], idx[:, 0]] = scores
  return out


def calibrated(reps, pairs=None, *, metric: str = "svcca", threshold: float = 0.99,
               permutations: int = 1000, seed: int = 0, names: Sequence[str] | None = None,
               dims: int | None = None) -> dict[str, np.ndarray]:
  """Scores with their permutation null: arrays [P] score, null_mean, null_sd, z, p_value,
  rank_a, rank_b (engine.null.calibrated); pairs=None means every i < j in all_pairs order."""
  from engine import null  # engine.null builds on this module
  return null.calibrated(reps, pairs, metric=metric, threshold=threshold,
                         permutations=permutations, seed=seed, names=names, dims=dims)


def pairwise_svcca(reps, *, threshold: float = 0.99, pairs=None, mesh=None) -> np.ndarray:
  """All-pairs SVCCA: [R, R] symmetric matrix, or the [P] scores of `pairs`."""
  return pairwise(reps, metric="svcca", threshold=threshold, pairs=pairs, mesh=mesh)


def _two(x, y, metric: str, threshold: float) -> float:
  return float(pairwise([x, y], metric=metric, threshold=threshold, names=["x", "y"],
                        pairs=[[0, 1]])[0])


def svcca(x, y, *, threshold: float = 0.99) -> float:
  """SVCCA of x [n, d1] and y [n, d2]: mean canonical correlation of their top subspaces."""
  return _two(x, y, "svcca", threshold)


def pwcca(x, y, *, threshold: float = 0.99) -> float:
  """PWCCA of x and y, weighted by x's canonical variates (asymmetric by design)."""
  return _two(x, y, "pwcca", threshold)


def linear_cka(x, y) -> float:
  """Linear CKA (Kornblith et al. 2019) of x [n, d1] and y [n, d2]."""
  return _two(x, y, "cka", 1.0)
