"""The bundled offline corpus: valid parallel text in every default language, speech where
espeak-ng can speak the language, and an honest report where it cannot."""
import re

import numpy as np
import pytest

from engine.data import (DEFAULT_LANGUAGES, bundled, corpus, corpus_info, load_bundled, speech,
                         speech_support)


@pytest.mark.parametrize("language", DEFAULT_LANGUAGES)
def test_bundled_text_is_valid(language):
  text = bundled.read_bundled_text(language)
  assert list(text.text) == list(range(1, 65))
  assert all(sentence == sentence.strip() and sentence for sentence in text.text.values())
  assert len(set(text.text.values())) == 64, "sentences of one language must differ"


def test_full_default_corpus_without_audio(tmp_path):
  ds = load_bundled(with_audio=False, cache_dir=tmp_path)
  assert list(ds.features) == list(corpus.COLUMNS)
  assert ds.num_rows == 64 * len(DEFAULT_LANGUAGES)
  corpus.check_alignment(ds, list(DEFAULT_LANGUAGES))
  assert ds.unique("language") == list(DEFAULT_LANGUAGES)
  assert ds[0]["audio"] is None and ds[0]["sampling_rate"] == 16000
  info = corpus_info(ds)
  assert info["source"] == "bundled" and info["sentences"] == 64 and not info["no_speech"]


def test_speech_where_espeak_can_and_a_report_where_it_cannot(tmp_path):
  with pytest.warns(UserWarning, match="no speech for language 'yor'"):
    ds = load_bundled(["eng", "yo", "cmn"], cache_dir=tmp_path)
  corpus.check_alignment(ds, ["eng", "yor", "cmn"])
  frame = ds.select_columns(["language"]).to_pandas()
  for i, language in enumerate(frame["language"]):
    audio = ds[i]["audio"]
    if language == "yor":
      assert audio is None
    else:
      assert audio is not None and 0.3 * 16000 < len(audio) < 15 * 16000
  info = corpus_info(ds)
  assert info["speech"] == {"eng": "en-us", "yor": None, "cmn": "cmn"}
  assert set(info["no_speech"]) == {"yor"} and "no voice" in info["no_speech"]["yor"]
  again = load_bundled(["eng", "yo", "cmn"], cache_dir=tmp_path)
  assert again[3]["audio"] == ds[3]["audio"]


def test_every_language_without_speech_is_reported():
  missing = sorted(code for code, voice in speech_support(DEFAULT_LANGUAGES).items() if not voice)
  assert missing == ["khk", "yor", "zul"]


def test_every_language_with_a_voice_can_read_its_bundled_text():
  for code, voice in speech_support(DEFAULT_LANGUAGES).items():
    if voice:
      spoken = list(bundled.read_bundled_text(code).reading.values())
      assert speech.unreadable_characters(spoken, code) == [], code


def test_japanese_is_spoken_from_its_kana_reading_and_keeps_its_kanji_text(tmp_path):
  jpn = bundled.read_bundled_text("jpn")
  kanji = re.compile(r"[\u4e00-\u9fff]")
  assert sum(bool(kanji.search(s)) for s in jpn.text.values()) > 48
  assert not any(kanji.search(s) for s in jpn.reading.values())
  assert speech.unreadable_characters(list(jpn.text.values()), "jpn")
  rows = "".join(f"{i}\t{jpn.text[i]}\t{jpn.reading[i]}\n" for i in (1, 2))
  (tmp_path / "jpn.tsv").write_text("id\ttext\treading\n" + rows, encoding="utf-8")
  ds = load_bundled(["jpn"], directory=tmp_path, cache_dir=tmp_path / "cache")
  assert corpus_info(ds)["speech"] == {"jpn": "ja"} and ds["text"] == [jpn.text[1], jpn.text[2]]
  spoken = speech.synthesize([jpn.reading[2]], "jpn", cache=False)[0]
  np.testing.assert_array_equal(ds[1]["audio"], spoken)


def _write(directory, language, rows, header="id\ttext"):
  lines = [header] + ["\t".join(map(str, row)) for row in rows]
  (directory / f"{language}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_text_a_voice_cannot_read_is_reported_unless_a_reading_is_given(tmp_path):
  _write(tmp_path, "eng", [(1, "Good morning."), (2, "The weather is nice today.")])
  _write(tmp_path, "jpn", [(1, "おはようございます。"), (2, "今日は天気がいいです。")])
  with pytest.warns(UserWarning, match="'jpn'.*cannot read"):
    ds = load_bundled(["eng", "jpn"], directory=tmp_path, cache_dir=tmp_path / "cache")
  assert ds[2]["audio"] is None and ds[3]["audio"] is None
  assert "reading" in corpus_info(ds)["no_speech"]["jpn"]

  _write(tmp_path, "jpn", [(1, "おはようございます。", ""),
                           (2, "今日は天気がいいです。", "きょうはてんきがいいです。")],
         header="id\ttext\treading")
  ds = load_bundled(["eng", "jpn"], directory=tmp_path, cache_dir=tmp_path / "cache")
  assert ds[3]["text"] == "今日は天気がいいです。" and len(ds[3]["audio"]) > 16000 // 2
  assert not corpus_info(ds)["no_speech"]


@pytest.mark.parametrize("rows,header,match", [
    ([(1, "a"), (3, "c")], "id\ttext", r"'deu'.*missing sentence ids \[2\], extra sentence ids \[3\]"),
    ([(1, "a"), (1, "b")], "id\ttext", r"deu\.tsv:3: sentence id 1 appears twice"),
    ([("one", "a"), (2, "b")], "id\ttext", r"deu\.tsv:2: sentence id 'one' is not an integer"),
    ([(1, "a"), (2, " ")], "id\ttext", r"deu\.tsv:3: sentence 2 of 'deu' is empty"),
    ([(1, "a"), (2, "b")], "id\tsentence", r"deu\.tsv: header must be"),
])
def test_malformed_or_non_parallel_text_is_an_error_naming_it(tmp_path, rows, header, match):
  _write(tmp_path, "eng", [(1, "A."), (2, "B.")])
  _write(tmp_path, "deu", rows, header)
  with pytest.raises(ValueError, match=match):
    load_bundled(["eng", "deu"], with_audio=False, directory=tmp_path, cache_dir=tmp_path)


def test_missing_language_file_and_unknown_language(tmp_path):
  _write(tmp_path, "eng", [(1, "A.")])
  with pytest.raises(ValueError, match=r"no bundled text for language 'fra'"):
    load_bundled(["eng", "fr"], with_audio=False, directory=tmp_path)
  with pytest.raises(ValueError, match="'qqq'"):
    load_bundled(["eng", "qqq"], with_audio=False, directory=tmp_path)


def test_text_is_not_reinterpreted(tmp_path):
  _write(tmp_path, "eng", [(1, "NA"), (2, '"Quoted," she said.'), (3, "None")])
  ds = load_bundled(["eng"], with_audio=False, directory=tmp_path, cache_dir=tmp_path)
  assert ds["text"] == ["NA", '"Quoted," she said.', "None"]


def test_unwritable_cache_still_loads(tmp_path):
  _write(tmp_path, "eng", [(1, "Good morning."), (2, "Thank you.")])
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.warns(UserWarning, match="not writable|not usable"):
    ds = load_bundled(["eng"], directory=tmp_path, cache_dir=blocker / "cache")
  assert all(len(audio) > 1000 for audio in ds["audio"])
