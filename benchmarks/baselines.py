"""The per-pair ways people compute SVCCA, timed against the kernel.

Each recomputes both representations' SVDs for every pair, as the field's code does:
- `naive_jax`: the obvious JAX port, one jit'd function per pair (centre, SVD both, keep the
  top directions by a mask since jit needs static shapes, QR both, singular values of Q_a^T Q_b);
- `torch_svcca`: the same steps in PyTorch with torch.linalg per pair, slicing to the kept rank;
- `repsim_svcca`: the `repsim` package (PyPI, C++/Eigen), all pairs in one call, if installed
  (its own variant of the score, see there).
All take rows as sentences ([n, d]) and return the mean canonical correlation over
min(k_a, k_b), the google/svcca score.
"""
from __future__ import annotations

import functools

import numpy as np


@functools.cache
def _naive_jax_fn(threshold: float):
  import jax
  import jax.numpy as jnp

  def reduce(x):
    xc = x - jnp.mean(x, axis=0, keepdims=True)
    u, s, _ = jnp.linalg.svd(xc, full_matrices=False)
    frac = jnp.cumsum(s * s) / jnp.sum(s * s)
    k = jnp.sum(frac < threshold) + 1
    keep = jnp.arange(s.shape[0]) < k
    return jnp.where(keep, u * s, 0), keep, k

  @jax.jit
  def pair(x, y):
    a, keep_a, ka = reduce(x)
    b, keep_b, kb = reduce(y)
    qa = jnp.where(keep_a, jnp.linalg.qr(a)[0], 0)  # zero columns come last: Q's first k span A
    qb = jnp.where(keep_b, jnp.linalg.qr(b)[0], 0)
    rho = jnp.linalg.svd(jnp.matmul(qa.T, qb, precision=jax.lax.Precision.HIGHEST),
                         compute_uv=False)  # descending
    kmin = jnp.minimum(ka, kb)
    return jnp.sum(jnp.where(jnp.arange(rho.shape[0]) < kmin, rho, 0)) / kmin

  return pair


def naive_jax(x: np.ndarray, y: np.ndarray, threshold: float = 0.99) -> float:
  """One pair through a jit'd per-pair function (compiled once per shape)."""
  return float(_naive_jax_fn(float(threshold))(x, y))


def torch_svcca(x, y, threshold: float = 0.99, device: str = "cpu") -> float:
  """One pair with torch.linalg, as PyTorch SVCCA code is usually written."""
  import torch

  def reduce(t):
    t = t - t.mean(dim=0, keepdim=True)
    u, s, _ = torch.linalg.svd(t, full_matrices=False)
    frac = torch.cumsum(s**2, 0) / torch.sum(s**2)
    k = int(torch.sum(frac < threshold)) + 1
    return u[:, :k] * s[:k]

  with torch.inference_mode():
    a, b = reduce(torch.as_tensor(x, device=device)), reduce(torch.as_tensor(y, device=device))
    qa, _ = torch.linalg.qr(a)
    qb, _ = torch.linalg.qr(b)
    rho = torch.linalg.svdvals(qa.T @ qb)
    return float(rho[: min(a.shape[1], b.shape[1])].mean())


def repsim_available() -> bool:
  try:
    import repsim  # noqa: F401
  except ImportError:
    return False
  return True


def repsim_svcca(reps) -> np.ndarray:
  """`repsim.svcca(..., 'pillai')` over all pairs [R, R]: repsim's own SVCCA.

  Not google/svcca's score: repsim takes an orthonormal basis of each representation before
  its 99% variance cut (so the cut keeps nearly every direction, whatever the spectrum) and
  divides the summed canonical correlations by min(rank X_a, rank X_b). Timed, not compared.
  """
  import repsim
  return np.asarray(repsim.svcca([np.asarray(r, np.float64) for r in reps], "pillai"))
