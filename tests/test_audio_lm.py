"""Audio-language models through one recipe: inputs are the processor's own, pooling covers the
content span only, extraction runs end to end, and bad input is refused naming the model."""
import json
import math

import numpy as np
import pytest
import torch

from engine.extract import extract
from engine.models import audio_lm, family_of, get_adapter
from engine.models.pooling import pool
from engine.store import Key, open_store
from tests.test_extract import make_corpus

MODELS = ("qwen2-audio-tiny", "voxtral-tiny", "qwen2.5-omni-tiny", "audioflamingo3-tiny")
PROCESSOR_TEMPLATED = ("qwen2-audio-tiny", "qwen2.5-omni-tiny", "audioflamingo3-tiny")
TEXTS = ("Der Hund schläft.", "Mvua inanyesha leo asubuhi, na watoto wanacheza nje.", "Ja.")
LANGUAGES = ("eng", "deu", "swh")


def clips(seconds=(1.0, 0.45)):
  rng = np.random.default_rng(3)
  out = []
  for s in seconds:
    t = np.arange(int(16000 * s)) / 16000
    out.append((0.2 * np.sin(2 * np.pi * 220 * t) + 0.02 * rng.standard_normal(t.size))
               .astype(np.float32))
  return out


@pytest.fixture(scope="module", params=MODELS)
def adapter(request):
  return get_adapter(request.param)


def test_sites_and_site_map(adapter):
  sites = {(s.name, s.modality): s.layers for s in adapter.sites()}
  assert sites == {("audio_encoder", "speech"): 3, ("projector", "speech"): 1,
                   ("llm", "text"): 4, ("llm", "speech"): 4}
  assert audio_lm.SITE_MAP["text"] == "llm" and "projector" in audio_lm.SITE_MAP["speech"]


@pytest.mark.parametrize("model", PROCESSOR_TEMPLATED)
def test_inputs_are_what_the_processor_produces(model):
  """Each sentence and clip alone through the processor's own chat-template path
  (apply_chat_template with tokenize=True) gives the adapter's batch rows."""
  a = get_adapter(model)
  batch, _ = a.text_inputs(TEXTS)
  for i, text in enumerate(TEXTS):
    ref = a.processor.apply_chat_template(audio_lm.conversation({"type": "text", "text": text}),
                                          tokenize=True, return_dict=True,
                                          add_generation_prompt=True, return_tensors="pt")
    n = int(batch["attention_mask"][i].sum())
    assert batch["input_ids"][i, :n].tolist() == ref["input_ids"][0].tolist()
  audios = clips()
  speech = a.speech_inputs(audios)
  for i, clip in enumerate(audios):
    ref = a.processor.apply_chat_template(
        audio_lm.conversation({"type": "audio", "audio": clip}), tokenize=True,
        return_dict=True, add_generation_prompt=True, return_tensors="pt",
        processor_kwargs={"sampling_rate": 16000})
    n = int(speech["attention_mask"][i].sum())
    assert speech["input_ids"][i, :n].tolist() == ref["input_ids"][0].tolist()
    torch.testing.assert_close(speech["input_features"][i], ref["input_features"][0])


def test_voxtral_inputs_follow_the_instruct_format():
  a = get_adapter("voxtral-tiny")
  tok = a.tokenizer
  batch, _ = a.text_inputs(TEXTS[:2])
  for i, text in enumerate(TEXTS[:2]):
    want = (tok.convert_tokens_to_ids(["<s>", "[INST]"])
            + tok(text, add_special_tokens=False)["input_ids"]
            + tok.convert_tokens_to_ids(["[/INST]"]))
    n = int(batch["attention_mask"][i].sum())
    assert batch["input_ids"][i, :n].tolist() == want
  audios = clips((1.0, 31.0))
  speech = a.speech_inputs(audios)
  assert speech["input_features"].shape == (3, 128, 3000)  # 1 + 2 windows of 30 s
  ref = a.processor._retrieve_input_features([audios[1]], 3000, sampling_rate=16000,  # pylint: disable=protected-access
                                              padding=True, truncation=False,
                                              pad_to_multiple_of=480000, return_tensors="pt")
  torch.testing.assert_close(speech["input_features"][1:], ref)
  counts = (speech["input_ids"] == 24).sum(1).tolist()
  assert counts == [375, 750]


def test_text_pooling_covers_the_sentence_tokens_only(adapter):
  """The content mask selects exactly the sentence's own token ids, never a template token."""
  batch, content = adapter.text_inputs(TEXTS)
  tok = adapter.tokenizer
  specials = set(tok.all_special_ids)
  for i, text in enumerate(TEXTS):
    got = batch["input_ids"][i][content[i]].tolist()
    assert got == tok(text, add_special_tokens=False)["input_ids"]
    assert not specials & set(got)
    outside = batch["input_ids"][i][~content[i] & batch["attention_mask"][i].bool()]
    assert len(outside) > 0 and tok.decode(outside).count(text) == 0


def test_speech_pooling_covers_the_audio_tokens_only(adapter):
  """Masked LM positions are audio placeholders of the processor's output, as many as the
  clip's content tokens; audio bos/eos markers and the template around them are out."""
  audios = clips()
  batch = adapter.speech_inputs(audios)
  captures = adapter.run_speech(audios, 16000, "eng")
  mask = captures[("llm", 0)].mask.cpu()
  ids = batch["input_ids"]
  assert bool((ids[mask] == adapter.audio_token_id).all())
  per_clip = mask.sum(1).tolist()
  assert per_clip == captures[("projector", 0)].mask.sum(1).tolist()
  assert per_clip[0] > per_clip[1] > 0
  placeholders = (ids == adapter.audio_token_id).sum(1).tolist()
  if adapter.family.name == "voxtral":  # a whole 30 s window of tokens; content ends with the clip
    assert placeholders == [375, 375]
    assert per_clip == [math.ceil(math.ceil(len(a) / 320) / 4) for a in audios]
  else:  # the processor emits exactly the clip's tokens
    assert per_clip == placeholders
  for key, capture in captures.items():
    assert capture.hidden.shape[:2] == capture.mask.shape, key


def test_a_sentence_gives_the_same_representation_in_any_batch(adapter):
  """Right padding and content masks: pooled vectors of a batch equal each item run alone."""
  audios = clips()
  batched = adapter.run_speech(audios, 16000, "eng")
  alone = adapter.run_speech(audios[1:], 16000, "eng")
  text_b = adapter.run_text(TEXTS, "deu")
  text_a = adapter.run_text(TEXTS[2:], "deu")
  for key in batched:
    np.testing.assert_allclose(pool(batched[key].hidden, batched[key].mask)[1].numpy(),
                               pool(alone[key].hidden, alone[key].mask)[0].numpy(),
                               rtol=1e-4, atol=1e-5)
  for key in text_b:
    np.testing.assert_allclose(pool(text_b[key].hidden, text_b[key].mask)[2].numpy(),
                               pool(text_a[key].hidden, text_a[key].mask)[0].numpy(),
                               rtol=1e-4, atol=1e-5)


def test_extracts_text_and_speech_through_engine_extract(adapter, tmp_path):
  corpus = make_corpus(LANGUAGES, n=3)
  report = extract(adapter, corpus, tmp_path, batch_size=3, progress=False)
  st = open_store(tmp_path)
  per_language = sum(s.layers for s in adapter.sites())
  assert len(st.keys()) == len(LANGUAGES) * per_language == len(report.completed)
  assert st.metadata["model"]["family"] == adapter.family.name
  frame = corpus.to_pandas()
  rows = frame[frame.language == "swh"].sort_values("id")
  alone = adapter.run_text([rows.text.iloc[1]], "swh")
  np.testing.assert_allclose(st.load(Key("swh", "text", "llm", 3))[1],
                             pool(alone[("llm", 3)].hidden, alone[("llm", 3)].mask)[0].numpy(),
                             rtol=1e-4, atol=1e-5)
  assert st.load(Key("deu", "speech", "projector", 0)).shape == (3, 32)


@pytest.mark.parametrize("model", ("qwen2-audio-tiny", "qwen2.5-omni-tiny"))
def test_weights_in_a_local_directory_load_by_model_type(model, tmp_path):
  """save_pretrained, then the directory (whose name says nothing) is recognised by its
  config's model_type and loads with from_pretrained into the same activations."""
  a = get_adapter(model)
  a.model.save_pretrained(tmp_path)
  a.tokenizer.save_pretrained(tmp_path)
  a.processor.feature_extractor.save_pretrained(tmp_path)
  if model == "qwen2-audio-tiny":
    a.processor.save_pretrained(tmp_path)
  else:  # Omni's processor needs torchvision to save and load: its chat template rides along
    (tmp_path / "chat_template.jinja").write_text(a.processor.chat_template)
  assert family_of(str(tmp_path)) == a.family.name
  b = get_adapter(str(tmp_path))
  assert b.weights == str(tmp_path) and b.render({"type": "audio"}) == a.render({"type": "audio"})
  audios = clips()[:1]
  x, y = a.run_speech(audios, 16000, "eng"), b.run_speech(audios, 16000, "eng")
  for key in x:
    torch.testing.assert_close(x[key].hidden, y[key].hidden)


def test_unknown_model_type_is_refused_naming_the_model(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match=rf"model '{tmp_path}' has model type 'bert'"):
    family_of(str(tmp_path))
  with pytest.raises(ValueError, match=r"is a 'bert' model, not qwen2-audio"):
    from engine.models import qwen2_audio  # pylint: disable=import-outside-toplevel
    qwen2_audio.load(str(tmp_path))


def test_a_chat_template_without_audio_is_refused_naming_the_model():
  a = get_adapter("qwen2-audio-tiny")
  a.processor.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                               "{% for c in m['content'] %}{% if c['type'] == 'text' %}"
                               "{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}")
  with pytest.raises(ValueError, match=r"the chat template of qwen2-audio-tiny cannot hold audio"):
    a.run_speech(clips()[:1], 16000, "eng")
  a.processor.chat_template = None
  with pytest.raises(ValueError, match=r"model qwen2-audio-tiny has no chat template"):
    a.run_text(TEXTS[:1], "deu")
