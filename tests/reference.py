"""Independent float64 NumPy references: the textbook algorithms, one pair at a time."""
from __future__ import annotations

import numpy as np


def kept_rank(s: np.ndarray, threshold: float) -> int:
  frac = np.cumsum(s**2) / np.sum(s**2)
  return int(np.searchsorted(frac, threshold) + 1) if threshold < 1 else int(np.sum(s > s[0] * 1e-12))


def reduce(x: np.ndarray, threshold: float) -> np.ndarray:
  """Centre, SVD, keep the directions explaining `threshold` of the squared-singular-value variance."""
  xc = np.asarray(x, np.float64)
  xc = xc - xc.mean(axis=0)
  u, s, vt = np.linalg.svd(xc, full_matrices=False)
  k = kept_rank(s, threshold)
  return xc @ vt[:k].T  # the data in its top-k singular directions: [n, k]


def canonical(xr: np.ndarray, yr: np.ndarray):
  """CCA via QR + SVD: canonical correlations and the canonical variates of x."""
  qx, _ = np.linalg.qr(xr - xr.mean(axis=0))
  qy, _ = np.linalg.qr(yr - yr.mean(axis=0))
  a, rho, _ = np.linalg.svd(qx.T @ qy, full_matrices=False)
  m = min(xr.shape[1], yr.shape[1])
  return rho[:m], (qx @ a)[:, :m]


def svcca(x, y, threshold: float = 0.99) -> float:
  rho, _ = canonical(reduce(x, threshold), reduce(y, threshold))
  return float(np.mean(rho))


def pwcca(x, y, threshold: float = 0.99) -> float:
  """Morcos et al.: weights alpha_i = sum_j |<h_i, x_j>| over x's centred features."""
  rho, h = canonical(reduce(x, threshold), reduce(y, threshold))
  xc = np.asarray(x, np.float64) - np.mean(x, axis=0)
  alpha = np.abs(h.T @ xc).sum(axis=1)
  return float(np.sum(alpha * rho) / np.sum(alpha))


def linear_cka(x, y) -> float:
  xc = np.asarray(x, np.float64) - np.mean(x, axis=0)
  yc = np.asarray(y, np.float64) - np.mean(y, axis=0)
  return float(np.linalg.norm(yc.T @ xc) ** 2 /
               (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))


def unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
  """Song et al. (2012), eq. 5: the unbiased HSIC estimator of two n x n kernel matrices."""
  n = k.shape[0]
  kt = k - np.diag(np.diag(k))
  lt = l - np.diag(np.diag(l))
  one = np.ones(n)
  return float((np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * (one @ kt @ lt @ one)) / (n * (n - 3)))


def cka_debiased(x, y) -> float:
  """Linear CKA with unbiased HSIC (Murphy et al. 2024). The estimator is invariant to shifting
  features; centring first only keeps a large offset from swamping the Gram in float64."""
  x = np.asarray(x, np.float64) - np.mean(x, axis=0)
  y = np.asarray(y, np.float64) - np.mean(y, axis=0)
  k, l = x @ x.T, y @ y.T
  return unbiased_hsic(k, l) / np.sqrt(unbiased_hsic(k, k) * unbiased_hsic(l, l))


def permutation_null(x, y, perms: np.ndarray, metric: str, threshold: float = 0.99) -> np.ndarray:
  """The metric of x against y with its sentences (rows) reordered by each permutation."""
  return np.array([METRICS[metric](x, y[p], threshold=threshold) for p in perms])


METRICS = {"svcca": svcca, "pwcca": pwcca, "cka": lambda x, y, threshold=None: linear_cka(x, y),
           "cka_debiased": lambda x, y, threshold=None: cka_debiased(x, y)}


def reduce_dims(x: np.ndarray, k: int) -> np.ndarray:
  """Centre, SVD, keep exactly the top k singular directions (fixed-dimension SVCCA)."""
  xc = np.asarray(x, np.float64)
  xc = xc - xc.mean(axis=0)
  _, _, vt = np.linalg.svd(xc, full_matrices=False)
  return xc @ vt[:k].T
