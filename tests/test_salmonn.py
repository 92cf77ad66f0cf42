"""SALMONN adapter on its tiny random config: sites, window masks, template masks, pooling."""
import math

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
from engine.models import beats, salmonn

SENTENCES = ["The sun is shining today.", "Hi!", "Please close the window, it is cold."]
CHECKED = (("text", "llm", 3), ("speech", "whisper", 1), ("speech", "beats", 2),
           ("speech", "qformer", 0), ("speech", "proj", 0), ("speech", "llm", 1))


@pytest.fixture(scope="module")
def adapter():
  return get_adapter("salmonn-tiny")


@pytest.fixture(scope="module")
def waves():
  rng = np.random.default_rng(0)
  return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 5000, 12345)]


def _check_against_single(batch_out, single_outs, how):
  for key, cap in batch_out.items():
    pooled = pool(cap.hidden, cap.mask, how)
    for i, single in enumerate(single_outs):
      alone = pool(single[key].hidden, single[key].mask, how)[0]
      torch.testing.assert_close(pooled[i], alone, rtol=1e-4, atol=1e-5, msg=f"{key} row {i}")


def test_sites_cover_every_capture(adapter, waves):
  sites = {(s.name, s.modality): s.layers for s in adapter.sites()}
  assert sites == {("whisper", "speech"): 3, ("beats", "speech"): 3, ("qformer", "speech"): 2,
                   ("proj", "speech"): 1, ("llm", "text"): 4, ("llm", "speech"): 4}
  for out, modality in ((adapter.run_text(SENTENCES, "eng"), "text"),
                        (adapter.run_speech(waves, 16000, "fra"), "speech")):
    assert set(out) == {(n, l) for (n, m), k in sites.items() if m == modality for l in range(k)}
    for cap in out.values():
      assert cap.hidden.shape[:2] == cap.mask.shape and cap.mask.dtype == torch.bool


def test_window_level_qformer_geometry(adapter, waves):
  assert (adapter.kernel, adapter.stride, adapter.n_windows) == (17, 17, 88)
  out = adapter.run_speech(waves, 16000, "eng")
  frames = [math.ceil(len(w) / 320) for w in waves]
  for layer in range(3):
    assert out[("whisper", layer)].hidden.shape[1] == 1500
    assert out[("whisper", layer)].mask.sum(1).tolist() == frames
  for key in (("qformer", 0), ("qformer", 1), ("proj", 0)):
    assert out[key].hidden.shape[1] == 88
    assert out[key].mask.sum(1).tolist() == [math.ceil(f / 17) for f in frames]
  # BEATs: 8 band tokens per 160 ms time patch starting inside the utterance (1 s pad excluded)
  assert out[("beats", 2)].mask.sum(1).tolist() == [
      min(8 * math.ceil(len(w) / 2560), beats.tokens_for(max(len(w), 16000))) for w in waves]


def test_speech_tokens_enter_the_llm_inside_the_template(adapter, waves):
  out = adapter.run_speech(waves, 16000, "eng")
  llm0, qformer, proj = out[("llm", 0)], out[("qformer", 1)], out[("proj", 0)]
  start = 1 + len(adapter._left)  # pylint: disable=protected-access
  assert llm0.hidden.shape[1] == start + 88 + len(adapter._right)  # pylint: disable=protected-access
  with torch.no_grad():
    projected = adapter.model.proj(qformer.hidden)
  torch.testing.assert_close(proj.hidden, projected)
  torch.testing.assert_close(llm0.hidden[:, start:start + 88], projected)
  torch.testing.assert_close(llm0.mask[:, start:start + 88], qformer.mask)
  assert not bool(llm0.mask[:, :start].any()) and not bool(llm0.mask[:, start + 88:].any())


def test_text_mask_covers_only_the_sentence(adapter):
  out = adapter.run_text(SENTENCES, "eng")
  cap = out[("llm", 0)]
  start = 1 + len(adapter._left)  # pylint: disable=protected-access
  embed = adapter.model.llama.get_input_embeddings()
  for row, sentence in enumerate(SENTENCES):
    ids = adapter.tokenizer(sentence, add_special_tokens=False)["input_ids"]
    assert int(cap.mask[row].sum()) == len(ids)
    assert bool(cap.mask[row, start:start + len(ids)].all())
    with torch.no_grad():
      torch.testing.assert_close(cap.hidden[row, start:start + len(ids)], embed(torch.tensor(ids)))


@pytest.mark.parametrize("how", ["mean", "max"])
def test_text_batch_pooling_equals_per_sentence(adapter, how):
  batch = adapter.run_text(SENTENCES, "eng")
  _check_against_single(batch, [adapter.run_text([s], "eng") for s in SENTENCES], how)


def test_speech_batch_pooling_equals_per_sentence(adapter, waves):
  batch = adapter.run_speech(waves, 16000, "eng")
  _check_against_single(batch, [adapter.run_speech([w], 16000, "eng") for w in waves], "mean")


def test_mask_scope_all_and_plain_text_prompt(waves):
  everything = get_adapter("salmonn-tiny", mask_scope="all", text_prompt="plain")
  text = everything.run_text(SENTENCES[:2], "eng")
  ids = [everything.tokenizer(s, add_special_tokens=False)["input_ids"] for s in SENTENCES[:2]]
  assert text[("llm", 2)].mask.sum(1).tolist() == [1 + len(i) for i in ids]  # BOS + sentence
  speech = everything.run_speech(waves[:1], 16000, "eng")
  assert bool(speech[("whisper", 0)].mask.all()) and bool(speech[("qformer", 0)].mask.all())
  assert int(speech[("beats", 1)].mask.sum()) == 8 * (98 // 16)  # every token of the 1 s input
  assert bool(speech[("llm", 1)].mask.all())
  info = everything.describe()
  assert (info["mask_scope"], info["text_prompt"]) == ("all", "plain")


def test_audio_longer_than_whisper_chunk_is_cut(adapter):
  long = np.zeros(16000 * 31, dtype=np.float32)
  out = adapter.run_speech([long], 16000, "eng")
  assert int(out[("whisper", 0)].mask.sum()) == 1500 and int(out[("qformer", 0)].mask.sum()) == 88
  assert out[("beats", 0)].hidden.shape[1] == 1496  # BEATs of 30 s: 187 time patches x 8 bands


def test_bad_inputs_name_the_problem(adapter, waves):
  with pytest.raises(ValueError, match="22050"):
    adapter.run_speech(waves, 22050, "eng")
  with pytest.raises(ValueError, match="mask_scope"):
    get_adapter("salmonn-tiny", mask_scope="template")
  with pytest.raises(ValueError, match="colour"):
    get_adapter("salmonn-tiny", colour="red")
  with pytest.raises(ValueError, match="SpeechHere"):
    salmonn.SalmonnOptions(prompt_template="USER: {}")
  with pytest.raises(ValueError, match="checkpoint"):
    salmonn.load("/nonexistent/salmonn", whisper="w", llm="l")


def test_describe_reports_beats(adapter):
  info = adapter.describe()
  assert info["family"] == "salmonn" and info["beats"].startswith("present")
  assert info["without_beats"] is False
  bare = get_adapter("salmonn-tiny", without_beats=True).describe()
  assert bare["without_beats"] is True and bare["beats"].startswith("ABSENT")
  assert "beats" not in {s["name"] for s in bare["sites"]}
  assert (info["window_frames"], info["windows"], info["queries_per_window"]) == (17, 88, 1)


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
  direct = {"text": adapter.run_text(list(rus.text), "rus"),
            "speech": adapter.run_speech(list(rus.audio.map(lambda a: np.asarray(a, np.float32))),
                                         16000, "rus")}
  for modality, site, layer in CHECKED:
    cap = direct[modality][(site, layer)]
    stored = np.asarray(st.load(Key("rus", modality, site, layer)))
    np.testing.assert_allclose(stored, pool(cap.hidden, cap.mask, "mean").numpy(), rtol=1e-4, atol=1e-5)


def test_tiny_tokenizer_covers_the_bundled_corpus(adapter):
  unk = adapter.tokenizer.unk_token_id
  for sentence in bundled_sentences():
    assert unk not in adapter.tokenizer(sentence, add_special_tokens=False)["input_ids"], sentence
