"""Single-modality encoders: only their own modality's sites, masks from the model's own length
formulas, the same vectors in any batch, extraction end to end, refusals naming the model."""
import math

import numpy as np
import pytest
import torch

from engine.extract import extract
from engine.models import family_of, get_adapter
from engine.models.pooling import pool
from engine.store import open_store
from tests.test_extract import make_corpus

SPEECH = ("whisper-encoder-tiny", "wav2vec2-tiny", "w2v-bert-tiny")
TEXT = ("nllb-encoder-tiny", "xlm-r-tiny")
TEXTS = ("Der Hund schläft.", "Ja.")


def clips():
  rng = np.random.default_rng(5)
  return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 7000)]


@pytest.fixture(scope="module", params=SPEECH + TEXT)
def adapter(request):
  return get_adapter(request.param)


def test_only_its_own_modality(adapter):
  sites = adapter.sites()
  other = "text" if adapter.modality == "speech" else "speech"
  assert [s.modality for s in sites] == [adapter.modality]
  assert family_of(adapter.name) == f"{adapter.modality}-encoders" and sites[0].layers == 3
  assert adapter.site_map[adapter.modality] == sites[0].name and adapter.site_map[other] == ()
  assert not adapter.supports_language("eng", other)


def test_masks_follow_the_models_length_formula(adapter):
  if adapter.modality == "text":
    batch = adapter.preprocessor(list(TEXTS), padding=True, return_tensors="pt")
    got = adapter.run_text(TEXTS, "deu")[("text_encoder", 0)].mask
    assert got.sum(1).tolist() == batch["attention_mask"].sum(1).tolist()
    return
  got = adapter.run_speech(clips(), 16000, "eng")[("speech_encoder", 1)].mask.sum(1).tolist()
  n = [16000, 7000]
  if adapter.encoder.name == "whisper":  # 10 ms mel frames, then a stride-2 conv
    want = [(m // 160 - 1) // 2 + 1 for m in n]
  elif adapter.encoder.name == "wav2vec2":  # seven convolutions, 25 ms receptive field, 20 ms hop
    want = [math.floor((m - 400) / 320) + 1 for m in n]
  else:  # w2v-BERT: two stacked 10 ms fbank frames per step
    want = [(1 + (m - 400) // 160) // 2 for m in n]
  assert got == want


def test_a_sentence_gives_the_same_representation_in_any_batch(adapter):
  if adapter.modality == "text":
    both, alone = adapter.run_text(TEXTS, "deu"), adapter.run_text(TEXTS[1:], "deu")
  else:
    both = adapter.run_speech(clips(), 16000, "eng")
    alone = adapter.run_speech(clips()[1:], 16000, "eng")
  for key in both:
    np.testing.assert_allclose(pool(both[key].hidden, both[key].mask)[1].numpy(),
                               pool(alone[key].hidden, alone[key].mask)[0].numpy(),
                               rtol=1e-4, atol=1e-5)


def test_extracts_its_modality_through_engine_extract(adapter, tmp_path):
  corpus = make_corpus(("eng", "swh"), n=2)
  extract(adapter, corpus, tmp_path, modalities=[adapter.modality], batch_size=3, progress=False)
  keys = open_store(tmp_path).keys()
  assert len(keys) == 2 * 3 and {k.modality for k in keys} == {adapter.modality}


def test_asking_a_text_encoder_for_speech_names_the_model(tmp_path):
  a = get_adapter("xlm-r-tiny")
  with pytest.raises(ValueError, match=r"nothing to extract from xlm-r-tiny"):
    extract(a, make_corpus(("eng",), n=2), tmp_path, modalities=["speech"], progress=False)
  with pytest.raises(ValueError, match=r"model xlm-r-tiny is a text-only encoder: it has no spe"):
    a.run_speech(clips(), 16000, "eng")


def test_asking_a_speech_encoder_for_text_names_the_model():
  a = get_adapter("wav2vec2-tiny")
  with pytest.raises(ValueError, match=r"model wav2vec2-tiny is a speech-only encoder: it has no"):
    a.run_text(TEXTS, "eng")
  assert torch.is_tensor(a.run_speech(clips(), 16000, "eng")[("speech_encoder", 2)].hidden)
