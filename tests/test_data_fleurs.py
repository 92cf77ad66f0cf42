"""FLEURS loading from small FLEURS-shaped copies (parquet export and tsv + tar.gz) built here.

The fixture has three languages; eng and swh lack nothing, deu lacks sentence 12. Sentence 10 has
two recordings in every language (listed in reverse name order), one deu recording is at
22.05 kHz, one swh recording is stereo and one swh row is an exact duplicate.
"""
import io
import socket
import tarfile

import datasets
import huggingface_hub
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from engine.data import corpus, fleurs, load_fleurs, speech

LANGS = {"eng": "en_us", "deu": "de_de", "swh": "sw_ke"}


def _recording(config, sentence_id, name, rate=16000, channels=1):
  seed = sum(map(ord, config + name))
  n = int(rate * (0.1 + 0.01 * (seed % 7)))
  t = np.arange(n) / rate
  wave = 0.3 * np.sin(2 * np.pi * (200 + seed % 300) * t)
  wave = np.stack([wave] * channels, axis=1) if channels > 1 else wave
  buf = io.BytesIO()
  sf.write(buf, wave, rate, format="WAV", subtype="PCM_16")
  return {"id": sentence_id, "file": name, "bytes": buf.getvalue(),
          "text": f"{config} sentence {sentence_id}."}


def _fixture_rows(corrupt):
  rows = {}
  for code, config in LANGS.items():
    ids = [10, 11, 13] if code == "deu" else [10, 11, 12, 13]
    recs = [_recording(config, 10, "9b.wav")]
    for i in ids:
      rate = 22050 if (code, i) == ("deu", 11) else 16000
      channels = 2 if (code, i) == ("swh", 11) else 1
      recs.append(_recording(config, i, f"{i}a.wav", rate, channels))
    if code == "swh":
      recs.append(dict(recs[-1]))
    if corrupt and code == "deu":
      recs[-1]["bytes"] = b"RIFF this is not audio"
    rows[config] = recs
  return rows


def _write_parquet(root, rows):
  features = datasets.Features({
      "id": datasets.Value("int32"), "num_samples": datasets.Value("int32"),
      "path": datasets.Value("string"), "audio": datasets.Audio(sampling_rate=16000),
      "transcription": datasets.Value("string"), "raw_transcription": datasets.Value("string"),
      "gender": datasets.Value("int64")})
  for config, recs in rows.items():
    table = pa.Table.from_pydict({
        "id": [r["id"] for r in recs], "num_samples": [0] * len(recs),
        "path": [f"test/{r['file']}" for r in recs],
        "audio": [{"bytes": r["bytes"], "path": r["file"]} for r in recs],
        "transcription": [r["text"].lower() for r in recs],
        "raw_transcription": [r["text"] for r in recs], "gender": [0] * len(recs)},
        schema=features.arrow_schema)
    (root / config / "test").mkdir(parents=True)
    pq.write_table(table, root / config / "test" / "0000.parquet")


def _write_tsv(root, rows, extracted=False):
  for config, recs in rows.items():
    base = root / "data" / config
    (base / "audio").mkdir(parents=True)
    lines = [f"{r['id']}\t{r['file']}\t{r['text']}\t{r['text'].lower()}\tw o r d s\t0\tMALE"
             for r in recs]
    (base / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if extracted:
      (base / "audio" / "test").mkdir()
      for r in recs:
        (base / "audio" / "test" / r["file"]).write_bytes(r["bytes"])
      continue
    with tarfile.open(base / "audio" / "test.tar.gz", "w:gz") as tar:
      for r in {r["file"]: r for r in recs}.values():
        info = tarfile.TarInfo(f"test/{r['file']}")
        info.size = len(r["bytes"])
        tar.addfile(info, io.BytesIO(r["bytes"]))


def make_fleurs(root, layout, corrupt=False):
  rows = _fixture_rows(corrupt)
  if layout == "parquet":
    _write_parquet(root, rows)
  else:
    _write_tsv(root, rows, extracted=layout == "extracted")
  return rows


def _expected_audio(rec):
  audio, rate = sf.read(io.BytesIO(rec["bytes"]), dtype="float32", always_2d=True)
  return speech.resample(audio.mean(axis=1), rate)


def _load(tmp_path, languages=("en_us", "deu", "swa"), **kw):
  return load_fleurs(list(languages), "test", local_dir=tmp_path / "fleurs",
                     cache_dir=tmp_path / "cache", hf_cache_dir=tmp_path / "hf", **kw)


@pytest.mark.parametrize("layout", ["parquet", "tsv", "extracted"])
def test_aligned_by_id_with_deterministic_recordings(tmp_path, layout):
  rows = make_fleurs(tmp_path / "fleurs", layout)
  ds = _load(tmp_path)
  assert list(ds.features) == list(corpus.COLUMNS)
  corpus.check_alignment(ds, ["eng", "deu", "swh"])
  frame = ds.to_pandas()
  assert list(frame["language"]) == ["eng"] * 3 + ["deu"] * 3 + ["swh"] * 3
  assert list(frame["id"]) == [10, 11, 13] * 3
  assert (frame["sampling_rate"] == 16000).all()
  for code, config in LANGS.items():
    recs = {(r["id"], r["file"]): r for r in rows[config]}
    for sentence_id, expected_file in [(10, "10a.wav"), (11, "11a.wav"), (13, "13a.wav")]:
      rec = recs[(sentence_id, expected_file)]
      got = ds[int(np.flatnonzero((frame["language"] == code) & (frame["id"] == sentence_id))[0])]
      assert got["text"] == rec["text"]
      np.testing.assert_array_equal(np.asarray(got["audio"], np.float32), _expected_audio(rec))
  deu_11 = {(r["id"], r["file"]): r for r in rows["de_de"]}[(11, "11a.wav")]["bytes"]
  frames_22k = sf.info(io.BytesIO(deu_11)).frames
  assert abs(len(ds[4]["audio"]) - frames_22k * 16000 / 22050) <= 1
  info = corpus.corpus_info(ds)
  read, common, enough = info["steps"]
  assert read["sentences"] == {"eng": 4, "deu": 3, "swh": 4}
  assert read["duplicate rows"] == {"eng": 0, "deu": 0, "swh": 1}
  assert common["sentences"] == 3 and common["dropped"] == {"eng": 1, "deu": 0, "swh": 1}
  assert enough["sentences"] == 3 and info["sentences"] == 3
  assert info["files"]["eng"] == ["10a.wav", "11a.wav", "13a.wav"]


def test_several_recordings_per_sentence(tmp_path):
  make_fleurs(tmp_path / "fleurs", "parquet")
  ds = _load(tmp_path, recordings_per_sentence=2)
  corpus.check_alignment(ds, ["eng", "deu", "swh"])
  assert ds["id"] == [10, 10] * 3
  assert corpus.corpus_info(ds)["files"]["deu"] == ["10a.wav", "9b.wav"]


def test_max_sentences_and_text_column(tmp_path):
  make_fleurs(tmp_path / "fleurs", "tsv")
  ds = _load(tmp_path, languages=["eng", "swh"], max_sentences=2, text_column="transcription")
  assert ds["id"] == [10, 11, 10, 11]
  assert ds[0]["text"] == "en_us sentence 10."
  assert corpus.corpus_info(ds)["steps"][-1] == {"step": "first 2 by id", "sentences": 2}


def test_languages_loaded_apart_align_as_one_load(tmp_path):
  """A multi-process sweep: each group finds its eligible ids, each loads among their
  intersection, and together they hold what one load of every language holds."""
  make_fleurs(tmp_path / "fleurs", "tsv")
  groups = [["eng", "deu"], ["swh"]]
  found = [fleurs.eligible_ids(g, "test", local_dir=tmp_path / "fleurs",
                               hf_cache_dir=tmp_path / "hf") for g in groups]
  assert found == [[10, 11, 13], [10, 11, 12, 13]]  # deu lacks 12
  among = sorted(set(found[0]) & set(found[1]))
  whole = _load(tmp_path, max_sentences=3).to_pandas()
  assert _load(tmp_path, languages=["swh"], max_sentences=3)["id"] == [10, 11, 12]  # alone
  for group in groups:
    part = _load(tmp_path, languages=group, max_sentences=3, among=among).to_pandas()
    expected = whole[whole["language"].isin(group)].reset_index(drop=True)
    assert list(part["id"]) == list(expected["id"]) and list(part["text"]) == list(expected["text"])
    for a, b in zip(part["audio"], expected["audio"]):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("layout", ["parquet", "tsv"])
def test_corrupt_audio_names_file_and_language(tmp_path, layout):
  make_fleurs(tmp_path / "fleurs", layout, corrupt=True)
  with pytest.raises(ValueError, match=r"'13a\.wav' of language 'deu' cannot be decoded"):
    _load(tmp_path)


def test_second_load_reuses_the_built_corpus(tmp_path, monkeypatch):
  make_fleurs(tmp_path / "fleurs", "parquet")
  first = _load(tmp_path)
  monkeypatch.setattr(fleurs, "decode", lambda *a: pytest.fail("decoded again"))
  second = _load(tmp_path)
  assert second["id"] == first["id"] and second[5]["audio"] == first[5]["audio"]


def test_unknown_language_and_split(tmp_path):
  make_fleurs(tmp_path / "fleurs", "tsv")
  with pytest.raises(ValueError, match="'xx_yy'"):
    _load(tmp_path, languages=["eng", "xx_yy"])
  with pytest.raises(ValueError, match="split 'dvel'"):
    load_fleurs(["eng"], "dvel", local_dir=tmp_path / "fleurs")


def test_language_missing_from_local_copy(tmp_path):
  make_fleurs(tmp_path / "fleurs", "tsv")
  with pytest.raises(ValueError, match=r"no local FLEURS data for language 'fra'.*fr_fr"):
    _load(tmp_path, languages=["eng", "fra"])


def test_no_network_says_how_to_provide_a_local_copy(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

  def no_network(*args, **kwargs):
    raise AssertionError(f"tried to reach the network: {args}")

  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setattr(socket, "getaddrinfo", no_network)
  with pytest.raises(ConnectionError, match=r"local_dir=.*en_us/test/\*\.parquet.*test\.tsv"):
    load_fleurs(["eng", "deu"], "test", cache_dir=tmp_path / "c", hf_cache_dir=tmp_path / "hf")
