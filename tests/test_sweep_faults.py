"""The sweep killed (SIGKILL) at random moments many times in a row, through extraction and the
pair stage, then resumed: the final table is byte-identical to an uninterrupted run's, and after
every kill whatever the directory calls finished (complete representations, checkpointed pairs,
a results table) is exactly the uninterrupted run's. A damaged checkpoint is an error naming it
and the way out, never a wrong number.

Each run is a child forked from one process that has imported the engine (torch, JAX, orbax,
transformers) without starting anything, so a run costs its work, not the imports."""
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pandas as pd
import pytest

from engine import rundir, scoring, settings
from engine import sweep as S
from engine.store import open_store

ROOT = Path(__file__).resolve().parents[1]
# A checkpoint after every chunk, so kills land in the pair stage mid-save as well.
CONFIG = dict(languages=("eng", "deu"), max_sentences=8, chunk_pairs=3, checkpoint_seconds=0.0,
              progress=False)

_FORKER = r"""
import os, sys, traceback
import datasets, jax, numpy, orbax.checkpoint, pandas, torch  # imported, not started
from engine import analysis, extract, pairs, settings, sharding, store, svcca
from engine import sweep as S
from engine.models import seamless
seamless.model_class("v2")
seamless.tiny_tokenizer()
config = eval(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
  out = line.strip()
  pid = os.fork()
  if pid == 0:
    code = 1
    try:
      from absl import logging
      logging.set_verbosity(logging.ERROR)
      S.run_sweep(settings.of(output_dir=out, **config), log=lambda line: None)
      code = 0
    except BaseException as e:
      traceback.print_exc()
      with open(out + ".error", "w") as f:
        f.write(f"{type(e).__name__}: {e}")
    finally:
      os._exit(code)
  print(pid, flush=True)
  _, status = os.waitpid(pid, 0)
  print(status, flush=True)
"""


class Forker:
  """The importing process; `start(out)` forks a sweep into out, `wait()` gives its status."""

  def __init__(self, cache: Path, log: Path):
    env = {**os.environ, "XMODAL_CACHE": str(cache), "PYTHONPATH": str(ROOT),
           "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache / "jax"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    self.log = open(log, "wb")
    self.proc = subprocess.Popen([sys.executable, "-c", _FORKER, repr(CONFIG)], cwd=ROOT, env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                 bufsize=0)
    self._buffer = b""
    assert self._line(300) == "ready", log.read_text()[-3000:]

  def _line(self, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while b"\n" not in self._buffer:
      left = deadline - time.monotonic()
      if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
        raise AssertionError(f"no answer from the sweep process in {timeout} s")
      chunk = os.read(self.proc.stdout.fileno(), 4096)
      if not chunk:
        raise AssertionError("the sweep process died")
      self._buffer += chunk
    line, self._buffer = self._buffer.split(b"\n", 1)
    return line.decode()

  def start(self, out: Path) -> int:
    self.proc.stdin.write(f"{out}\n".encode())
    return int(self._line(60))

  def wait(self, timeout: float = 300) -> int:
    return int(self._line(timeout))

  def run(self, out: Path) -> int:
    self.start(out)
    return self.wait()

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)
    self.log.close()


@pytest.fixture(scope="module")
def forker(tmp_path_factory):
  root = tmp_path_factory.mktemp("forker")
  f = Forker(root / "cache", root / "stderr.log")
  yield f
  f.close()


@pytest.fixture(scope="module")
def reference(forker, tmp_path_factory):
  """An uninterrupted sweep, and how long it took."""
  out = tmp_path_factory.mktemp("reference") / "sweep"
  start = time.monotonic()
  assert forker.run(out) == 0, (out.parent / "sweep.error").read_text()
  seconds = time.monotonic() - start
  table = pd.read_parquet(out / "results.parquet")
  sweep = _restored(out, len(table))  # the table's rows are the checkpoint's plan positions
  assert sweep["done"].all() and np.array_equal(sweep["score"], table.score.to_numpy())
  return out, seconds


def _restored(out: Path, size: int) -> dict | None:
  """The latest checkpoint as the sweep restores it (None when there is none)."""
  manager = scoring.checkpointer(out)
  with manager:
    if manager.latest_step() is None:
      return None
    restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(
        scoring.fresh(size)))
  return {k: np.asarray(v) for k, v in restored.items()}


def _check_finished_parts(out: Path, ref: Path, table: pd.DataFrame) -> dict:
  """Asserts that what `out` holds as finished equals the reference; returns what that is."""
  seen = {"representations": 0, "pairs": 0, "table": False}
  if (out / rundir.STORE_DIR / "manifest.json").exists():
    st = open_store(out / rundir.STORE_DIR)
    for key in st.keys():
      st.load(key)  # its checksum holds
      name = f"{key.name}.npy"
      assert (out / rundir.STORE_DIR / name).read_bytes() == (ref / rundir.STORE_DIR / name).read_bytes()
    seen["representations"] = len(st.keys())
  if (out / rundir.CHECKPOINT_DIR).is_dir():
    sweep = _restored(out, len(table))
    if sweep is not None:
      done = sweep["done"]
      np.testing.assert_array_equal(sweep["score"][done], table.score.to_numpy()[done])
      np.testing.assert_array_equal(sweep["rank_a"][done], table.rank_a.to_numpy()[done])
      seen["pairs"] = int(done.sum())
  if (out / "results.csv").exists():
    assert (out / "results.csv").read_bytes() == (ref / "results.csv").read_bytes()
    seen["table"] = True
  return seen


def _progress(out: Path) -> tuple:
  """Changes whenever the sweep records progress: a store manifest or a checkpoint written."""
  manifest = out / rundir.STORE_DIR / "manifest.json"
  steps = out / rundir.CHECKPOINT_DIR
  return (manifest.stat().st_mtime_ns if manifest.exists() else None,
          sorted(p.name for p in steps.iterdir()) if steps.is_dir() else None)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def _until(condition, pid: int, timeout: float = 120) -> None:
  deadline = time.monotonic() + timeout
  while not condition() and _alive(pid) and time.monotonic() < deadline:
    time.sleep(0.01)


@pytest.mark.slow
def test_repeated_sigkill_at_random_moments_then_resume(forker, reference, tmp_path):
  """Each run is killed at a random moment: while it starts up, or a random time after it
  next records progress (writes the store's manifest or starts a checkpoint), or after it next
  starts a checkpoint, so kills land in extraction and in the pair stage (mid-batch,
  mid-checksum, mid-save, mid-table)."""
  ref, _ = reference
  table = pd.read_parquet(ref / "results.parquet")
  out = tmp_path / "sweep"
  rng = np.random.default_rng(5)
  kills, history = 0, []
  for moment in ["progress", "startup", "progress", "progress", "checkpoint", "progress",
                 "checkpoint", "startup"]:
    before = _progress(out)
    pid = forker.start(out)
    # Short delays: a resumed sweep of this size finishes within a second or two, and a run
    # that finishes before its kill ends the series.
    if moment == "startup":
      time.sleep(rng.uniform(0, 0.3))
    elif moment == "progress":
      _until(lambda: _progress(out) != before, pid)
      time.sleep(rng.uniform(0, 0.05))
    else:
      _until(lambda: _progress(out)[1] != before[1], pid)
      time.sleep(rng.uniform(0, 0.05))
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass  # finished first
    status = forker.wait()
    if not os.WIFSIGNALED(status):
      assert status == 0, (tmp_path / "sweep.error").read_text()
      break
    kills += 1
    history.append((moment, _check_finished_parts(out, ref, table)))
  print(f"{kills} kills; after each: {history}")
  assert kills >= 5, history
  stages = [h for _, h in history]
  assert any(0 < h["representations"] and h["pairs"] == 0 for h in stages), history
  assert any(0 < h["pairs"] < len(table) for h in stages), history
  assert forker.run(out) == 0, (tmp_path / "sweep.error").read_text()
  for name in ("results.csv", "results.parquet"):
    assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def _damage(path: Path, how: str) -> None:
  raw = path.read_bytes()
  if how == "truncate":
    path.write_bytes(raw[:len(raw) // 2])
  else:
    flipped = bytearray(raw)
    flipped[len(raw) // 3] ^= 0x10
    path.write_bytes(bytes(flipped))


def test_damaged_checkpoint_is_an_error_naming_it(tmp_path, monkeypatch):
  """Flipped or truncated checkpoint files (the arrays, orbax's metadata, the OCDBT manifest):
  an error naming the checkpoint and the way out, or the same table; never other numbers."""
  monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "cache"))
  config = settings.of(languages=("eng", "deu"), max_sentences=8, modalities=("text",),
                       layers=(-1,), output_dir=str(tmp_path / "ref"), progress=False)
  S.run_sweep(config, log=lambda line: None)
  ref = tmp_path / "ref"
  failures = []
  for target, how in [("data", "flip"), ("data", "truncate"), ("metadata", "flip"),
                      ("metadata", "truncate"), ("manifest", "flip")]:
    out = tmp_path / f"{target}-{how}"
    shutil.copytree(ref, out)
    for name in ("results.csv", "results.parquet"):
      (out / name).unlink()
    (step,) = [p for p in (out / rundir.CHECKPOINT_DIR).iterdir() if p.name.isdigit()]
    files = {"data": sorted((step / "default" / "d").iterdir())[0],
             "metadata": step / "default" / "_METADATA",
             "manifest": step / "default" / "manifest.ocdbt"}
    _damage(files[target], how)
    try:
      S.run_sweep(config.replace(output_dir=str(out)), log=lambda line: None)
    except Exception as e:  # pylint: disable=broad-except
      message = str(e)
      if not (isinstance(e, ValueError) and str(out / rundir.CHECKPOINT_DIR) in message
              and "delete" in message and len(message) < 600 and "\n" not in message):
        failures.append(f"{target} {how}: {type(e).__name__}: {message[:200]}")
      assert not (out / "results.csv").exists()
      continue
    # Recovering by itself is fine too, as long as the numbers are the same.
    assert (out / "results.csv").read_bytes() == (ref / "results.csv").read_bytes(), target
  assert not failures, failures
