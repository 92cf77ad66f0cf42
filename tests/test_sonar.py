"""SONAR adapter on its tiny random config: sites, masks, pooling against per-sentence runs."""
import numpy as np
import pytest
import torch

from engine.models import get_adapter
from engine.models.pooling import pool
from engine.models import sonar

SENTENCES = ["The sun is shining today.", "Hi!", "My brother lives in a small house near the river."]


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
