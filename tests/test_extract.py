"""Extraction into the store: values, selection, skipped speech, bad inputs, kill and resume."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

from engine.data import FEATURES
from engine.extract import extract, select_sites
from engine.models import get_adapter
from engine.models.base import Adapter
from engine.models.pooling import pool
from engine.store import Key, Store, StoreError, open_store

ROOT = Path(__file__).resolve().parents[1]
LANGUAGES = ("eng", "deu", "fra")
N = 7


def make_corpus(languages=LANGUAGES, n=N, *, audio=None, text=None) -> datasets.Dataset:
  """A corpus of the engine.data shape: parallel ids, texts of varied length, synthetic speech
  (tones in noise, 0.3-1.5 s). audio/text: {(language, id): value} overrides."""
  rng = np.random.default_rng(0)
  rows = {name: [] for name in FEATURES}
  for code in languages:
    for i in range(n):
      sid = 100 + 3 * i
      words = " ".join(["word"] * (1 + (i * 5) % 9))
      seconds = 0.3 + 0.17 * ((i * 4) % 8)
      t = np.arange(int(16000 * seconds)) / 16000
      wave = (0.2 * np.sin(2 * np.pi * (150 + 40 * i) * t)
              + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
      rows["id"].append(sid)
      rows["language"].append(code)
      rows["text"].append((text or {}).get((code, sid), f"{code} sentence {i}: {words}."))
      rows["audio"].append((audio or {}).get((code, sid), wave))
      rows["sampling_rate"].append(16000)
  return datasets.Dataset.from_dict(rows, features=FEATURES)


@pytest.fixture(scope="module")
def adapter():
  return get_adapter("seamless-tiny")


@pytest.fixture(scope="module")
def corpus():
  return make_corpus()


@pytest.fixture(scope="module")
def full_run(adapter, corpus, tmp_path_factory):
  """An uninterrupted extraction of everything, batch size 3."""
  path = tmp_path_factory.mktemp("full")
  report = extract(adapter, corpus, path, batch_size=3, progress=False)
  return path, report


def test_every_representation_is_complete(adapter, full_run):
  path, report = full_run
  st = open_store(path)
  per_language = sum(s.layers for s in adapter.sites())
  assert len(st.keys()) == len(LANGUAGES) * per_language == len(report.completed)
  assert st.ids == [100 + 3 * i for i in range(N)]
  assert st.metadata["languages"] == list(LANGUAGES) and st.metadata["pooling"] == "mean"
  assert st.metadata["model"]["name"] == "seamless-tiny" and "device" not in st.metadata["model"]
  assert st.load(Key("deu", "speech", "post_adaptor", 0)).shape == (N, 32)
  assert report.sentences == {"text": 3 * N, "speech": 3 * N} and report.throughput("speech") > 0


def test_values_equal_each_sentence_run_alone(adapter, corpus, full_run):
  """Length-bucketed, padded batches give what each sentence gives alone (row order = ids)."""
  st = open_store(full_run[0])
  frame = corpus.to_pandas()
  for code in ("eng", "fra"):
    rows = frame[frame.language == code].sort_values("id")
    for r, (_, row) in enumerate(rows.iterrows()):
      text = adapter.run_text([row.text], code)
      speech = adapter.run_speech([np.asarray(row.audio, np.float32)], 16000, code)
      for (site, layer), cap in list(text.items()) + list(speech.items()):
        modality = "text" if site == "text_encoder" else "speech"
        expected = pool(cap.hidden, cap.mask, "mean")[0].numpy()
        got = st.load(Key(code, modality, site, layer))[r]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-5,
                                   err_msg=f"{code} id {row.id} {site} {layer}")


def test_selected_sites_layers_and_pooling(adapter, corpus, tmp_path):
  report = extract(adapter, corpus.filter(lambda r: r["language"] == "eng"), tmp_path,
                   sites=["text_encoder", "speech_encoder", "post_adaptor"], layers=[0, -1],
                   pooling="max", batch_size=4, progress=False)
  assert sorted(report.completed) == sorted(
      [Key("eng", "text", "text_encoder", 0), Key("eng", "text", "text_encoder", 3),
       Key("eng", "speech", "speech_encoder", 0), Key("eng", "speech", "speech_encoder", 3),
       Key("eng", "speech", "post_adaptor", 0)])
  assert open_store(tmp_path).metadata["pooling"] == "max"
  sel = select_sites(adapter, ["speech"], None, [1])
  assert sel == {"speech": [("speech_encoder", 1)]}
  with pytest.raises(ValueError, match=r"unknown sites \['decoder'\].*available"):
    select_sites(adapter, ["text"], ["decoder"], None)
  with pytest.raises(ValueError, match=r"layers \[7\]"):
    select_sites(adapter, ["text", "speech"], None, [0, 7])
  with pytest.raises(ValueError, match="modalities"):
    extract(adapter, corpus, tmp_path / "x", modalities=["video"], progress=False)
  with pytest.raises(ValueError, match="pooling"):
    extract(adapter, corpus, tmp_path / "x", pooling="median", progress=False)


def test_speech_without_audio_is_skipped_and_reported(adapter, tmp_path):
  corpus = make_corpus(("eng", "deu"), 3, audio={("deu", 100 + 3 * i): None for i in range(3)})
  report = extract(adapter, corpus, tmp_path, progress=False)
  assert report.skipped == {"deu.speech": "the corpus has no audio for this language"}
  st = open_store(tmp_path)
  assert st.skipped() == report.skipped
  assert {(k.language, k.modality) for k in st.keys()} == {("eng", "text"), ("eng", "speech"),
                                                          ("deu", "text")}
  partial = make_corpus(("eng",), 3, audio={("eng", 103): None})
  report = extract(adapter, partial, tmp_path / "p", modalities=["speech"], progress=False)
  assert report.skipped == {"eng.speech": "the corpus lacks audio for sentence ids [103]"}


@pytest.mark.parametrize("override, message", [
    (dict(text={("deu", 106): "   "}), r"sentence id 106 \(language 'deu'\) has empty text"),
    (dict(audio={("fra", 103): np.zeros(0, np.float32)}),
     r"sentence id 103 \(language 'fra'\) has zero-length audio"),
    (dict(audio={("fra", 103): np.full(400, 0.1, np.float32)}),
     r"sentence id 103 \(language 'fra'\) has audio of 400 samples .* too short"),
    (dict(audio={("eng", 109): np.zeros(16000, np.float32)}),
     r"sentence id 109 \(language 'eng'\) has silent audio"),
    (dict(audio={("deu", 100): np.array([0.1, np.nan] * 8000, np.float32)}),
     r"sentence id 100 \(language 'deu'\) has audio with NaN"),
])
def test_bad_inputs_name_sentence_and_language(adapter, tmp_path, override, message):
  corpus = make_corpus(**override)
  with pytest.raises(ValueError, match=message):
    extract(adapter, corpus, tmp_path, progress=False)
  assert not (tmp_path / "manifest.json").exists()  # found before anything ran or was written


def test_language_the_tokenizer_lacks(corpus, tmp_path):
  restricted = get_adapter("seamless-tiny", text_languages=("eng", "deu"))
  with pytest.raises(ValueError, match=r"language 'fra' is not supported for text"):
    extract(restricted, corpus, tmp_path, progress=False)
  extract(restricted, corpus, tmp_path, modalities=["speech"], layers=[0], progress=False)


class _PoisonedAdapter(Adapter):
  """Wraps an adapter and puts NaN into the activations of sentences containing 'poison'."""

  def __init__(self, inner):
    self.inner, self.name = inner, inner.name

  def sites(self):
    return self.inner.sites()

  def describe(self):
    return self.inner.describe()

  def supports_language(self, language, modality):
    return self.inner.supports_language(language, modality)

  def run_speech(self, audios, sampling_rate, language):
    return self.inner.run_speech(audios, sampling_rate, language)

  def run_text(self, texts, language):
    out = self.inner.run_text(texts, language)
    for i, text in enumerate(texts):
      if "poison" in text:
        out[("text_encoder", 2)].hidden[i, 1] = float("nan")
    return out


def test_nan_activations_name_sentence_language_and_site(adapter, tmp_path):
  corpus = make_corpus(text={("deu", 112): "a poison sentence"})
  with pytest.raises(ValueError, match=r"non-finite activations \(NaN or Inf\) for sentence id 112 "
                                       r"\(language 'deu', text\) at site 'text_encoder' layer 2"):
    extract(_PoisonedAdapter(adapter), corpus, tmp_path, modalities=["text"], progress=False)
  st = open_store(tmp_path)
  assert Key("eng", "text", "text_encoder", 2) in st  # languages before it completed
  assert Key("deu", "text", "text_encoder", 2) not in st


def _assert_identical(a: Path, b: Path):
  sa, sb = open_store(a), open_store(b)
  assert sa.keys() == sb.keys() and sa.keys()
  for key in sa.keys():
    assert (a / f"{key.name}.npy").read_bytes() == (b / f"{key.name}.npy").read_bytes(), key.name
  assert not list(a.glob("*.done.npy"))


class _Crash(Exception):
  pass


def test_failure_then_resume_is_byte_identical(adapter, corpus, full_run, tmp_path):
  seen = []

  def crash(language, modality, batch):
    seen.append((language, modality, batch))
    if len(seen) == 5:  # mid-way through 'eng' speech
      raise _Crash

  with pytest.raises(_Crash):
    extract(adapter, corpus, tmp_path, batch_size=3, progress=False, on_batch=crash)
  half = open_store(tmp_path)
  assert 0 < len(half.keys()) < len(open_store(full_run[0]).keys())
  completed = []
  report = extract(adapter, corpus, tmp_path, batch_size=3, progress=False,
                   on_complete=completed.append)
  assert report.batches_resumed == 2 and report.already_complete
  assert sorted(completed) == sorted(report.completed)
  _assert_identical(tmp_path, full_run[0])
  with pytest.raises(StoreError, match="pooling"):
    extract(adapter, corpus, tmp_path, pooling="last", progress=False)


def _child(path: str, kill_after: int) -> None:
  """Runs in a subprocess: extracts like `full_run` and SIGKILLs itself after some batches."""
  batches = []

  def die(*_):
    batches.append(1)
    if len(batches) == kill_after:
      os.kill(os.getpid(), signal.SIGKILL)

  extract(get_adapter("seamless-tiny"), make_corpus(), path, batch_size=3, progress=False,
          on_batch=die)


def test_sigkill_then_resume_is_byte_identical(adapter, corpus, full_run, tmp_path):
  code = f"import tests.test_extract as t; t._child({str(tmp_path)!r}, 8)"
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert list(tmp_path.glob("*.done.npy"))  # killed with representations half-written
  with pytest.raises(StoreError):
    open_store(tmp_path).load(Key("deu", "speech", "speech_output", 0))
  report = extract(adapter, corpus, tmp_path, batch_size=3, progress=False)
  assert report.batches_resumed > 0
  _assert_identical(tmp_path, full_run[0])


def test_store_object_and_progress_bar(adapter, corpus, tmp_path, capsys):
  small = corpus.filter(lambda r: r["language"] == "fra")
  with _open_for(adapter, small, tmp_path) as st:
    extract(adapter, small, st, modalities=["text"], layers=[-1], progress=True)
  assert "fra text" in capsys.readouterr().err
  assert open_store(tmp_path).keys() == [Key("fra", "text", "text_encoder", 3)]


def _open_for(adapter, corpus, path):
  """A store opened by the caller, with the metadata extract would write."""
  from engine import extract as extract_lib, extract_inputs
  index = extract_inputs.index_corpus(corpus, with_audio=False)
  blocks, ids = extract_inputs.language_blocks(index)
  return Store.open(path, extract_lib.store_metadata(adapter, index, blocks, ids, "mean"))


def test_pooled_rows_follow_sentence_ids_not_corpus_order(adapter, corpus, full_run, tmp_path):
  shuffled = corpus.shuffle(seed=3).flatten_indices()
  ordered = datasets.concatenate_datasets(
      [shuffled.filter(lambda r, c=c: r["language"] == c) for c in LANGUAGES])
  extract(adapter, ordered, tmp_path, modalities=["text"], layers=[1], batch_size=3,
          progress=False)
  key = Key("deu", "text", "text_encoder", 1)
  np.testing.assert_allclose(open_store(tmp_path).load(key), open_store(full_run[0]).load(key),
                             rtol=1e-5, atol=1e-6)
