"""The kernel's public API: SVCCA, PWCCA, linear and debiased CKA for many representations.

The key idea (DESIGN.md, "The kernel"): after centring and truncating to the top singular
directions, U already has orthonormal columns and CCA is invariant to invertible rescaling,
so the canonical correlations of X and Y are the singular values of U_x^T U_y. Hence one SVD
per representation (`compute_bases`, engine.bases), and per pair only a (k x n)(n x k) GEMM
and the singular values of that k x k matrix (`pair_scores`, engine.pair_metrics), batched
over a sharded pair axis; the permutation null reuses the same bases (`calibrated`,
engine.null). This module gathers those building blocks under one name.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine import null
from engine.bases import (FULL_RANK_METRICS, HIGHEST, METRICS, RANK_WARNING_FRACTION, Bases,
                          as_representations, basis, compute_bases)
from engine.pair_metrics import (PairResult, all_pairs, auto_chunk_size, eigenvalues,
                                 nuclear_norm_newton_schulz, pair_scores, score_pairs,
                                 singular_values)

__all__ = ["FULL_RANK_METRICS", "HIGHEST", "METRICS", "RANK_WARNING_FRACTION", "Bases",
           "PairResult", "all_pairs", "as_representations", "auto_chunk_size", "basis",
           "calibrated", "compute_bases", "eigenvalues", "linear_cka", "nuclear_norm_newton_schulz",
           "pair_scores", "pairwise", "pairwise_svcca", "pwcca", "score_pairs", "singular_values",
           "svcca"]


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
