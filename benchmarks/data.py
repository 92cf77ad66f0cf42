"""Synthetic representations for the benchmarks: the same generator for every script."""


def make_reps(r: int, n: int, d: int, kind: str, seed: int = 0):
  """R representations [R, n, d] float32 of the same n sentences."""
  import numpy as np
  rng = np.random.default_rng(seed)
  if kind == "gaussian":
    return rng.standard_normal((r, n, d), dtype=np.float32)
  latent = (rng.standard_normal((n, d)) * np.geomspace(1.0, 1e-3, d)).astype(np.float32)
  block = min(d, 256)  # mixed within blocks of columns, after a per-representation permutation
  reps = np.empty((r, n, d), np.float32)
  for i in range(r):
    perm = rng.permutation(d)
    mixed = np.empty((n, d), np.float32)
    for s in range(0, d, block):
      cols = perm[s:s + block]
      mix = rng.standard_normal((cols.size, cols.size), dtype=np.float32) / np.sqrt(cols.size)
      mixed[:, s:s + cols.size] = latent[:, cols] @ mix
    reps[i] = mixed + 0.01 * rng.standard_normal((n, d), dtype=np.float32)
  return reps
