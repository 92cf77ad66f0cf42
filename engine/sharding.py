"""A 1-D mesh over every device, and the padded, sharded pair axis that runs on it.

The same code runs on 1 CPU, simulated CPU devices, a GPU, a TPU slice, or several hosts
(after `jax.distributed.initialize`, `jax.devices()` lists every host's devices).
"""
from __future__ import annotations

import concurrent.futures
import functools
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PAIR_AXIS = "pairs"
_DTYPES = ("float32", "float64")


def simulate_cpu_devices(count: int) -> None:
  """Asks XLA for `count` CPU devices; only takes effect before JAX initialises its backends."""
  flag = f"--xla_force_host_platform_device_count={int(count)}"
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  os.environ["XLA_FLAGS"] = " ".join(flags + [flag])
  jax.config.update("jax_num_cpu_devices", int(count))


def set_dtype(dtype: str) -> None:
  """float32 (default; matmuls at HIGHEST precision) or float64 (enables jax_enable_x64)."""
  if dtype not in _DTYPES:
    raise ValueError(f"unknown dtype {dtype!r}; choose one of {_DTYPES}")
  jax.config.update("jax_enable_x64", dtype == "float64")


def default_dtype() -> np.dtype:
  return np.dtype(np.float64 if jax.config.jax_enable_x64 else np.float32)


@functools.cache
def single_threaded_lapack() -> None:
  """Keeps the LAPACK behind jaxlib's CPU linear algebra (SciPy's OpenBLAS) on one thread.

  OpenBLAS worker threads spin after each call and fight XLA's own intra-op threads for the
  cores; in the pair stage, where XLA GEMMs and small LAPACK calls alternate, that made the
  LAPACK calls ~20x slower on 2 cores. XLA already runs a batch of them in parallel. NumPy's
  own OpenBLAS (a separate library) is left alone.
  """
  import scipy.linalg  # noqa: F401  (loads SciPy's OpenBLAS, the one jaxlib calls)
  from threadpoolctl import ThreadpoolController
  for lib in ThreadpoolController().lib_controllers:
    if "scipy" in os.path.basename(lib.filepath) and "64_" not in os.path.basename(lib.filepath):
      lib.set_num_threads(1)


def host_cores() -> int:
  """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # not on Linux
    return max(1, os.cpu_count() or 1)


def host_map(fn: Callable, items: Sequence, workers: int) -> list:
  """[fn(item) for item in items], run from `workers` host threads, each result ready.

  jaxlib runs a CPU LAPACK call (an SVD) on one core; a batched one fans out onto XLA's pool
  but blocks a pool thread while it waits, and in practice kept one core busy. Unbatched calls
  from separate threads run at once and release the GIL. (Batched calls from several threads
  can deadlock: each blocks a pool thread waiting for work queued behind the other.)
  """
  workers = max(1, min(workers, len(items)))
  if workers == 1:
    return [jax.block_until_ready(fn(item)) for item in items]
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(lambda item: jax.block_until_ready(fn(item)), items))


def pair_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes), axis 'pairs'."""
  devices = list(devices) if devices is not None else jax.devices()
  return Mesh(np.asarray(devices), (PAIR_AXIS,))


@functools.lru_cache(maxsize=64)
def mesh_for(devices: int | str) -> tuple[Mesh, str]:
  """The pair mesh a device request asks for, and its description: 'auto' (every accelerator;
  one CPU device per process), 'all', or a count. With several processes it spans them all and
  a count is taken evenly from each (every process takes part in each pair program)."""
  available = jax.devices()  # every process's devices
  processes = jax.process_count()
  backend = jax.default_backend()
  if devices == "auto":
    if backend != "cpu":
      chosen = available
    else:
      chosen = [next(d for d in available if d.process_index == p) for p in range(processes)]
  elif devices == "all":
    chosen = available
  elif processes > 1:
    if devices % processes:
      raise ValueError(f"--devices={devices}: with {processes} processes the count must be a "
                       f"multiple of {processes} (the same number of devices from each)")
    per = devices // processes
    chosen = []
    for p in range(processes):
      own = [d for d in available if d.process_index == p]
      if per > len(own):
        raise ValueError(f"--devices={devices}: process {p} has only {len(own)} {backend} "
                         "device(s)")
      chosen += own[:per]
  else:
    if devices > len(available):
      raise ValueError(f"--devices={devices}: only {len(available)} {backend} device(s) are "
                       "available")
    chosen = available[:devices]
  mesh = pair_mesh(chosen)
  return mesh, device_summary(mesh)


@functools.cache
def sharded(block: Callable, mesh: Mesh) -> Callable:
  """jit(shard_map(block)): replicated leading args, the last arg split along the pair axis.

  `block(*replicated, pairs_local) -> scores_local`. Cached so repeated calls with the same
  block and mesh reuse one compiled program per input shape.
  """
  def run(replicated, pairs):
    fn = jax.shard_map(block, mesh=mesh, in_specs=(P(), P(PAIR_AXIS)),
                       out_specs=P(PAIR_AXIS), check_vma=False)
    return fn(replicated, pairs)
  return jax.jit(run)


def map_pairs(block: Callable, replicated, pairs: np.ndarray, *, mesh: Mesh,
              chunk_size: int, threads: int = 1) -> np.ndarray:
  """Runs `block` over pairs [P, 2] padded to a multiple of devices x chunk; returns [P].

  With `threads` > 1 the padded pair axis is cut into that many equal slices, each run as its
  own execution from its own host thread (one compiled shape): on a single CPU device the
  unbatched LAPACK calls of one execution run one after another on one core.
  """
  count = pairs.shape[0]
  unit = mesh.size * chunk_size * threads
  padded = max(unit, -(-count // unit) * unit)
  pad = np.zeros((padded - count, pairs.shape[1]), pairs.dtype)  # pair (0, 0): valid, dropped
  full = np.concatenate([pairs, pad])
  replicated = jax.tree.map(lambda x: _place(x, NamedSharding(mesh, P())), replicated)
  run = sharded(block, mesh)
  place = functools.partial(_place, sharding=NamedSharding(mesh, P(PAIR_AXIS)))
  if threads > 1:
    parts = host_map(lambda part: np.asarray(run(replicated, place(part))),
                     np.split(full, threads), threads)
    return np.concatenate(parts)[:count]
  out = run(replicated, place(full))
  if not out.is_fully_addressable:  # several processes: each holds its devices' scores
    from jax.experimental import multihost_utils
    out = multihost_utils.process_allgather(out, tiled=True)
  return np.asarray(jax.device_get(out))[:count]


def _place(x, sharding: NamedSharding) -> jax.Array:
  """Puts a value every process holds in full onto the (possibly multi-process) mesh."""
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def device_summary(mesh: Mesh) -> str:
  kinds = sorted({d.device_kind for d in mesh.devices.flat})
  return f"{mesh.size} device(s) [{', '.join(kinds)}] over {jax.process_count()} process(es)"
