"""Sentence pooling over valid positions only: padding never leaks into a representation."""
from __future__ import annotations

import torch

POOLINGS = ("mean", "max", "first", "last")


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str = "mean") -> torch.Tensor:
  """[B, T, D] activations and [B, T] validity mask -> [B, D] float32 sentence vectors."""
  if how not in POOLINGS:
    raise ValueError(f"unknown pooling {how!r}; choose one of {POOLINGS}")
  mask = mask.to(torch.bool)
  counts = mask.sum(dim=1)
  if bool((counts == 0).any()):
    rows = torch.nonzero(counts == 0).flatten().tolist()
    raise ValueError(f"no valid positions to pool for batch rows {rows}")
  h = hidden.float()
  m = mask.unsqueeze(-1)
  if how == "mean":
    return (h * m).sum(dim=1) / counts.unsqueeze(-1).to(h.dtype)
  if how == "max":
    return h.masked_fill(~m, float("-inf")).amax(dim=1)
  if how == "first":
    idx = mask.to(torch.int64).argmax(dim=1)  # first valid position, also under left padding
  else:
    idx = mask.shape[1] - 1 - mask.flip(1).to(torch.int64).argmax(dim=1)
  return h[torch.arange(h.shape[0]), idx]
