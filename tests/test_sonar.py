"""SONAR adapter on its tiny random config: sites, masks, pooling against per-sentence runs."""
import datasets
import numpy as np
import pytest
import torch

from engine.data import FEATURES, load_bundled
from engine.extract import extract
from engine.models import get_adapter
from engine.models.pooling import pool
from engine.models.bpe import bundled_sentences
from engine.store import Key, open_store
from engine.models import sonar

SENTENCES = ["The sun is shining today.", "Hi!", "My brother lives in a small house near the river."]
CHECKED = (("text", "sentence_embedding", 0), ("text", "text_encoder", 2),
           ("speech", "sentence_embedding", 0), ("speech", "speech_encoder", 3))


@pytest.fixture(scope="module")
def adapter():
  return get_adapter("sonar-tiny")


@pytest.fixture(scope="module")
def waves():
  rng = np.random.default_rng(0)
  return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 5600, 11200)]


def _check_against_single(batch_out, single_outs, how):
  for key, cap in batch_out.items():
    pooled = pool(cap.hidden, cap.mask, how)
    for i, single in enumerate(single_outs):
      alone = pool(single[key].hidden, single[key].mask, how)[0]
      torch.testing.assert_close(pooled[i], alone, rtol=1e-4, atol=1e-5, msg=f"{key} row {i}")


def test_sites_cover_every_capture(adapter, waves):
  sites = {(s.name, s.modality): s.layers for s in adapter.sites()}
  assert sites == {("text_encoder", "text"): 4, ("sentence_embedding", "text"): 1,
                   ("speech_encoder", "speech"): 4, ("sentence_embedding", "speech"): 1}
  text = adapter.run_text(SENTENCES, "eng")
  speech = adapter.run_speech(waves, 16000, "deu")
  for out, modality in ((text, "text"), (speech, "speech")):
    expected = {(n, l) for (n, m), k in sites.items() if m == modality for l in range(k)}
    assert set(out) == expected
    for cap in out.values():
      assert cap.hidden.shape[:2] == cap.mask.shape and cap.hidden.shape[0] == 3
      assert cap.mask.dtype == torch.bool


def test_pooled_sites_have_one_position(adapter, waves):
  for out in (adapter.run_text(SENTENCES, "eng"), adapter.run_speech(waves, 16000, "eng")):
    cap = out[("sentence_embedding", 0)]
    assert cap.hidden.shape == (3, 1, 32) and bool(cap.mask.all())


def test_text_masks_cover_language_token_sentence_and_eos(adapter):
  out = adapter.run_text(SENTENCES, "fra")
  ids = adapter.tokenizer(SENTENCES, padding=True)["input_ids"]
  mask = out[("text_encoder", 0)].mask
  for row, sentence in zip(range(3), SENTENCES):
    n = int(mask[row].sum())
    assert bool(mask[row, :n].all()) and not bool(mask[row, n:].any())
    assert ids[row][0] == adapter.tokenizer.convert_tokens_to_ids("fra_Latn")
    assert ids[row][n - 1] == adapter.tokenizer.eos_token_id
    assert n == len(adapter.tokenizer(sentence)["input_ids"])


def test_text_embedding_is_masked_mean_of_last_layer(adapter):
  out = adapter.run_text(SENTENCES, "eng")
  last = out[("text_encoder", 3)]
  torch.testing.assert_close(pool(last.hidden, last.mask, "mean"),
                             out[("sentence_embedding", 0)].hidden[:, 0])


@pytest.mark.parametrize("how", ["mean", "max"])
def test_text_batch_pooling_equals_per_sentence(adapter, how):
  batch = adapter.run_text(SENTENCES, "eng")
  _check_against_single(batch, [adapter.run_text([s], "eng") for s in SENTENCES], how)


@pytest.mark.parametrize("how", ["mean", "last"])
def test_speech_batch_pooling_equals_per_sentence(adapter, waves, how):
  batch = adapter.run_speech(waves, 16000, "eng")
  _check_against_single(batch, [adapter.run_speech([w], 16000, "eng") for w in waves], how)


def test_speech_mask_follows_fbank_frames(adapter, waves):
  out = adapter.run_speech(waves, 16000, "eng")
  lengths = out[("speech_encoder", 0)].mask.sum(1).tolist()
  # 10 ms fbank frames, stacked in pairs: ~ one position per 20 ms of audio.
  assert [abs(n - len(w) / 320) <= 1.5 for n, w in zip(lengths, waves)] == [True] * 3


def test_tiny_weights_are_reproducible(adapter):
  other = get_adapter("sonar-tiny")
  a = adapter.run_text(SENTENCES[:1], "eng")[("sentence_embedding", 0)].hidden
  b = other.run_text(SENTENCES[:1], "eng")[("sentence_embedding", 0)].hidden
  torch.testing.assert_close(a, b)


def test_languages_and_bad_inputs(adapter, waves):
  assert adapter.supports_language("eng", "text") and adapter.supports_language("swh", "speech")
  assert not adapter.supports_language("xyz", "text")
  with pytest.raises(ValueError, match="xyz"):
    adapter.run_text(SENTENCES, "xyz")
  with pytest.raises(ValueError, match="8000"):
    adapter.run_speech(waves, 8000, "eng")
  with pytest.raises(ValueError, match="modality"):
    adapter.supports_language("eng", "video")


def test_describe_is_plain_data(adapter):
  info = adapter.describe()
  assert info["family"] == "sonar" and info["speech_languages"] == ["*"]
  assert {s["name"] for s in info["sites"]} == {"text_encoder", "speech_encoder", "sentence_embedding"}


def test_nllb_codes():
  assert sonar.nllb_code("eng") == "eng_Latn" and sonar.nllb_code("cmn") == "zho_Hans"
  with pytest.raises(ValueError, match="qqq"):
    sonar.nllb_code("qqq")


def _corpus(languages=("eng", "rus", "cmn"), n=5):
  """Bundled sentences (real scripts) with synthetic speech (tones in noise, 0.4-1 s)."""
  bundled = load_bundled(list(languages), with_audio=False).to_pandas()
  rows = {name: [] for name in FEATURES}
  rng = np.random.default_rng(1)
  for code in languages:
    part = bundled[bundled.language == code].sort_values("id").head(n)
    for k, (sid, text) in enumerate(zip(part.id, part.text)):
      t = np.arange(int(16000 * (0.4 + 0.15 * k))) / 16000
      wave = 0.2 * np.sin(2 * np.pi * (120 + 30 * k) * t) + 0.02 * rng.standard_normal(t.size)
      for name, value in (("id", int(sid)), ("language", code), ("text", text),
                          ("audio", wave.astype(np.float32)), ("sampling_rate", 16000)):
        rows[name].append(value)
  return datasets.Dataset.from_dict(rows, features=FEATURES)


def test_extraction_into_a_store_matches_direct_runs(adapter, tmp_path):
  corpus = _corpus()
  extract(adapter, corpus, tmp_path / "acts", batch_size=2, progress=False)
  st = open_store(tmp_path / "acts")
  assert len(st.keys()) == 3 * sum(s.layers for s in adapter.sites())
  frame = corpus.to_pandas()
  rus = frame[frame.language == "rus"].sort_values("id")
  for modality, site, layer in CHECKED:
    if modality == "text":
      out = adapter.run_text(list(rus.text), "rus")
    else:
      out = adapter.run_speech(list(rus.audio.map(lambda a: np.asarray(a, np.float32))), 16000, "rus")
    cap = out[(site, layer)]
    stored = np.asarray(st.load(Key("rus", modality, site, layer)))
    np.testing.assert_allclose(stored, pool(cap.hidden, cap.mask, "mean").numpy(), rtol=1e-4, atol=1e-5)


def test_languages_without_a_speech_encoder_are_reported_once_up_front(tmp_path):
  tokenizer, text, speech = sonar.build_tiny(0)
  partial = sonar.SonarAdapter(name="partial", tokenizer=tokenizer, text_encoder=text,
                               speech_encoders={"eng": speech})
  with pytest.warns(UserWarning) as caught:
    report = extract(partial, _corpus(n=2), tmp_path / "acts", modalities=["speech"],
                     batch_size=2, progress=False)
  said = [str(w.message) for w in caught if "takes no speech" in str(w.message)]
  assert said == ["partial takes no speech in 2 of the 3 languages (rus, cmn): their speech is "
                  "skipped"]
  assert sorted(report.skipped) == ["cmn.speech", "rus.speech"]
  assert {k.language for k in open_store(tmp_path / "acts").keys()} == {"eng"}


def test_tiny_tokenizer_covers_the_bundled_corpus(adapter):
  unk = adapter.tokenizer.unk_token_id
  for sentence in bundled_sentences():
    assert unk not in adapter.tokenizer(sentence, add_special_tokens=False)["input_ids"], sentence
