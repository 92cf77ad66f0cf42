"""Permutation nulls for pair scores, in the kernel.

A raw SVCCA score of unrelated data is high and depends on n, the kept ranks and the spectra,
so every score needs its chance level. Shuffling the sentence alignment of one side gives it:
permuting rows commutes with centring, so the permuted basis of b is P U_b, the same basis with
its rows gathered. No new SVD; U_a^T P U_b for a block of permutations is one GEMM, followed by
one batch of small spectra. PWCCA's weights belong to side a, which is never permuted.

One seeded set of permutations serves every pair of a run, so results are reproducible and a
resumed run scores the null of its remaining pairs exactly as an uninterrupted one would.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from engine import bases as bases_lib
from engine import pair_metrics, sharding

HIGHEST = bases_lib.HIGHEST
# Metrics whose per-permutation work calls LAPACK (a small spectrum). On one CPU device a
# batch of them is one batched call that fans out over XLA's pool; several CPU devices run at
# once, so there each call stays unbatched (pair_metrics.pair_scores: batched calls can deadlock).
_SPECTRAL = ("svcca", "pwcca")


class NullResult(NamedTuple):
  """Per pair [P]: observed score, null mean and sd (ddof=1), count of null scores >= score."""
  score: np.ndarray
  null_mean: np.ndarray
  null_sd: np.ndarray
  exceed: np.ndarray
  rank_a: np.ndarray
  rank_b: np.ndarray


def _int(value, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{what} must be an integer, got {value!r}")
  return int(value)


def _check_count_seed(count, seed) -> tuple[int, int]:
  count = _int(count, "permutations")
  seed = _int(seed, "seed")
  if count < 2:
    raise ValueError(f"permutations must be at least 2 to estimate the null's spread, got {count}")
  if seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed}")
  return count, seed


def permutations(n: int, count: int, seed: int) -> np.ndarray:
  """`count` random permutations of n sentences [count, n] int32 from default_rng(seed)."""
  n = _int(n, "n")
  count, seed = _check_count_seed(count, seed)
  if n < 2:
    raise ValueError(f"a permutation null needs at least 2 sentences, got n={n}")
  rng = np.random.default_rng(seed)
  return rng.permuted(np.tile(np.arange(n, dtype=np.int32), (count, 1)), axis=1)


_draw = permutations  # calibrated's `permutations` argument shadows the name


# ----------------------------------------------------------------------------- kernel


def _singular_values(m: jax.Array, serial: bool) -> jax.Array:
  """Singular values of a batch [C, k, l], descending. No Gram: its float32 eigenvalues put
  exact zeros at ~sqrt(eps). `serial` keeps each LAPACK call unbatched (several CPU devices)."""
  def one(x):
    return jnp.linalg.svd(x, compute_uv=False)
  return jax.lax.map(one, m) if serial else one(m)


def _svcca_permuted(ua, sa, wa, ka, ubp, sb, wb, kb, *, serial, gemm_only):
  """SVCCA of a against a block of permuted copies ubp [C, n, K] of b -> [C].

  `gemm_only` (accelerators) takes each sum of singular values as the nuclear norm by
  Newton-Schulz iterations, batched GEMMs like the cross products, as pair_metrics does there.
  """
  del sa, sb, wa, wb
  m = jnp.einsum("nk,cnl->ckl", ua, ubp, precision=HIGHEST)
  k = jnp.minimum(ka, kb)
  if gemm_only:
    return pair_metrics.nuclear_norm_newton_schulz(m) / k
  sv = _singular_values(m, serial)
  return jnp.sum(jnp.where(jnp.arange(sv.shape[-1]) < k, sv, 0), axis=-1) / k


def _permuted_fn(metric: str, serial: bool, gemm_only: bool):
  """(ua, sa, wa, ka, ubp [C, n, K], sb, wb, kb) -> scores [C]."""
  if metric == "svcca":
    return functools.partial(_svcca_permuted, serial=serial, gemm_only=gemm_only)
  one = pair_metrics._PAIR_FNS[metric]
  if serial:
    def mapped(ua, sa, wa, ka, ubp, sb, wb, kb):
      return jax.lax.map(lambda ub: one(ua, sa, wa, ka, ub, sb, wb, kb), ubp)
    return mapped
  return jax.vmap(one, in_axes=(None, None, None, None, 0, None, None, None))


@functools.cache
def _null_block(metric: str, serial: bool, gemm_only: bool):
  """Per pair: scores under every permutation of a [G, C, n] stack (row 0: identity) -> stats."""
  scores_of = _permuted_fn(metric, serial, gemm_only)

  def block(replicated, pairs):
    (u, s, w, rank), perms, valid = replicated

    def one_pair(pair):
      i, j = pair[0], pair[1]
      wi = None if w is None else w[i]
      wj = None if w is None else w[j]
      ub = u[j]
      scores = jax.lax.map(lambda idx: scores_of(u[i], s[i], wi, rank[i], ub[idx], s[j], wj,
                                                 rank[j]), perms).reshape(-1)
      observed = scores[0]  # the same arithmetic as every null score: ties compare exactly
      count = jnp.sum(valid)
      mean = jnp.sum(jnp.where(valid, scores, 0)) / count
      var = jnp.sum(jnp.where(valid, (scores - mean) ** 2, 0)) / (count - 1)
      exceed = jnp.sum(valid & (scores >= observed))
      return jnp.stack([observed, mean, jnp.sqrt(var), exceed.astype(scores.dtype)])

    return jax.lax.map(one_pair, pairs)

  return block


def auto_perm_chunk(n: int, k: int, d: int, count: int, budget_bytes: int = 32 << 20,
                    itemsize: int = 4) -> int:
  """Permutations per GEMM block so one block's gathered bases stay within a memory budget,
  balanced so the padding of `count` rows to whole blocks stays below one row per block."""
  per_perm = (n * k + k * k + k * d) * itemsize
  most = int(max(1, min(count, budget_bytes // max(per_perm, 1))))
  blocks = -(-count // most)
  return -(-count // blocks)


def _check_perms(perms, n: int) -> np.ndarray:
  perms = np.asarray(perms)
  if perms.ndim != 2 or perms.shape[1] != n:
    raise ValueError(f"permutations must be an array [B, n={n}], got shape {perms.shape}")
  if perms.shape[0] < 2:
    raise ValueError(f"permutations must be at least 2 to estimate the null's spread, "
                     f"got {perms.shape[0]}")
  if not np.issubdtype(perms.dtype, np.integer):
    raise ValueError(f"permutations must be integer indices, got dtype {perms.dtype}")
  bad = np.flatnonzero(np.any(np.sort(perms, axis=1) != np.arange(n), axis=1))
  if bad.size:
    raise ValueError(f"permutations row {bad[0]} is not a permutation of 0..{n - 1}; "
                     "use engine.null.permutations")
  return perms.astype(np.int32)


def pair_null(bases: bases_lib.Bases, pairs: np.ndarray, perms: np.ndarray, *, metric: str,
              mesh=None, perm_chunk: int | None = None) -> NullResult:
  """Scores of pairs [P, 2] and their null under the permutations [B, n] of side b's sentences,
  over the sharded pair axis of `mesh` (as pair_metrics.pair_scores)."""
  if metric not in bases_lib.METRICS:
    raise ValueError(f"unknown metric {metric!r}; choose one of {bases_lib.METRICS}")
  if metric == "pwcca" and bases.w is None:
    raise ValueError("PWCCA needs bases computed with metric='pwcca'")
  r, n, k = bases.u.shape
  pairs = np.asarray(pairs, dtype=np.int32).reshape(-1, 2)
  if pairs.size and (pairs.min() < 0 or pairs.max() >= r):
    raise ValueError(f"pair indices must lie in [0, {r}); got range [{pairs.min()}, {pairs.max()}]")
  perms = _check_perms(perms, n)
  rank = np.asarray(bases.rank)
  if pairs.shape[0] == 0:
    empty = np.zeros((0,), np.float64)
    return NullResult(empty, empty, empty, np.zeros((0,), np.int64), rank[:0], rank[:0])
  rows = perms.shape[0] + 1
  d = 0 if bases.w is None else bases.w.shape[-1]
  chunk = perm_chunk or auto_perm_chunk(n, k, d, rows, itemsize=np.dtype(bases.u.dtype).itemsize)
  blocks = -(-rows // chunk)
  identity = np.arange(n, dtype=np.int32)
  stack = np.tile(identity, (blocks * chunk, 1))
  stack[1:rows] = perms
  valid = np.zeros(blocks * chunk, bool)
  valid[1:rows] = True
  mesh = mesh or sharding.pair_mesh()
  sharding.single_threaded_lapack()
  on_cpu = mesh.devices.flat[0].platform == "cpu"
  # One CPU device is fed from one host thread per core, each running its LAPACK calls
  # unbatched (a batched call from one thread mostly kept one core busy: 211 vs 343 permuted
  # scores/s at n=1000, K=288; batched calls from several threads can deadlock).
  threads = sharding.host_cores() if on_cpu and mesh.size == 1 else 1
  serial = metric in _SPECTRAL and on_cpu and (mesh.size > 1 or threads > 1)
  out = sharding.map_pairs(_null_block(metric, serial, not on_cpu),
                           (tuple(bases), stack.reshape(blocks, chunk, n), valid),
                           pairs, mesh=mesh, chunk_size=1, threads=threads)
  out = np.asarray(out, np.float64)
  return NullResult(score=out[:, 0], null_mean=out[:, 1], null_sd=out[:, 2],
                    exceed=np.rint(out[:, 3]).astype(np.int64),
                    rank_a=rank[pairs[:, 0]], rank_b=rank[pairs[:, 1]])


# ----------------------------------------------------------------------------- public API


def finish(result: NullResult, permutations: int) -> dict[str, np.ndarray]:
  """z = (score - null_mean) / null_sd and p = (1 + #null >= score) / (1 + permutations)."""
  permutations, _ = _check_count_seed(permutations, 0)
  if np.any(result.exceed > permutations):
    raise ValueError(f"permutations={permutations} is fewer than the null counts; pass the number "
                     "of permutations the result was computed with")
  with np.errstate(divide="ignore", invalid="ignore"):
    z = (result.score - result.null_mean) / result.null_sd
  return dict(score=result.score, null_mean=result.null_mean, null_sd=result.null_sd, z=z,
              p_value=(1.0 + result.exceed) / (1.0 + permutations),
              rank_a=result.rank_a, rank_b=result.rank_b)


def calibrated(reps, pairs=None, *, metric: str = "svcca", threshold: float = 0.99,
               permutations: int = 1000, seed: int = 0, names: Sequence[str] | None = None,
               dims: int | None = None, mesh=None) -> dict[str, np.ndarray]:
  """Scores with their permutation null (svcca.calibrated): one SVD per representation, one
  seeded set of permutations for every pair; pairs=None means every i < j (all_pairs order)."""
  count, seed = _check_count_seed(permutations, seed)
  bases = bases_lib.compute_bases(reps, metric=metric, threshold=threshold, names=names, dims=dims)
  r, n = bases.u.shape[:2]
  perms = _draw(n, count, seed)
  pairs = pair_metrics.all_pairs(r) if pairs is None else pairs
  return finish(pair_null(bases, pairs, perms, metric=metric, mesh=mesh), count)
