"""cli.extract: a real run as `python -m cli.extract`, resumption, and one-line errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from absl.testing import flagsaver

from cli import extract as cli
from engine.store import Key, open_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "cache"))


def _main(capsys, *args):
  """Runs cli.extract's main in-process with these flags; returns (status, stdout, stderr)."""
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["extract", *args])
    status = cli.main(["extract"])
  out = capsys.readouterr()
  return status, out.out, out.err


def test_module_run_then_resume(tmp_path):
  env = {**os.environ, "XMODAL_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
  command = [sys.executable, "-m", "cli.extract", "--model=seamless-tiny", "--languages=eng",
             "--max_sentences=3", "--batch_size=2", "--layers=0,-1", "--progress=false",
             f"--output_dir={tmp_path / 'acts'}"]
  first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-2000:]
  assert "representations completed" in first.stdout and "speech: 3 sentences" in first.stdout
  st = open_store(tmp_path / "acts")
  assert Key("eng", "text", "text_encoder", 3) in st
  assert Key("eng", "speech", "post_adaptor", 0) in st
  assert st.load(Key("eng", "speech", "speech_encoder", 3)).shape == (3, 32)
  assert len(st.ids) == 3 and st.metadata["corpus"]["source"] == "bundled"
  again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and "0 representations completed" in again.stdout


def test_salmonn_tiny_writes_every_auditory_layer(tmp_path):
  """The offline SALMONN runs its whole path: each Whisper, BEATs and Q-Former layer is stored."""
  env = {**os.environ, "XMODAL_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
  command = [sys.executable, "-m", "cli.extract", "--model=salmonn-tiny", "--languages=eng",
             "--modalities=speech", "--max_sentences=2", "--progress=false",
             f"--output_dir={tmp_path / 'acts'}"]
  run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  st = open_store(tmp_path / "acts")
  stored = {(k.site, k.layer) for k in st.keys() if k.modality == "speech"}
  expected = ({("whisper", l) for l in range(3)} | {("beats", l) for l in range(3)}
              | {("qformer", l) for l in range(2)} | {("proj", 0)} | {("llm", l) for l in range(4)})
  assert stored == expected
  assert st.load(Key("eng", "speech", "beats", 2)).shape == (2, 24)
  assert st.load(Key("eng", "speech", "whisper", 0)).shape == (2, 32)
  assert st.metadata["model"]["beats"].startswith("present")


@pytest.mark.parametrize("args, message", [
    (["--languages=xx"], "unknown language 'xx'"),
    (["--languages=eng", "--layers=a"], "--layers must be integers, got a"),
    (["--languages=eng", "--modalities=text", "--sites=decoder"], "unknown sites ['decoder']"),
    (["--languages=eng", "--model=mystery-model"], "cannot tell which model family"),
    (["--languages=eng", "--max_sentences=0"], "--max_sentences must be >= 1"),
])
def test_errors_are_one_line(tmp_path, capsys, args, message):
  status, out, err = _main(capsys, f"--output_dir={tmp_path}", "--modalities=text",
                           "--progress=false", *args)
  assert status == 1 and out == ""
  assert err.startswith("extract: error: ") and message in err
  assert err.count("\n") == 1 and "Traceback" not in err


def test_other_metadata_is_refused(tmp_path, capsys):
  base = [f"--output_dir={tmp_path}", "--languages=eng", "--modalities=text", "--max_sentences=2",
          "--progress=false", "--layers=1"]
  assert _main(capsys, *base)[0] == 0
  status, _, err = _main(capsys, *base, "--pooling=max")
  assert status == 1 and 'pooling: "mean" (store) vs "max" (this run)' in err


def test_fleurs_source_from_a_local_copy(tmp_path, capsys):
  """--source=fleurs reads a local FLEURS-shaped copy (the data tests' fixture builder)."""
  from tests.test_data_fleurs import make_fleurs
  make_fleurs(tmp_path / "fleurs", "tsv")
  status, out, err = _main(capsys, f"--output_dir={tmp_path / 'acts'}", "--source=fleurs",
                           f"--fleurs_dir={tmp_path / 'fleurs'}", "--languages=eng,deu,swh",
                           "--layers=-1", "--progress=false")
  assert status == 0, err
  st = open_store(tmp_path / "acts")
  assert st.ids == [10, 11, 13] and st.metadata["corpus"]["source"] == "fleurs"
  assert Key("swh", "speech", "post_adaptor", 0) in st and Key("deu", "text", "text_encoder", 3) in st
  assert "speech: 9 sentences" in out


@pytest.mark.parametrize("spelling", ["--model_dtype", "--dtype"])
def test_model_dtype_flag_and_its_old_spelling(spelling):
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["extract", f"{spelling}=bfloat16", "--output_dir=/nonexistent"])
    assert flags.FLAGS.model_dtype == "bfloat16"
