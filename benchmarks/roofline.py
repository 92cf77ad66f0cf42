"""FLOP counts of the all-pairs SVCCA algorithm, and the machine's measured GEMM rate to hold
them against.

Bases: one thin SVD of each centred [n, d] representation (gesdd's operation count). Pairs: U_a^T U_b (2nK^2) and the
Householder bidiagonalisation of that K x K matrix for its singular values (~8/3 K^3; the
values of the bidiagonal are O(K^2)), with K the padded width the kernel actually computes with.
"""
from __future__ import annotations

import statistics
import time


def svd_flops(m: int, n: int) -> float:
  """Thin SVD with U and V of an m x n matrix as LAPACK's gesdd does it (approximate).

  M >= N the long and short sides. Householder bidiagonalisation (4MN^2 - 4/3 N^3),
  divide-and-conquer vectors of the bidiagonal (~8/3 N^3) and the reflectors applied to them
  (4MN^2 - 2N^3 and 2N^3): 8MN^2 + 4/3 N^3. When M >= 11N/6 a QR comes first (QR, thin Q, the
  N x N SVD, one GEMM): 6MN^2 + 8N^3.
  """
  big, small = max(m, n), min(m, n)
  if 6 * big >= 11 * small:
    return 6 * big * small**2 + 8 * small**3
  return 8 * big * small**2 + 4 / 3 * small**3


def bases_flops(r: int, n: int, d: int) -> float:
  return r * (svd_flops(n, d) + 2 * n * d)  # the SVDs and the centring


def pair_flops(n: int, k: int) -> float:
  """GEMM U_a^T U_b (2nk^2) and its bidiagonal reduction (~8/3 k^3)."""
  return 2 * n * k * k + 8 / 3 * k**3


def gemm_gflops(size: int = 2048, repeats: int = 5) -> float:
  """float32 GEMM at HIGHEST precision through XLA on the default device: the ceiling."""
  import jax
  import jax.numpy as jnp
  a = jnp.asarray(jax.random.normal(jax.random.key(0), (size, size), jnp.float32))
  f = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
  f(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * size**3 / statistics.median(times) / 1e9
