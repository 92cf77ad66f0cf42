"""Several processes (hosts) as one sweep: `jax.distributed`, shares of work, and exchange.

Each process extracts its share of the representations and computes their bases; the bases
are then all-gathered through JAX collectives so every process holds all of them, the pair
axis is sharded over the mesh of every process's devices, and the scores are gathered back.
Only process 0 writes results. With one process every function here is a no-op.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from engine.bases import Bases

T = TypeVar("T")

# Environment variables by which cluster launchers announce a multi-process job; JAX's own
# cluster detection reads them (Cloud TPU metadata, SLURM, Open MPI, Kubernetes JobSet...).
_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = True) -> bool:
  """Joins a multi-process job; returns True when there is more than one process.

  With an explicit coordinator ('host:port'), process count and id, those are used (the way to
  run several CPU processes on one machine or across machines without a cluster manager).
  Otherwise, where a cluster launcher is detected and `auto`, JAX finds the values itself.
  Must run before anything touches a JAX device.
  """
  explicit = coordinator is not None or num_processes is not None or process_id is not None
  if explicit:
    missing = [name for name, v in (("coordinator", coordinator),
                                    ("num_processes", num_processes),
                                    ("process_id", process_id)) if v is None]
    if missing:
      raise ValueError(f"multi-process runs need coordinator, num_processes and process_id; "
                       f"missing {', '.join(missing)}")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
    if num_processes == 1:
      return False
  elif not (auto and any(v in os.environ for v in _CLUSTER_ENV)):
    return False
  # Cross-process collectives between CPU devices go through gloo (GPUs and TPUs use their own).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)
  return jax.process_count() > 1


def is_leader() -> bool:
  """Process 0 writes outputs; the others only compute."""
  return jax.process_index() == 0


def share(items: Sequence[T], index: int | None = None, count: int | None = None) -> list[T]:
  """This process's share of `items`: a contiguous block, sizes differing by at most one."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  bounds = np.linspace(0, len(items), count + 1).round().astype(int)
  return list(items[bounds[index]:bounds[index + 1]])


def allgather(x: np.ndarray) -> np.ndarray:
  """Concatenates every process's `x` along axis 0 (shapes may differ along axis 0 only).

  Rows are padded to the largest share for the collective and the padding dropped again.
  """
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils
  rows = multihost_utils.process_allgather(np.asarray([x.shape[0]], np.int64)).reshape(-1)
  pad = int(rows.max()) - x.shape[0]
  padded = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
  gathered = np.asarray(multihost_utils.process_allgather(padded))  # [processes, rows, ...]
  return np.concatenate([gathered[p, :int(r)] for p, r in enumerate(rows)])


def agree(value: int) -> int:
  """The maximum of an integer over all processes (e.g. a common padded width)."""
  if jax.process_count() == 1:
    return int(value)
  return int(allgather(np.asarray([value], np.int64)).max())


def allgather_json(value: Any) -> list:
  """Every process's JSON-serialisable `value`, in process order (e.g. the names of the
  representations each one extracted, or the error it met)."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
  sizes = allgather(np.asarray([data.size], np.int64))
  joined = allgather(data).tobytes()
  bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
  return [json.loads(joined[a:b].decode("utf-8")) for a, b in zip(bounds[:-1], bounds[1:])]


def broadcast_json(value: Any) -> Any:
  """Process 0's `value` on every process (the others' values are ignored)."""
  return allgather_json(value if is_leader() else None)[0]


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def no_bases(n: int, dtype, weights: bool) -> Bases:
  """Bases of no representation: what a process owning none of a place contributes to
  `gather_bases` (its feature width is taken from the others)."""
  dtype = np.dtype(dtype)
  return Bases(u=np.zeros((0, n, 0), dtype), s=np.zeros((0, 0), dtype),
               w=np.zeros((0, 0, 0), dtype) if weights else None, rank=np.zeros(0, np.int32))


def pad_bases(bases: Bases, width: int, features: int | None = None) -> Bases:
  """Bases zero-padded to `width` kept directions (K) and, with weights, `features` (d).

  Exact: zero columns past every rank add no variance and the pair stage masks them, so bases
  of different ranks and feature widths batch together without changing a score.
  """
  pad = width - bases.u.shape[-1]
  u = jnp.pad(bases.u, ((0, 0), (0, 0), (0, pad)))
  s = jnp.pad(bases.s, ((0, 0), (0, pad)))
  w = None
  if bases.w is not None:
    w = jnp.pad(bases.w, ((0, 0), (0, pad), (0, features - bases.w.shape[-1])))
  return Bases(u=u, s=s, w=w, rank=bases.rank)


def join_bases(parts: Sequence[Bases]) -> Bases:
  """Several Bases (e.g. of two (site, layer) places) as one, padded to the widest."""
  if len(parts) == 1:
    return parts[0]
  width = max(b.u.shape[-1] for b in parts)
  features = max(b.w.shape[-1] for b in parts) if parts[0].w is not None else None
  padded = [pad_bases(b, width, features) for b in parts]
  return Bases(u=jnp.concatenate([b.u for b in padded]), s=jnp.concatenate([b.s for b in padded]),
               w=None if features is None else jnp.concatenate([b.w for b in padded]),
               rank=jnp.concatenate([b.rank for b in padded]))


def gather_bases(local: Bases) -> Bases:
  """Every process's Bases (of its share of representations, in process order) -> all.

  Widths are padded to the widest share (`pad_bases`). A share may be empty (`no_bases`).
  """
  if jax.process_count() == 1:
    return local
  features = agree(local.w.shape[-1]) if local.w is not None else None  # an empty share: 0
  local = pad_bases(local, agree(local.u.shape[-1]), features)
  w = None if local.w is None else allgather(np.asarray(local.w))
  return Bases(u=allgather(np.asarray(local.u)), s=allgather(np.asarray(local.s)), w=w,
               rank=allgather(np.asarray(local.rank)))


class PeerError(ValueError):
  """Another process failed a stage this one took part in; names it and its error."""


def together(stage: Callable[[], T]) -> list[T]:
  """Runs `stage` on every process; returns every process's (JSON-able) result, in order.

  If it fails on any process, every process raises: the failing one its own error, the others
  a PeerError naming that process and its error, so none waits forever in a collective.
  """
  failure, error, result = None, None, None
  try:
    result = stage()
  except Exception as e:  # pylint: disable=broad-except  (re-raised below)
    failure, error = e, " ".join(str(e).split()) or type(e).__name__
  outcomes = allgather_json({"error": error, "result": result})
  if failure is not None:
    raise failure
  for index, outcome in enumerate(outcomes):
    if outcome["error"] is not None:
      raise PeerError(f"process {index}: {outcome['error']}")
  return [o["result"] for o in outcomes]
