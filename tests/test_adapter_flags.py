"""Adapter options as settings and flags: each reaches its family's `load`, the sweep's identity
records it, another family's option is refused in one line, and both commands list them."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from absl import flags
from absl.testing import flagsaver

from cli import extract as extract_cli
from engine import model_checks, rundir, settings
from engine import sweep as S
from engine.models import get_adapter
from engine.models.pooling import pool
from engine.store import open_store

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {name: f.metadata["kwarg"] for name, f, _ in settings.flag_fields(settings.Model)
           if f.metadata["families"]}  # flag -> the keyword of the adapter's load
OPTION_FLAGS = list(OPTIONS)
SENTENCES = ["The cat sleeps.", "A much longer sentence about the weather today.", "Hi"]


class Stop(ValueError):
  """Raised by the recording get_adapter: the options are known, no model needs to run."""


@pytest.fixture
def loads(monkeypatch, tmp_path):
  """get_adapter replaced by one that records its model and keywords, then stops the run."""
  monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "cache"))
  calls = []

  def recording(model, **kwargs):
    calls.append((model, kwargs))
    raise Stop("stopped after get_adapter")
  monkeypatch.setattr("engine.models.get_adapter", recording)
  return calls


def test_the_adapter_options_are_the_suggested_flags():
  assert set(OPTION_FLAGS) == {
      "pool_special_tokens", "salmonn_text_prompt", "salmonn_mask_scope", "salmonn_instruction",
      "salmonn_without_beats", "salmonn_beats", "salmonn_whisper", "salmonn_llm",
      "salmonn_checkpoint", "sonar_speech_encoders"}


SALMONN_OPTIONS = dict(salmonn_text_prompt="plain", salmonn_mask_scope="all",
                       salmonn_instruction="Repeat the speech.", salmonn_without_beats=True)


@pytest.mark.parametrize("model, given, expected", [
    ("salmonn-tiny", SALMONN_OPTIONS,
     dict(text_prompt="plain", mask_scope="all", instruction="Repeat the speech.",
          without_beats=True, beats=None, whisper=None, llm=None, checkpoint=None)),
    ("salmonn-7b", dict(salmonn_beats="/w/BEATs.pt", salmonn_checkpoint="/w/salmonn_7b.pth"),
     dict(text_prompt="template", mask_scope="sentence", without_beats=False,
          beats="/w/BEATs.pt", whisper=None, llm=None, checkpoint="/w/salmonn_7b.pth")),
    ("sonar-tiny", dict(pool_special_tokens=False),
     dict(pool_special_tokens=False, speech_encoders=None)),
    ("/w/sonar_text", dict(sonar_speech_encoders="/w/sonar_speech"),
     dict(pool_special_tokens=True, speech_encoders="/w/sonar_speech")),
    ("seamless-tiny", dict(pool_special_tokens=False), dict(pool_special_tokens=False)),
    ("qwen2-audio-tiny", {}, {}),
])
def test_the_sweep_passes_each_option_to_its_family_and_records_it(
    loads, tmp_path, model, given, expected):
  out = tmp_path / "sweep"
  config = settings.of(model=model, languages=("eng",), modalities=("text",), max_sentences=4,
                       output_dir=str(out), progress=False, **given)
  with pytest.raises(Stop):
    S.run_sweep(config, log=lambda line: None)
  [(name, kwargs)] = loads
  assert name == model and kwargs.pop("dtype") == "float32" and kwargs.pop("device") == "cpu"
  assert {k: kwargs[k] for k in expected} == expected
  assert set(kwargs) <= set(OPTIONS.values())
  identity = json.loads((out / rundir.STATE_JSON).read_text())["identity"]
  assert {k: identity[k] for k in given} == given
  assert set(OPTION_FLAGS) <= set(identity)


def test_extract_passes_the_options_too(loads, tmp_path, capsys):
  args = ["--model=salmonn-tiny", "--salmonn_text_prompt=plain", "--salmonn_mask_scope=all",
          "--salmonn_without_beats", "--languages=eng", "--modalities=text",
          "--max_sentences=2", "--progress=false", f"--output_dir={tmp_path / 'acts'}"]
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["extract", *args])
    status = extract_cli.main(["extract"])
  assert status == 1 and "stopped after get_adapter" in capsys.readouterr().err
  [(name, kwargs)] = loads
  assert name == "salmonn-tiny"
  assert {k: kwargs[k] for k in ("text_prompt", "mask_scope", "without_beats", "beats")} == dict(
      text_prompt="plain", mask_scope="all", without_beats=True, beats=None)


def test_salmonn_options_reach_the_adapter():
  model = settings.of(model="salmonn-tiny", **SALMONN_OPTIONS).model
  adapter = get_adapter(model.name, **model_checks.adapter_options(model))
  described = adapter.describe()
  assert (described["text_prompt"], described["mask_scope"], described["instruction"]) == (
      "plain", "all", "Repeat the speech.")
  assert described["without_beats"] and described["beats"].startswith("ABSENT")
  assert "beats" not in {s.name for s in adapter.sites()}
  default = settings.of(model="salmonn-tiny").model
  assert "beats" in {s.name for s in get_adapter(
      default.name, **model_checks.adapter_options(default)).sites()}


@pytest.mark.parametrize("model", ["seamless-tiny", "sonar-tiny"])
def test_special_tokens_are_pooled_or_not(model):
  """The hidden states are the same; without special tokens a text mask keeps the sentence's
  own tokens (between the language token and </s>), and mean pooling averages just those."""
  both = {}
  for pooled in (True, False):
    m = settings.of(model=model, pool_special_tokens=pooled).model
    adapter = get_adapter(m.name, **model_checks.adapter_options(m))
    assert adapter.describe()["pool_special_tokens"] is pooled
    both[pooled] = adapter.run_text(SENTENCES, "eng")
  lengths = [len(adapter.tokenizer(s, add_special_tokens=False)["input_ids"]) for s in SENTENCES]
  key = ("text_encoder", 2)
  with_specials, without = both[True][key], both[False][key]
  torch.testing.assert_close(with_specials.hidden, without.hidden, rtol=0, atol=0)
  width = without.mask.shape[1]
  expected = np.zeros((len(SENTENCES), width), dtype=bool)
  for i, n in enumerate(lengths):
    expected[i, 1:1 + n] = True
  np.testing.assert_array_equal(without.mask.numpy(), expected)
  np.testing.assert_array_equal(with_specials.mask.numpy().sum(1), np.array(lengths) + 2)
  hidden = without.hidden.numpy().astype(np.float64)
  reference = np.stack([hidden[i, 1:1 + n].mean(0) for i, n in enumerate(lengths)])
  np.testing.assert_allclose(pool(without.hidden, without.mask, "mean").numpy(), reference,
                             rtol=1e-5, atol=1e-6)
  if model == "sonar-tiny":  # SONAR's own sentence embedding pools every token, either way
    torch.testing.assert_close(both[False][("sentence_embedding", 0)].hidden,
                               both[True][("sentence_embedding", 0)].hidden, rtol=0, atol=0)


def test_a_sweep_without_special_tokens_records_them_and_refuses_the_other(tmp_path, monkeypatch):
  monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "cache"))
  config = settings.of(model="sonar-tiny", languages=("eng", "deu"), modalities=("text",),
                       max_sentences=8, layers=(-1,), sites=("text_encoder",), permutations=0,
                       threshold=0.9, output_dir=str(tmp_path / "sweep"), progress=False,
                       pool_special_tokens=False)
  S.run_sweep(config, log=lambda line: None)
  out = tmp_path / "sweep"
  assert json.loads((out / rundir.STATE_JSON).read_text())["identity"][
      "pool_special_tokens"] is False
  store = open_store(out / rundir.STORE_DIR)
  assert store.metadata["model"]["pool_special_tokens"] is False
  with pytest.raises(settings.SweepError, match=r"--pool_special_tokens=False there, "
                                                r"--pool_special_tokens=True now"):
    S.run_sweep(config.replace(pool_special_tokens=True), log=lambda line: None)


@pytest.mark.parametrize("given, message", [
    (dict(model="seamless-tiny", salmonn_beats="/w/BEATs.pt"),
     "--salmonn_beats=/w/BEATs.pt applies to salmonn models; --model=seamless-tiny is seamless: "
     "drop --salmonn_beats"),
    (dict(model="salmonn-tiny", pool_special_tokens=False),
     "--pool_special_tokens=False applies to sonar and seamless models; --model=salmonn-tiny is "
     "salmonn: drop --pool_special_tokens"),
    (dict(model="sonar-tiny", salmonn_text_prompt="plain"),
     "--salmonn_text_prompt=plain applies to salmonn models; --model=sonar-tiny is sonar"),
    (dict(model="seamless-tiny", sonar_speech_encoders="/w/speech"),
     "--sonar_speech_encoders=/w/speech applies to sonar models"),
    (dict(model="salmonn-tiny", salmonn_beats="/w/BEATs.pt"),
     "--salmonn_beats=/w/BEATs.pt locates real weights; --model=salmonn-tiny is a random config"),
    (dict(model="sonar-tiny", sonar_speech_encoders="/w/speech"),
     "--sonar_speech_encoders=/w/speech locates real weights; --model=sonar-tiny is a random"),
    (dict(model="salmonn-7b", salmonn_beats="/w/BEATs.pt", salmonn_without_beats=True),
     "--salmonn_beats and --salmonn_without_beats contradict each other; give one"),
    (dict(model="salmonn-tiny", salmonn_text_prompt="chat"),
     "--salmonn_text_prompt=chat is not one of template, plain"),
    (dict(model="salmonn-tiny", salmonn_mask_scope="some"),
     "--salmonn_mask_scope=some is not one of sentence, all"),
])
def test_an_option_the_model_does_not_take_is_refused_before_any_work(tmp_path, given, message):
  out = tmp_path / "sweep"
  with pytest.raises(settings.SweepError) as e:
    S.run_sweep(settings.of(languages=("eng",), output_dir=str(out), **given),
                log=lambda line: None)
  assert message in str(e.value) and "\n" not in str(e.value)
  assert not out.exists()


def _cli(module, *args):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=200)


@pytest.mark.parametrize("module", ["cli.sweep", "cli.extract"])
def test_help_lists_the_options(module):
  shown = _cli(module, "--help")  # absl's help exits with status 1
  assert "Try --helpfull" in shown.stdout, shown.stderr[-2000:]
  listed = set(re.findall(r"^  --(?:\[no\])?(\w+):", shown.stdout, flags=re.M))
  assert set(OPTION_FLAGS) <= listed and "model" in listed


MISMATCH = ("--salmonn_without_beats=True applies to salmonn models; --model=seamless-tiny is "
            "seamless: drop --salmonn_without_beats")


def test_a_mismatch_on_the_command_line_is_one_line(tmp_path, capsys):
  args = ["--model=seamless-tiny", "--salmonn_without_beats", "--languages=eng",
          f"--output_dir={tmp_path / 'out'}"]
  done = _cli("cli.sweep", *args)
  assert done.returncode == 1 and done.stdout == ""
  assert done.stderr.strip() == f"sweep: error: {MISMATCH}"
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["extract", *args])
    status = extract_cli.main(["extract"])
  out = capsys.readouterr()
  assert status == 1 and out.out == "" and out.err == f"extract: error: {MISMATCH}\n"
  assert not (tmp_path / "out").exists()
