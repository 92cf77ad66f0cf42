"""The bundled offline corpus: 64 everyday sentences in 30 languages, with synthesised speech.

Text lives in the package as engine/data/bundled/{code}.tsv (header `id<TAB>text`, one sentence
a line, no quoting). An optional third column `reading` gives the text espeak-ng should speak
when the written form is one its voice cannot read (e.g. kana for Japanese kanji, spaced by
phrase, with the particles は/へ written as spoken, わ/え, since espeak-ng reads kana literally);
the `text` column is what models see. Speech comes from engine.data.speech; languages espeak-ng
cannot speak keep their text and get audio None, with a warning and an entry in corpus_info(ds).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import warnings
from pathlib import Path
from typing import Iterable

import datasets

from engine.data import corpus
from engine.data import languages as languages_lib
from engine.data import speech

BUNDLED_DIR = Path(__file__).parent / "bundled"
COLUMNS = ("id", "text")
OPTIONAL_COLUMNS = ("reading",)


@dataclasses.dataclass(frozen=True)
class BundledText:
  """One language's sentences, by id; `reading` is what is spoken (defaults to `text`)."""
  language: str
  path: Path
  text: dict[int, str]
  reading: dict[int, str]
  digest: str


def bundled_languages() -> list[str]:
  """Languages whose bundled text is present, in DEFAULT_LANGUAGES order."""
  return [code for code in languages_lib.DEFAULT_LANGUAGES if (BUNDLED_DIR / f"{code}.tsv").exists()]


def read_bundled_text(language: str, directory: str | os.PathLike | None = None) -> BundledText:
  """Parses and validates one language's TSV; errors name the file, line and sentence id."""
  code = languages_lib.resolve_language(language)
  path = Path(directory or BUNDLED_DIR) / f"{code}.tsv"
  if not path.exists():
    raise ValueError(f"no bundled text for language {code!r} (expected {path}); "
                     f"present: {', '.join(bundled_languages()) or 'none'}")
  raw = path.read_bytes()
  lines = raw.decode("utf-8-sig").splitlines()
  rows = list(csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))
  header = tuple(rows[0]) if rows else ()
  if header[:2] != COLUMNS or not set(header[2:]) <= set(OPTIONAL_COLUMNS):
    raise ValueError(f"{path}: header must be 'id<TAB>text' (optionally '<TAB>reading'), "
                     f"got {header!r}")
  text: dict[int, str] = {}
  reading: dict[int, str] = {}
  for lineno, fields in enumerate(rows[1:], start=2):
    if not fields or fields == [""]:
      continue
    if len(fields) != len(header):
      raise ValueError(f"{path}:{lineno}: expected {len(header)} tab-separated fields, "
                       f"got {len(fields)}")
    record = dict(zip(header, fields))
    try:
      sentence_id = int(record["id"])
    except ValueError:
      raise ValueError(f"{path}:{lineno}: sentence id {record['id']!r} is not an integer") from None
    if sentence_id in text:
      raise ValueError(f"{path}:{lineno}: sentence id {sentence_id} appears twice")
    sentence = record["text"].strip()
    if not sentence:
      raise ValueError(f"{path}:{lineno}: sentence {sentence_id} of {code!r} is empty")
    text[sentence_id] = sentence
    reading[sentence_id] = (record.get("reading") or "").strip() or sentence
  if not text:
    raise ValueError(f"{path}: no sentences")
  return BundledText(code, path, dict(sorted(text.items())), dict(sorted(reading.items())),
                     hashlib.sha256(raw).hexdigest())


def _check_same_ids(texts: list[BundledText]) -> list[int]:
  ids = list(texts[0].text)
  for t in texts[1:]:
    missing = sorted(set(ids) - set(t.text))
    extra = sorted(set(t.text) - set(ids))
    if missing or extra:
      raise ValueError(
          f"bundled text of {t.language!r} ({t.path}) is not parallel to {texts[0].language!r}: "
          f"missing sentence ids {missing}, extra sentence ids {extra}")
  return ids


def _speech_plan(texts: list[BundledText]) -> tuple[dict, dict]:
  """{language: voice} for the languages we can speak, {language: reason} for the rest."""
  voices, no_speech = {}, {}
  for t in texts:
    voice = speech.espeak_voice(t.language)
    if voice is None:
      no_speech[t.language] = "espeak-ng has no voice for this language"
      continue
    bad = speech.unreadable_characters(list(t.reading.values()), t.language)
    if bad:
      no_speech[t.language] = (f"espeak-ng voice {voice!r} cannot read {len(bad)} letters of the "
                               f"text (e.g. {''.join(bad[:8])}); add a 'reading' column")
      continue
    voices[t.language] = voice
  return voices, no_speech


def _rows(languages, ids, texts, readings, voices, cache_dir):
  for code in languages:
    audios = [None] * len(ids)
    if code in voices:
      audios = speech.synthesize([readings[code][i] for i in ids], code, cache_dir=cache_dir,
                                 check_characters=False)
    for sentence_id, audio in zip(ids, audios):
      yield corpus.row(sentence_id, code, texts[code][sentence_id], audio)


def load_bundled(languages: str | Iterable[str] | None = None, with_audio: bool = True, *,
                 cache_dir: str | os.PathLike | None = None,
                 directory: str | os.PathLike | None = None) -> datasets.Dataset:
  """The bundled parallel corpus (default: all 30 languages), aligned by sentence id.

  Speech is synthesised with espeak-ng at 16 kHz (cached under `cache_dir`, see
  engine.data.speech); languages it cannot speak get audio None, a warning, and an entry in
  corpus_info(ds)['no_speech']. `directory` points at another set of TSVs (tests).
  """
  codes = languages_lib.resolve_languages(languages)
  texts = [read_bundled_text(code, directory) for code in codes]
  ids = _check_same_ids(texts)
  voices, no_speech = _speech_plan(texts) if with_audio else ({}, {})
  for code, reason in no_speech.items():
    warnings.warn(f"no speech for language {code!r} in the bundled corpus: {reason}")
  info = {
      "source": "bundled",
      "languages": codes,
      "sentences": len(ids),
      "with_audio": with_audio,
      "sampling_rate": corpus.SAMPLING_RATE,
      "speech": {code: voices.get(code) for code in codes} if with_audio else {},
      "no_speech": no_speech,
      "espeak_ng": speech.espeak_info()["version"] if with_audio else None,
  }
  key = corpus.fingerprint("bundled", codes, [t.digest for t in texts], with_audio, voices,
                           info["espeak_ng"])
  gen_kwargs = {
      "languages": tuple(codes), "ids": tuple(ids),
      "texts": {t.language: t.text for t in texts},
      "readings": {t.language: t.reading for t in texts},
      "voices": voices, "cache_dir": None if cache_dir is None else str(cache_dir),
  }
  return corpus.build(_rows, gen_kwargs, key=key, info=info, cache_dir=cache_dir)
