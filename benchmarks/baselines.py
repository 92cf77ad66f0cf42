"""The ways people compute SVCCA, timed against the kernel.

Per pair, recomputing both representations' SVDs for every pair as the field's code does:
- `naive_jax`: the obvious JAX port, one jit'd function per pair (centre, SVD both, keep the
  top directions by a mask since jit needs static shapes, QR both, singular values of Q_a^T Q_b);
- `torch_svcca`: the same steps in PyTorch with torch.linalg per pair, slicing to the kept rank;
- `repsim_svcca`: the `repsim` package (PyPI, C++/Eigen), all pairs in one call, if installed
  (its own variant of the score, see there).
Like for like with the kernel's key idea, all pairs at once:
- `numpy_bases_once`, `torch_bases_once`: each basis once, then batched pair spectra (below).
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


# ----------------------------------------------------------------------------- bases once
# What a user who knows the kernel's key idea writes without it: one SVD per representation,
# then per pair only the singular values of U_a^T U_b, batched. Bases are zero-padded to the
# widest kept rank so the pair spectra stack (zero columns add zero singular values).


def _kept(s, threshold: float) -> int:
  frac = np.cumsum(s * s) / np.sum(s * s)
  return int(np.searchsorted(frac, threshold) + 1)


def _score_block(rho, ka: int, kb) -> np.ndarray:
  """rho [m, K] descending -> mean of the first min(k_a, k_b) per row."""
  kmin = np.minimum(ka, kb)
  return np.where(np.arange(rho.shape[-1]) < kmin[:, None], rho, 0).sum(-1) / kmin


def numpy_bases_once(reps, threshold: float = 0.99, timings: dict | None = None) -> np.ndarray:
  """All-pairs SVCCA [P] (i < j order): np.linalg.svd once per representation, then one
  batched `np.linalg.svd(..., compute_uv=False)` over U_a^T [U_b1 ... U_bm] per a."""
  import time
  t0 = time.perf_counter()
  us, ks = [], []
  for x in reps:
    u, s, _ = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    ks.append(_kept(s, threshold))
    us.append(u)
  k = max(ks)
  u = np.stack([np.where(np.arange(k) < ka, ua[:, :k], 0) for ua, ka in zip(us, ks)])
  ks = np.asarray(ks)
  t1 = time.perf_counter()
  out = []
  for a in range(len(reps) - 1):
    m = u[a].T @ u[a + 1:]  # [m, K, K]
    out.append(_score_block(np.linalg.svd(m, compute_uv=False), ks[a], ks[a + 1:]))
  scores = np.concatenate(out) if out else np.zeros(0)
  if timings is not None:
    timings.update(bases_s=t1 - t0, pairs_s=time.perf_counter() - t1)
  return scores


def torch_bases_once(reps, threshold: float = 0.99, device: str = "cpu",
                     timings: dict | None = None) -> np.ndarray:
  """The same in PyTorch: torch.linalg.svd per representation, batched torch.linalg.svdvals."""
  import time

  import torch
  with torch.inference_mode():
    t0 = time.perf_counter()
    x = torch.as_tensor(np.asarray(reps), device=device)
    u, s, _ = torch.linalg.svd(x - x.mean(dim=1, keepdim=True), full_matrices=False)
    frac = torch.cumsum(s * s, -1) / torch.sum(s * s, -1, keepdim=True)
    ks = torch.sum(frac < threshold, -1) + 1
    k = int(ks.max())
    u = torch.where(torch.arange(k, device=device) < ks[:, None, None], u[..., :k], 0)
    if device != "cpu":
      torch.cuda.synchronize()
    t1 = time.perf_counter()
    out = []
    for a in range(len(reps) - 1):
      rho = torch.linalg.svdvals(u[a].T @ u[a + 1:])
      kmin = torch.minimum(ks[a], ks[a + 1:])
      keep = torch.arange(k, device=device) < kmin[:, None]
      out.append((torch.where(keep, rho, 0).sum(-1) / kmin).cpu())
    scores = torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)
    if timings is not None:
      timings.update(bases_s=t1 - t0, pairs_s=time.perf_counter() - t1)
    return scores
