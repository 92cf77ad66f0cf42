"""cli.sweep over two processes on loopback gives the table of one process, also when both are
killed mid-scoring and restarted; incomplete process flags are refused naming the missing ones."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine import table as T
from engine import rundir, scoring

ROOT = Path(__file__).resolve().parents[1]
# Yoruba has no espeak-ng voice, so it is text only; process 1 (of 2) holds just Yoruba and owns
# none of the speech representations, whose bases it still takes part in exchanging.
LANGS = ("eng", "deu", "yor")
FLAGS = [f"--languages={','.join(LANGS)}", "--max_sentences=12", "--layers=-1",
         "--threshold=0.9", "--noprogress", "--noreport"]
TIMEOUT = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(cache: Path, args: list[str], cpu_devices: int, env=None) -> subprocess.Popen:
  """`python -m cli.sweep` with `cpu_devices` simulated CPU devices, sharing caches."""
  env = {**os.environ, "XMODAL_CACHE": str(cache), "PYTHONPATH": str(ROOT),
         "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={cpu_devices}",
         "JAX_COMPILATION_CACHE_DIR": str(cache / "jax"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **(env or {})}
  return subprocess.Popen([sys.executable, "-m", "cli.sweep", *FLAGS, *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _processes(cache: Path, out: Path, count: int, env=None) -> list[subprocess.Popen]:
  port = _free_port()
  return [_start(cache, [f"--output_dir={out}", f"--coordinator=127.0.0.1:{port}",
                         f"--num_processes={count}", f"--process_id={i}"], 1, env)
          for i in range(count)]


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
  done = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=TIMEOUT)
    finally:
      if p.poll() is None:
        p.kill()
    done.append((p.returncode, out, err))
  return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One process with a 2-device mesh, and two processes of one device each (the same mesh
  size, so the same pair batches) killed after their first chunk, then restarted."""
  cache = tmp_path_factory.mktemp("cache")
  one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
  single = _start(cache, [f"--output_dir={one}", "--devices=all"], 2)
  killed = _finish(_processes(cache, two, 2, {scoring.KILL_AFTER_ENV: "1"}))
  (rc, out, err), = _finish([single])
  assert rc == 0, err[-3000:]
  # Each process SIGKILLs itself after the first checkpoint; one that outlives its peer by a
  # moment may instead be aborted by JAX's distributed runtime (SIGABRT), a crash all the same.
  for rc, _, err in killed:
    assert rc in (-9, -6), err[-3000:]
  assert -9 in [rc for rc, _, _ in killed], [err[-3000:] for _, _, err in killed]
  resumed = _finish(_processes(cache, two, 2))
  for rc, _, err in resumed:
    assert rc == 0, err[-3000:]
  return one, out, two, killed, resumed


def test_two_processes_give_the_table_of_one(runs):
  one, stdout, two, killed, resumed = runs
  table = pd.read_parquet(one / "results.parquet")
  shared = pd.read_parquet(two / "results.parquet")
  assert list(shared.columns) == list(table.columns) == list(T.COLUMNS)
  scores = ["score", "null_mean", "null_sd", "z", "p_value"]
  key = [c for c in table.columns if c not in scores]
  pd.testing.assert_frame_equal(shared[key], table[key])  # same rows, same order, same ranks
  for column in ("score", "null_mean", "null_sd"):
    np.testing.assert_allclose(shared[column], table[column], rtol=0, atol=1e-6)
  # The same permutations on both: a p-value moves only where a null score ties the score.
  permutations = int(table.permutations.iloc[0])
  assert permutations >= 2
  np.testing.assert_allclose(shared.p_value, table.p_value, rtol=0, atol=1.01 / (1 + permutations))
  assert set(table.family) == {"cross_modal", "cross_lingual_text", "cross_lingual_speech",
                               "adaptor"}
  assert "yor" in set(table.language_a) | set(table.language_b)
  assert "2 device(s) [cpu] over 1 process(es)" in stdout
  # Each process extracted its block of the languages into its own store.
  state = (two / rundir.STATE_JSON).read_text()
  assert '"activations.p0"' in state and '"activations.p1"' in state
  assert not (two / rundir.STORE_DIR).exists()
  from engine.store import open_store
  assert {k.language for k in open_store(two / "activations.p0").keys()} == {"eng", "deu"}
  assert {k.language for k in open_store(two / "activations.p1").keys()} == {"yor"}
  assert "skipped" in state and "yor.speech" in state


def test_only_process_zero_writes_and_resume_finishes(runs):
  _, _, _, killed, resumed = runs
  (_, out0, _), (_, out1, _) = resumed
  assert "over 2 process(es)" in out0 and "table:" in out0
  assert "plan:" not in out1 and "table:" not in out1
  assert "process 1 of 2:" in out1 and "process 0 writes the results" in out1
  ran, chunks = map(int, re.search(r"\((\d+) of (\d+) chunks in this run\)", out0).groups())
  assert ran == chunks - 1 > 0  # the first chunk was checkpointed before the kill
  assert "plan: seamless-tiny on bundled (3 languages" in killed[0][1]
  assert "plan:" not in killed[1][1]


@pytest.mark.parametrize("args,missing", [
    (["--coordinator=127.0.0.1:1"], "--num_processes, --process_id"),
    (["--num_processes=2", "--process_id=0"], "--coordinator"),
    (["--coordinator=127.0.0.1:1", "--num_processes=2"], "--process_id"),
    (["--coordinator=127.0.0.1:1", "--num_processes=2", "--process_id=2"], None),
])
def test_incomplete_process_flags_are_named(tmp_path, args, missing):
  done = subprocess.run([sys.executable, "-m", "cli.sweep", f"--output_dir={tmp_path}", *args],
                        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 1
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("sweep: error: ")
  if missing:
    assert lines[0].endswith(f"missing {missing}")
  else:
    assert lines[0].endswith("--process_id=2 is not in 0..1")
  assert not list(tmp_path.iterdir())  # refused before anything was written
