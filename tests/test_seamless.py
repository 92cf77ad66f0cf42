"""SeamlessM4T adapter on tiny random configs (v2 and v1): sites, masks, pooling, loading."""
import numpy as np
import pytest
import torch

from engine.models import get_adapter
from engine.models import bpe, common, seamless
from engine.models.pooling import POOLINGS, pool

SENTENCES = ["The sun is shining today.", "Hi!", "My brother lives in a small house near the river."]
VERSIONS = {"v2": "seamless-tiny", "v1": "seamless-v1-tiny"}

# One phrase per script of the default languages, with the marks that need care (Yoruba tones,
# Uzbek okina, Persian ZWNJ, Mongolian Cyrillic, Vietnamese stacked diacritics).
SCRIPTS = {
    "eng": "Hello, world!", "deu": "Grüße aus Köln", "fra": "Ça va très bien", "spa": "¿Qué tal, señor?",
    "por": "Não sei", "rus": "Привет, мир", "cmn": "你好，世界。", "jpn": "こんにちは、カタカナ",
    "kor": "안녕하세요", "arb": "مرحبا بالعالم", "hin": "नमस्ते दुनिया", "ben": "হ্যালো বিশ্ব",
    "tur": "Günaydın, İstanbul", "vie": "Xin chào thế giới", "pol": "Zażółć gęślą jaźń",
    "ind": "Selamat pagi", "ukr": "Добрий ранок, ґанок", "pes": "می‌خواهم بروم", "tha": "สวัสดีครับ",
    "ell": "Γειά σου κόσμε", "swh": "Habari ya asubuhi", "amh": "ሰላም ለዓለም", "yor": "Ẹ kú àárọ̀",
    "zul": "Sawubona", "khk": "Өглөөний мэнд, үү", "npi": "नमस्कार", "cym": "Bore da, ŵyr",
    "kat": "გამარჯობა", "tam": "வணக்கம்", "uzn": "Oʻzbekiston gʻalaba",
}


@pytest.fixture(scope="module", params=sorted(VERSIONS))
def adapter(request):
  return get_adapter(VERSIONS[request.param])


@pytest.fixture(scope="module")
def v2():
  return get_adapter("seamless-tiny")


@pytest.fixture(scope="module")
def waves():
  rng = np.random.default_rng(0)
  t = np.arange(40000) / 16000
  tone = 0.1 * np.sin(2 * np.pi * 220 * t)
  return [(tone[:n] + 0.05 * rng.standard_normal(n)).astype(np.float32)
          for n in (40000, 5600, 17000, 12345)]


def _assert_pooled_equal_single(adapter, batch_out, run_single, items, how="mean"):
  for i, item in enumerate(items):
    single = run_single(item)
    for key, cap in batch_out.items():
      got = pool(cap.hidden, cap.mask, how)[i]
      alone = pool(single[key].hidden, single[key].mask, how)[0]
      torch.testing.assert_close(got, alone, rtol=1e-4, atol=2e-5, msg=f"{key} row {i} {how}")


def test_sites_and_capture_keys(adapter, waves):
  sites = {s.name: (s.modality, s.layers) for s in adapter.sites()}
  assert sites == {"text_encoder": ("text", 4), "speech_encoder": ("speech", 4),
                   "intermediate_ffn": ("speech", 1), "pre_adaptor": ("speech", 1),
                   "post_adaptor": ("speech", 1), "speech_output": ("speech", 1)}
  text = adapter.run_text(SENTENCES, "eng")
  speech = adapter.run_speech(waves, 16000, "eng")
  for out, modality in ((text, "text"), (speech, "speech")):
    expected = {(n, l) for n, (m, k) in sites.items() if m == modality for l in range(k)}
    assert set(out) == expected
    for cap in out.values():
      assert cap.hidden.shape[:2] == cap.mask.shape and cap.mask.dtype == torch.bool
      assert cap.hidden.shape[0] == len(SENTENCES if modality == "text" else waves)


def test_text_sites_are_the_models_hidden_states(adapter):
  """Layer l of 'text_encoder' is transformers' hidden_states[l]; mean pooling over the mask
  equals the mean over each sentence's own tokens."""
  out = adapter.run_text(SENTENCES, "deu")
  batch = adapter.tokenizer(SENTENCES, src_lang="deu", padding=True, return_tensors="pt")
  with torch.inference_mode():
    ref = adapter.text_encoder(**batch, output_hidden_states=True)
  lengths = batch["attention_mask"].sum(1)
  assert len(ref.hidden_states) == len(out)
  for l, hidden in enumerate(ref.hidden_states):
    cap = out[("text_encoder", l)]
    torch.testing.assert_close(cap.hidden, hidden, rtol=0, atol=0)
    assert torch.equal(cap.mask, batch["attention_mask"].bool())
    direct = torch.stack([hidden[i, :n].mean(0) for i, n in enumerate(lengths)])
    torch.testing.assert_close(pool(cap.hidden, cap.mask), direct)
  ids = batch["input_ids"]
  assert int(ids[0, 0]) == adapter.tokenizer.convert_tokens_to_ids("__deu__")
  assert int(ids[0, lengths[0] - 1]) == adapter.tokenizer.eos_token_id


@pytest.mark.parametrize("how", POOLINGS)
def test_text_pooling_of_padded_batch_equals_single(adapter, how):
  out = adapter.run_text(SENTENCES, "eng")
  _assert_pooled_equal_single(adapter, out, lambda s: adapter.run_text([s], "eng"), SENTENCES, how)


@pytest.mark.parametrize("how", POOLINGS)
def test_speech_pooling_of_padded_batch_equals_single(adapter, waves, how):
  """With the adaptor's padding zeroed (default), every site of a sentence is independent of
  its batch-mates, post-adaptor included."""
  out = adapter.run_speech(waves, 16000, "eng")
  _assert_pooled_equal_single(adapter, out, lambda w: adapter.run_speech([w], 16000, "eng"),
                              waves, how)


def test_speech_sites_against_transformers_outputs(waves):
  """Without the padding fix the captures are exactly transformers' batched outputs:
  hidden_states[0..L-1] are the conformer sites, hidden_states[-1] is the post-adaptor output
  (so 'speech_encoder' layer L is *not* hidden_states[L])."""
  plain = get_adapter("seamless-tiny", mask_adaptor_padding=False)
  out = plain.run_speech(waves, 16000, "eng")
  features, mask = plain.speech_features(waves, 16000)
  with torch.inference_mode():
    ref = plain.speech_encoder(input_features=features, attention_mask=mask.long(),
                               output_hidden_states=True)
  L = len(plain.speech_encoder.encoder.layers)
  for l in range(L):
    torch.testing.assert_close(out[("speech_encoder", l)].hidden, ref.hidden_states[l], rtol=0, atol=0)
  torch.testing.assert_close(out[("speech_output", 0)].hidden, ref.hidden_states[-1], rtol=0, atol=0)
  torch.testing.assert_close(out[("speech_output", 0)].hidden, ref.last_hidden_state, rtol=0, atol=0)
  assert not torch.allclose(out[("speech_encoder", L)].hidden[:, :5],
                            out[("speech_output", 0)].hidden[:, :5])
  # pooled = mean over each utterance's own post-adaptor frames, lengths by the adaptor formula
  frames = mask.sum(1)
  post_len = torch.div(frames, 8, rounding_mode="floor") + 1  # kernel 8, stride 8, pad 4
  direct = torch.stack([ref.last_hidden_state[i, :n].mean(0) for i, n in enumerate(post_len)])
  torch.testing.assert_close(pool(out[("speech_output", 0)].hidden, out[("speech_output", 0)].mask),
                             direct)
  # and transformers' batched adaptor output does depend on padding, which the default removes
  fixed = get_adapter("seamless-tiny").run_speech(waves, 16000, "eng")
  short = int(np.argmin([len(w) for w in waves]))
  a = pool(out[("post_adaptor", 0)].hidden, out[("post_adaptor", 0)].mask)[short]
  b = pool(fixed[("post_adaptor", 0)].hidden, fixed[("post_adaptor", 0)].mask)[short]
  assert not torch.allclose(a, b, atol=1e-3)


def test_pre_and_post_adaptor_lengths_follow_the_stride(adapter, waves):
  out = adapter.run_speech(waves, 16000, "eng")
  pre, post = out[("pre_adaptor", 0)], out[("post_adaptor", 0)]
  stride = adapter.adaptor_stride
  kernel = adapter.speech_encoder.config.adaptor_kernel_size
  assert stride == 8
  frames = pre.mask.sum(1)
  expected = torch.div(frames + 2 * (kernel // 2) - kernel, stride, rounding_mode="floor") + 1
  assert torch.equal(post.mask.sum(1), expected)
  assert post.hidden.shape[1] == (pre.hidden.shape[1] + 2 * (stride // 2) - kernel) // stride + 1
  for row in range(len(waves)):  # masks are prefixes: valid frames first, then padding
    n = int(post.mask[row].sum())
    assert bool(post.mask[row, :n].all()) and not bool(post.mask[row, n:].any())
    assert abs(n - int(frames[row]) / stride) <= 1
  assert torch.equal(out[("speech_output", 0)].mask, post.mask)
  assert torch.equal(out[("intermediate_ffn", 0)].mask, pre.mask)
  # 25 ms fbank windows every 10 ms, two stacked per speech frame
  assert int(frames[0]) == (1 + (len(waves[0]) - 400) // 160) // 2


def test_pre_adaptor_is_ffn_residual(v2, waves):
  out = v2.run_speech(waves[:2], 16000, "eng")
  last = out[("speech_encoder", len(v2.speech_encoder.encoder.layers))].hidden
  torch.testing.assert_close(out[("pre_adaptor", 0)].hidden,
                             last + 0.5 * out[("intermediate_ffn", 0)].hidden)


def test_tokenizer_covers_every_default_script(v2):
  unk = v2.tokenizer.unk_token_id
  for language, text in SCRIPTS.items():
    assert v2.supports_language(language, "text"), language
    ids = v2.tokenizer(text, src_lang=language)["input_ids"]
    assert unk not in ids, (language, v2.tokenizer.convert_ids_to_tokens(ids))
    assert ids[0] == v2.tokenizer.convert_tokens_to_ids(f"__{language}__")
  for sentence in bpe.bundled_sentences():
    assert unk not in v2.tokenizer(sentence, src_lang="eng")["input_ids"], sentence


def test_tokenizer_is_deterministic_and_learns_merges():
  a, b = seamless.tiny_tokenizer(), seamless.tiny_tokenizer()
  assert common.tokenizer_digest(a) == common.tokenizer_digest(b)
  assert len(a) <= seamless.TINY_VOCAB
  pieces = a.tokenize("The sun is shining today.")
  assert len(pieces) < len("The sun is shining today.")  # subwords, not characters


def test_language_the_tokenizer_lacks_is_a_clear_error():
  restricted = get_adapter("seamless-tiny", text_languages=("eng", "deu"))
  assert restricted.supports_language("deu", "text")
  assert not restricted.supports_language("fra", "text")
  assert restricted.supports_language("fra", "speech")
  with pytest.raises(ValueError, match=r"'fra'.*__fra__"):
    restricted.run_text(["Bonjour"], "fra")


def test_too_short_audio_is_a_clear_error(v2):
  with pytest.raises(ValueError, match=r"items \[1\].*too short"):
    v2.run_speech([np.ones(16000, np.float32) * 0.1, np.ones(300, np.float32) * 0.1], 16000, "eng")
  with pytest.raises(ValueError, match="16000 Hz"):
    v2.run_speech([np.ones(16000, np.float32)], 8000, "eng")


def test_model_names():
  assert seamless.random_spec("seamless-tiny") == ("v2", "tiny")
  assert seamless.random_spec("seamless-v1-tiny") == ("v1", "tiny")
  assert seamless.random_spec("seamless-m4t-v2-mid") == ("v2", "mid")
  assert seamless.random_spec("facebook/seamless-m4t-v2-large") is None
  with pytest.raises(ValueError, match="float8"):
    get_adapter("seamless-tiny", dtype="float8")


def test_bfloat16_runs(waves):
  half = get_adapter("seamless-tiny", dtype="bfloat16")
  assert half.describe()["dtype"] == "bfloat16"
  out = half.run_speech(waves[:2], 16000, "eng")
  pooled = pool(out[("speech_output", 0)].hidden, out[("speech_output", 0)].mask)
  assert pooled.dtype == torch.float32 and bool(torch.isfinite(pooled).all())


def test_from_pretrained_directory_matches_random_model(tmp_path, v2, waves):
  """Real-weights path: a saved model directory (model, tokenizer, feature extractor) loads
  through from_pretrained + AutoProcessor and gives the same activations."""
  from transformers import SeamlessM4TFeatureExtractor, SeamlessM4TProcessor
  directory = tmp_path / "local-seamless"
  seamless.build_random("v2", "tiny", seed=0).save_pretrained(directory)
  SeamlessM4TProcessor(SeamlessM4TFeatureExtractor(), seamless.tiny_tokenizer()).save_pretrained(directory)
  loaded = seamless.load(str(directory))
  assert loaded.describe()["weights"] == str(directory) and loaded.version == "v2"
  for out_a, out_b in ((loaded.run_text(SENTENCES, "eng"), v2.run_text(SENTENCES, "eng")),
                       (loaded.run_speech(waves[:2], 16000, "eng"),
                        v2.run_speech(waves[:2], 16000, "eng"))):
    assert set(out_a) == set(out_b)
    for key in out_a:
      torch.testing.assert_close(out_a[key].hidden, out_b[key].hidden)
      assert torch.equal(out_a[key].mask, out_b[key].mask)


def test_not_a_seamless_directory(tmp_path):
  from transformers import BertConfig
  BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
             intermediate_size=8).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="not SeamlessM4T"):
    seamless.load(str(tmp_path))


def test_two_adaptor_layers_shorten_twice_and_stay_batch_independent(waves):
  """Released models have one adaptor layer; with two, each gets its own shortened mask."""
  from transformers import SeamlessM4TFeatureExtractor
  config = seamless.random_config("v2", "tiny")
  config.num_adapter_layers = 2
  torch.manual_seed(0)
  full = seamless.model_class("v2")(config).eval()
  two = seamless.SeamlessAdapter(name="two-adaptors", tokenizer=seamless.tiny_tokenizer(),
                                 feature_extractor=SeamlessM4TFeatureExtractor(),
                                 text_encoder=full.text_encoder, speech_encoder=full.speech_encoder)
  assert two.adaptor_stride == 64
  assert {s.name: s.layers for s in two.sites()}["post_adaptor"] == 2
  out = two.run_speech(waves, 16000, "eng")
  frames = out[("pre_adaptor", 0)].mask.sum(1)
  once = torch.div(frames, 8, rounding_mode="floor") + 1
  assert torch.equal(out[("post_adaptor", 0)].mask.sum(1), once)
  assert torch.equal(out[("post_adaptor", 1)].mask.sum(1), torch.div(once, 8, rounding_mode="floor") + 1)
  _assert_pooled_equal_single(two, out, lambda w: two.run_speech([w], 16000, "eng"), waves)
