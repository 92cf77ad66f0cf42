"""The field's reference: google/svcca's per-pair algorithm, re-implemented in NumPy.

Per pair: centre and SVD both representations (neurons x datapoints layout), keep the top
directions explaining the variance threshold, then `get_cca_similarity`'s steps: the joint
covariance, normalisation by its largest entries, inverse square roots of the auto-covariances
through eigendecompositions, and an SVD of the whitened cross-covariance. The mean of the
canonical correlations is the SVCCA score. Used for timing and as a second reference.
"""
from __future__ import annotations

import numpy as np


def _svd_reduce(acts: np.ndarray, threshold: float) -> np.ndarray:
  """acts [neurons, datapoints] -> [k, datapoints], the top-k singular directions times s."""
  centred = acts - acts.mean(axis=1, keepdims=True)
  _, s, vt = np.linalg.svd(centred, full_matrices=False)
  frac = np.cumsum(s**2) / np.sum(s**2)
  k = int(np.searchsorted(frac, threshold) + 1)
  return s[:k, None] * vt[:k]


def _inv_sqrt(sigma: np.ndarray, epsilon: float) -> np.ndarray:
  sigma = sigma + epsilon * np.eye(sigma.shape[0])
  w, v = np.linalg.eigh(np.linalg.pinv(sigma))
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def cca_similarity(acts1: np.ndarray, acts2: np.ndarray, epsilon: float = 1e-10) -> np.ndarray:
  """Canonical correlations of [neurons, datapoints] activations, as get_cca_similarity does."""
  nx = acts1.shape[0]
  cov = np.cov(acts1, acts2)
  sxx, sxy, syy = cov[:nx, :nx], cov[:nx, nx:], cov[nx:, nx:]
  xmax, ymax = np.max(np.abs(sxx)), np.max(np.abs(syy))
  sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)
  ixx, iyy = _inv_sqrt(sxx, epsilon), _inv_sqrt(syy, epsilon)
  u, s, vt = np.linalg.svd(ixx @ sxy @ iyy)
  # The reference also forms the canonical directions of both inputs.
  _ = (u.T @ ixx) @ (acts1 - acts1.mean(axis=1, keepdims=True))
  _ = (vt @ iyy) @ (acts2 - acts2.mean(axis=1, keepdims=True))
  return np.abs(s)


def svcca(x: np.ndarray, y: np.ndarray, threshold: float = 0.99) -> float:
  """x [n, d1], y [n, d2] (rows are sentences, as in this project)."""
  a = _svd_reduce(np.asarray(x, np.float64).T, threshold)
  b = _svd_reduce(np.asarray(y, np.float64).T, threshold)
  rho = cca_similarity(a, b)
  return float(np.mean(rho[: min(a.shape[0], b.shape[0])]))
