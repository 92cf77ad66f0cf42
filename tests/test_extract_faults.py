"""Extraction under bad data and faults: each bad input is refused with the sentence id and
language before anything runs (or, found by the model, stops the run with what completed kept);
a run killed (SIGKILL) at random points again and again, then resumed, ends byte-identical to
an uninterrupted run, and no half-written representation is ever readable as complete."""
import os
import select
import signal
import time
import traceback
import warnings

import datasets
import numpy as np
import pytest
import torch

from engine import extract as extract_lib
from engine.data import FEATURES
from engine.extract import extract
from engine.models import get_adapter
from engine.store import Key, StoreError, open_store
from tests.test_extract import _assert_identical, _PoisonedAdapter, make_corpus

LANGUAGES = ("eng", "deu")


@pytest.fixture(scope="module")
def adapter():
  return get_adapter("seamless-tiny")


def edit(corpus: datasets.Dataset, fn) -> datasets.Dataset:
  """The corpus with fn(rows) applied to its columns (a dict of lists)."""
  rows = corpus.to_dict()
  fn(rows)
  return datasets.Dataset.from_dict(rows, features=FEATURES)


def rows_of(rows, language, sentence_id=None):
  return [i for i, (code, sid) in enumerate(zip(rows["language"], rows["id"]))
          if code == language and (sentence_id is None or sid == sentence_id)]


# ----------------------------------------------------------------------------- refused up front


@pytest.mark.parametrize("text, message", [
    ("", r"sentence id 103 \(language 'deu'\) has empty text"),
    ("\t\n ", r"sentence id 103 \(language 'deu'\) has empty text"),
    ("\u3000\u00a0", r"sentence id 103 \(language 'deu'\) has empty text"),
    ("word " * 1000, r"sentence id 103 \(language 'deu'\) has 4999 characters of text, more than "
                     r"max_text_chars=4096.*split it"),
])
def test_bad_text_is_refused_before_anything_runs(adapter, tmp_path, text, message):
  corpus = make_corpus(LANGUAGES, 4, text={("deu", 103): text})
  with pytest.raises(ValueError, match=message):
    extract(adapter, corpus, tmp_path, modalities=["text"], progress=False)
  assert not (tmp_path / "manifest.json").exists()


def _rate(rows):
  for i in rows_of(rows, "deu"):
    rows["sampling_rate"][i] = 8000


def _int16(rows):
  (i,) = rows_of(rows, "deu", 106)
  rows["audio"][i] = (np.asarray(rows["audio"][i]) * 32767).round().tolist()


def _long(rows):
  (i,) = rows_of(rows, "eng", 109)
  rows["audio"][i] = np.tile(np.asarray(rows["audio"][i], np.float32), 400)[:121 * 16000]


def _drop(rows):
  (i,) = rows_of(rows, "deu", 106)
  for column in rows.values():
    del column[i]


def _relabel(rows):
  for i in rows_of(rows, "deu"):
    rows["language"][i] = "eng"


def _copy_text(rows):
  for i, j in zip(rows_of(rows, "eng"), rows_of(rows, "deu")):
    rows["text"][j] = rows["text"][i]


@pytest.mark.parametrize("change, message", [
    (_rate, r"sentence id 100 \(language 'deu'\) has audio at 8000 Hz; corpora carry 16000 Hz"),
    (_int16, r"sentence id 106 \(language 'deu'\) has audio peaking at \d{4}; float samples lie "
             r"in \[-1, 1\]"),
    (_long, r"sentence id 109 \(language 'eng'\) has 121 s of audio, more than "
            r"max_clip_seconds=120.*split it"),
    (_drop, r"language 'deu' does not hold the same sentence ids as 'eng' \(differing ids: \[106\]"),
    (_relabel, r"sentence id 100 appears twice in language 'eng'"),
    (_copy_text, r"languages 'eng' and 'deu' have the same text for every sentence: one of them "
                 r"is mislabelled"),
])
def test_bad_audio_or_misaligned_languages_are_refused_before_anything_runs(adapter, tmp_path,
                                                                            change, message):
  corpus = edit(make_corpus(LANGUAGES, 4), change)
  with pytest.raises(ValueError, match=message):
    extract(adapter, corpus, tmp_path, progress=False)
  assert not (tmp_path / "manifest.json").exists()


def test_clipped_audio_warns_and_is_used(adapter, tmp_path):
  def clip(rows):
    (i,) = rows_of(rows, "eng", 103)
    rows["audio"][i] = np.clip(10 * np.asarray(rows["audio"][i]), -1, 1).tolist()

  corpus = edit(make_corpus(LANGUAGES, 4), clip)
  with pytest.warns(RuntimeWarning, match=r"1 clip\(s\) of language 'eng' are clipped \(sentence "
                                          r"ids \[103\]\)"):
    extract(adapter, corpus, tmp_path, modalities=["speech"], layers=[-1], progress=False)
  st = open_store(tmp_path)
  assert np.isfinite(st.load(Key("eng", "speech", "speech_encoder", 3))).all()


# ----------------------------------------------------------------------------- found by the model


def test_fp16_overflow_names_the_sentence_and_keeps_what_completed(tmp_path):
  """A float16 model overflows on one language (its language token's embedding is huge): the
  message says where and suggests float32; the language before it is complete and exact."""
  fp16 = get_adapter("seamless-tiny", dtype="float16")
  corpus = make_corpus(LANGUAGES, 4)
  extract(fp16, corpus, tmp_path / "clean", modalities=["text"], progress=False)
  embedding = fp16.text_encoder.embed_tokens.weight
  token = fp16.tokenizer.convert_tokens_to_ids("__deu__")
  saved = embedding[token].clone()
  with torch.no_grad():
    embedding[token] = 6e4
  try:
    with pytest.raises(ValueError, match=r"non-finite activations \(NaN or Inf\) for sentence id "
                                         r"\d+ \(language 'deu', text\) at site 'text_encoder'.*"
                                         r"float16, which overflows easily: try float32.*kept"):
      extract(fp16, corpus, tmp_path / "run", modalities=["text"], progress=False)
  finally:
    with torch.no_grad():
      embedding[token] = saved
  st = open_store(tmp_path / "run")
  assert {k.language for k in st.keys()} == {"eng"} and st.verify() == []
  for key in st.keys():
    assert ((tmp_path / "run" / f"{key.name}.npy").read_bytes()
            == (tmp_path / "clean" / f"{key.name}.npy").read_bytes())


def test_failure_mid_language_then_resume_loses_nothing(adapter, tmp_path):
  """NaN in the last (shortest) batch of 'deu': its earlier batches stay written, and a re-run
  with the model fixed computes only what is missing, ending identical to a clean run."""
  corpus = make_corpus(LANGUAGES, text={("deu", 103): "a poison"})
  clean = extract(adapter, corpus, tmp_path / "clean", modalities=["text"], batch_size=2,
                  progress=False)
  with pytest.raises(ValueError, match=r"sentence id 103 \(language 'deu', text\)"):
    extract(_PoisonedAdapter(adapter), corpus, tmp_path / "run", modalities=["text"],
            batch_size=2, progress=False)
  report = extract(adapter, corpus, tmp_path / "run", modalities=["text"], batch_size=2,
                   progress=False)
  assert report.batches_resumed == 3 and report.batches_run == 1  # 'deu': 4 batches, 3 kept
  assert report.batches_run < clean.batches_run
  _assert_identical(tmp_path / "run", tmp_path / "clean")


# ----------------------------------------------------------------------------- repeated SIGKILL


def _spawn(adapter, corpus, path) -> tuple[int, int]:
  """Forks a child extracting into path; returns its pid and a pipe it writes a byte to after
  every batch. One torch thread in the child: forked OpenMP pools hang."""
  read, write = os.pipe()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # JAX, if loaded, warns about fork; the child never uses it
    pid = os.fork()
  if pid:
    os.close(write)
    return pid, read
  code = 1
  try:
    os.close(read)
    torch.set_num_threads(1)
    extract(adapter, corpus, path, batch_size=3, progress=False,
            on_batch=lambda *_: os.write(write, b"."))
    code = 0
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
  finally:
    os._exit(code)  # pylint: disable=protected-access


def _wait(pid, timeout=120.0) -> int:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      return status
    time.sleep(0.01)
  os.kill(pid, signal.SIGKILL)
  os.waitpid(pid, 0)
  raise AssertionError("extraction child did not finish")


def _first_batch(fd, timeout=120.0) -> float:
  """Blocks until the child reports its first batch (or exits); returns when that was."""
  ready, _, _ = select.select([fd], [], [], timeout)
  if ready:
    os.read(fd, 1)
  return time.monotonic()


def test_repeated_sigkill_at_random_points_then_resume(adapter, tmp_path):
  """Kills land at random moments: a quarter of them while the run starts up (validation,
  opening the store), the rest at a random time after its first new batch, i.e. while it
  runs the model, writes rows, checksums a finished representation or rewrites the manifest."""
  corpus = make_corpus(LANGUAGES)
  start = time.monotonic()
  pid, fd = _spawn(adapter, corpus, tmp_path / "ref")
  startup = _first_batch(fd) - start
  assert _wait(pid) == 0
  work = time.monotonic() - start - startup
  os.close(fd)
  reference = open_store(tmp_path / "ref")
  expected = {k: (tmp_path / "ref" / f"{k.name}.npy").read_bytes() for k in reference.keys()}
  rng = np.random.default_rng(8)
  path, kills, seen = tmp_path / "run", 0, []
  for _ in range(20):  # until a run finishes on its own
    pid, fd = _spawn(adapter, corpus, path)
    if rng.random() < 0.25:
      time.sleep(rng.uniform(0, startup))
    else:
      _first_batch(fd)
      time.sleep(rng.uniform(0, 0.15) * work)
    os.kill(pid, signal.SIGKILL)
    status = _wait(pid)
    os.close(fd)
    if not os.WIFSIGNALED(status):
      assert os.WEXITSTATUS(status) == 0
      break
    kills += 1
    if not (path / "manifest.json").exists():
      seen.append(0)
      continue
    # Whatever the moment of the kill, every representation the store calls complete is whole.
    st = open_store(path)
    for key in st.keys():
      st.load(key)  # its checksum holds
      assert (path / f"{key.name}.npy").read_bytes() == expected[key], key.name
    for key in set(st.keys(complete=False)) - set(st.keys()):
      with pytest.raises(StoreError, match="not complete"):
        st.load(key)
    seen.append(len(st.keys()))
  print(f"{kills} kills; complete representations after each: {seen} of {len(expected)}")
  assert kills >= 5, kills
  assert any(0 < s < len(expected) for s in seen), seen  # some kills landed mid-way
  pid, fd = _spawn(adapter, corpus, path)
  assert _wait(pid) == 0
  os.close(fd)
  _assert_identical(path, tmp_path / "ref")
  assert open_store(path).verify() == []
  assert not list(path.glob(".manifest.json.*"))
