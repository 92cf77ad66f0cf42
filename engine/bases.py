"""Per-representation bases: one SVD per representation, never one per pair.

After centring and truncating to the top singular directions (those explaining `threshold` of
the variance), U has orthonormal columns, and CCA is invariant to invertible rescaling, so the
canonical correlations of two representations are the singular values of U_a^T U_b
(engine.pair_metrics). The data-dependent rank k is handled with static shapes: bases are
padded to a fixed width and masked.
"""

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
    _prepared(a, d, dtype, out=out[i])
  return out


def _prepared(a: np.ndarray, width: int, dtype, out: np.ndarray | None = None) -> np.ndarray:
  """One representation centred and scaled to unit RMS in float64, zero-padded to `width`
  columns, then cast (see _stack); written into `out` (zeros) when given."""
  centred = a.astype(np.float64) - a.mean(axis=0, dtype=np.float64)
  rms = np.sqrt(np.mean(centred * centred))
  out = np.zeros((a.shape[0], width), dtype=dtype) if out is None else out
  out[:, : a.shape[1]] = centred / rms if rms > 0 else centred
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
  width = max(a.shape[1] for a in arrays)
  if on_cpu and parallel:  # a batched CPU LAPACK call mostly keeps one core busy: feed them all
    # Each thread prepares its own representation too (NumPy releases the GIL): 0.8 s of
    # serial preparation at R=60, n=1000, d=1024 otherwise.
    parts = sharding.host_map(lambda a: one(_prepared(a, width, dtype)), arrays,
                              sharding.host_cores())
    if trim:  # cut before stacking: the full [n, min(n, d)] bases are mostly zero columns
      k = _trimmed_width(max(int(p[3]) for p in parts), parts[0][0].shape[-1])
      parts = [(p[0][:, :k], p[1][:k], None if p[2] is None else p[2][:k], p[3]) for p in parts]
    u, s, w, rank = jax.tree.map(lambda *leaves: jnp.stack(leaves), *parts)
  else:
    u, s, w, rank = batched(_stack(arrays, dtype))
  rank_np = np.asarray(rank)
  n = arrays[0].shape[0]
  if dims is not None:
    u, s, w, rank, rank_np = _fix_dims(u, s, w, rank_np, dims, names)
  if warn and metric not in FULL_RANK_METRICS:
    _warn_degenerate(rank_np, n, names)
  if trim:
    k = _trimmed_width(rank_np.max(), u.shape[-1])
    u, s = u[..., :k], s[..., :k]
    w = w[:, :k] if w is not None else None
  return Bases(u=u, s=s, w=w, rank=rank)


def _trimmed_width(rank: int, width: int) -> int:
  """The largest kept rank rounded up to a multiple of 8 (similar sweeps share shapes)."""
  return min(width, int(math.ceil(rank / 8) * 8))


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
