"""SALMONN converter on a synthetic checkpoint with the released key layout, scaled down.

Random tensors under SALMONN's names (LAVIS Q-Former, speech_query_tokens, speech_llama_proj,
ln_speech/ln_audio, peft LoRA on LlamaForCausalLM) are converted and loaded; the Q-Former,
windowing, projection and LoRA layers must compute what SALMONN computes from those tensors.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaModel, WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from engine.models import beats, convert_beats, convert_salmonn, salmonn, salmonn_modules

H, HEADS, INTER, QF_LAYERS = 16, 2, 32, 2
WHISPER, BEATS, LLM, LLM_LAYERS, RANK, ALPHA = 32, 8, 32, 3, 2, 8.0
QF = "speech_Qformer.bert."
LORA = "llama_model.base_model.model.model.layers.{}.self_attn.{}_proj.lora_{}{}.weight"


def _randn(*shape, gen):
  return 0.3 * torch.randn(*shape, generator=gen)


def _linear(sd, name, out_dim, in_dim, gen):
  sd[name + ".weight"] = _randn(out_dim, in_dim, gen=gen)
  sd[name + ".bias"] = _randn(out_dim, gen=gen)


def _norm(sd, name, dim, gen):
  sd[name + ".weight"] = 1 + _randn(dim, gen=gen)
  sd[name + ".bias"] = _randn(dim, gen=gen)


def synthetic_checkpoint(seed=0, adapter_name=".default"):
  gen = torch.Generator().manual_seed(seed)
  sd = {QF + "embeddings.position_ids": torch.arange(512)[None]}
  _norm(sd, QF + "embeddings.LayerNorm", H, gen)
  for l in range(QF_LAYERS):
    p = f"{QF}encoder.layer.{l}."
    for branch, kv_dim in (("attention", H), ("crossattention", WHISPER + BEATS)):
      _linear(sd, p + branch + ".self.query", H, H, gen)
      _linear(sd, p + branch + ".self.key", H, kv_dim, gen)
      _linear(sd, p + branch + ".self.value", H, kv_dim, gen)
      _linear(sd, p + branch + ".output.dense", H, H, gen)
      _norm(sd, p + branch + ".output.LayerNorm", H, gen)
    _linear(sd, p + "intermediate_query.dense", INTER, H, gen)
    _linear(sd, p + "output_query.dense", H, INTER, gen)
    _norm(sd, p + "output_query.LayerNorm", H, gen)
  _linear(sd, QF + "encoder.layer.0.intermediate.dense", INTER, H, gen)  # unused text branch
  sd["speech_query_tokens"] = _randn(1, 1, H, gen=gen)
  _linear(sd, "speech_llama_proj", LLM, H, gen)
  _norm(sd, "ln_speech", WHISPER, gen)
  _norm(sd, "ln_audio", BEATS, gen)
  for i in range(LLM_LAYERS):
    for target in "qv":
      sd[LORA.format(i, target, "A", adapter_name)] = _randn(RANK, LLM, gen=gen)
      sd[LORA.format(i, target, "B", adapter_name)] = _randn(LLM, RANK, gen=gen)
  sd["beats.patch_embedding.weight"] = torch.zeros(2, 2)
  return {"model": sd}


def _pretrained_parts(vocab):
  with torch.random.fork_rng(devices=[]):
    torch.manual_seed(7)
    whisper = WhisperEncoder(WhisperConfig(
        num_mel_bins=80, d_model=WHISPER, encoder_layers=1, encoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32,
        max_source_positions=1500, dropout=0.0))
    llama = LlamaModel(LlamaConfig(
        vocab_size=vocab, hidden_size=LLM, intermediate_size=48, num_hidden_layers=LLM_LAYERS,
        num_attention_heads=4, num_key_value_heads=4, bos_token_id=1, eos_token_id=2))
  return whisper.eval(), llama.eval()


@pytest.fixture(scope="module")
def tokenizer():
  return salmonn.tiny_llama_tokenizer()


@pytest.fixture(scope="module")
def converted(tokenizer):
  ckpt = synthetic_checkpoint()
  whisper, llama = _pretrained_parts(len(tokenizer))
  base_q = llama.layers[1].self_attn.q_proj.weight.detach().clone()
  model = convert_salmonn.build_model(ckpt, whisper, llama, qformer_heads=HEADS, lora_alpha=ALPHA)
  return ckpt["model"], model, base_q


def _ln(x, sd, prefix, eps):
  return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _lin(x, sd, prefix):
  return F.linear(x, sd[prefix + ".weight"], sd[prefix + ".bias"])


def _mha(x, kv, sd, prefix):
  b, t, _ = x.shape
  split = lambda y: y.view(b, -1, HEADS, H // HEADS).transpose(1, 2)
  q, k, v = split(_lin(x, sd, prefix + ".query")), split(_lin(kv, sd, prefix + ".key")), split(_lin(kv, sd, prefix + ".value"))
  att = (q @ k.transpose(-1, -2) / math.sqrt(H // HEADS)).softmax(-1)
  return (att @ v).transpose(1, 2).reshape(b, t, H)


def lavis_qformer(sd, windows):
  """SALMONN's BertModel call with query_embeds only: embeddings LayerNorm, then per layer
  self-attention, cross-attention to the window, and the query feed-forward branch."""
  x = _ln(sd["speech_query_tokens"].expand(windows.shape[0], -1, -1), sd, QF + "embeddings.LayerNorm", 1e-12)
  for l in range(QF_LAYERS):
    p = f"{QF}encoder.layer.{l}."
    for branch, kv in (("attention", x), ("crossattention", windows)):
      a = _mha(x, kv if branch == "crossattention" else x, sd, p + branch + ".self")
      x = _ln(_lin(a, sd, p + branch + ".output.dense") + x, sd, p + branch + ".output.LayerNorm", 1e-12)
    f = _lin(F.gelu(_lin(x, sd, p + "intermediate_query.dense")), sd, p + "output_query.dense")
    x = _ln(f + x, sd, p + "output_query.LayerNorm", 1e-12)
  return x


def test_shapes_are_read_from_the_checkpoint(converted):
  sd, _, _ = converted
  s = convert_salmonn.shapes(convert_salmonn.convert(sd).state)
  assert s == convert_salmonn.Shapes(
      qformer_layers=QF_LAYERS, qformer_hidden=H, qformer_intermediate=INTER,
      qformer_width=WHISPER + BEATS, num_query_tokens=1, whisper_dim=WHISPER, beats_dim=BEATS,
      llm_hidden=LLM, lora_rank=RANK, lora_targets=("q_proj", "v_proj"))


def test_weights_land_where_they_should(converted):
  sd, model, _ = converted
  layer = model.qformer.encoder.layer[1]
  pairs = {
      QF + "embeddings.LayerNorm.weight": model.qformer.layernorm.weight,
      QF + "encoder.layer.1.attention.self.query.weight": layer.attention.attention.query.weight,
      QF + "encoder.layer.1.crossattention.self.key.weight": layer.crossattention.attention.key.weight,
      QF + "encoder.layer.1.crossattention.output.LayerNorm.bias": layer.crossattention.output.LayerNorm.bias,
      QF + "encoder.layer.1.output_query.dense.weight": layer.output_query.dense.weight,
      "speech_query_tokens": model.query_tokens,
      "speech_llama_proj.weight": model.proj.weight,
      "ln_speech.bias": model.ln_speech.bias,
      "ln_audio.weight": model.ln_audio.weight,
      LORA.format(2, "v", "B", ".default"): model.llama.layers[2].self_attn.v_proj.lora_B["default"].weight,
      LORA.format(0, "q", "A", ".default"): model.llama.layers[0].self_attn.q_proj.lora_A["default"].weight,
  }
  for key, param in pairs.items():
    torch.testing.assert_close(param, sd[key], msg=key)
  report = convert_salmonn.convert(sd)
  assert sorted(report.dropped) == sorted([
      QF + "embeddings.position_ids", QF + "encoder.layer.0.intermediate.dense.weight",
      QF + "encoder.layer.0.intermediate.dense.bias", "beats.patch_embedding.weight"])


def test_qformer_matches_lavis_reference(converted):
  sd, model, _ = converted
  windows = torch.randn(5, 17, WHISPER + BEATS, generator=torch.Generator().manual_seed(1))
  queries = model.query_tokens.expand(5, -1, -1)
  with torch.no_grad():
    got = model.qformer(query_embeds=queries, encoder_hidden_states=windows).last_hidden_state
  torch.testing.assert_close(got, lavis_qformer(sd, windows), rtol=1e-4, atol=1e-4)


def _tiny_beats(seed=5):
  return beats.build_tiny(seed, encoder_embed_dim=BEATS, encoder_attention_heads=2,
                          encoder_ffn_embed_dim=16)


def test_auditory_path_matches_salmonn_reference(converted):
  sd, model, _ = converted
  features = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    stages = model.auditory(features, 17, 17)
    whisper_out, q_out, tokens = stages.whisper[-1], stages.qformer[-1], stages.tokens
    assert stages.beats is None
    speech = _ln(whisper_out, sd, "ln_speech", 1e-5)
    # No BEATs encoder: its channels are zero, as SALMONN pads past BEATs' output.
    both = torch.cat([speech, speech.new_zeros(2, 1500, BEATS)], dim=-1)
    wins = torch.stack([both[:, w * 17:(w + 1) * 17] for w in range(88)], dim=1)
    ref = lavis_qformer(sd, wins.reshape(2 * 88, 17, -1)).reshape(2, 88, H)
  torch.testing.assert_close(q_out, ref, rtol=1e-4, atol=1e-4)
  torch.testing.assert_close(tokens, _lin(ref, sd, "speech_llama_proj"), rtol=1e-4, atol=1e-4)


def test_auditory_path_with_beats_matches_salmonn_reference(converted):
  """SALMONN's _encode_auditory_feature: ln_audio on BEATs' output, zero-padded at the end to
  Whisper's 1500 frames, concatenated after ln_speech(Whisper) frame by frame, windowed."""
  sd, model, _ = converted
  gen = torch.Generator().manual_seed(4)
  features = torch.randn(2, 80, 3000, generator=gen)
  waves = [0.1 * torch.randn(16000, generator=gen), 0.1 * torch.randn(40000, generator=gen)]
  model.beats = _tiny_beats()
  try:
    with torch.no_grad():
      stages = model.auditory(features, 17, 17, waves)
      audio = [model.beats(w[None]).last_hidden_state[0] for w in waves]
  finally:
    model.beats = None
  assert [len(a) for a in audio] == [48, 8 * (248 // 16)]
  assert [[x.shape[0] for x in layer] for layer in stages.beats] == [[48, 120]] * 3
  speech = _ln(stages.whisper[-1], sd, "ln_speech", 1e-5)
  both = torch.zeros(2, 1500, WHISPER + BEATS)
  both[:, :, :WHISPER] = speech
  for i, a in enumerate(audio):
    both[i, :len(a), WHISPER:] = _ln(a, sd, "ln_audio", 1e-5)
  wins = torch.stack([both[:, w * 17:(w + 1) * 17] for w in range(88)], dim=1)
  with torch.no_grad():
    ref = lavis_qformer(sd, wins.reshape(2 * 88, 17, -1)).reshape(2, 88, H)
  torch.testing.assert_close(stages.qformer[-1], ref, rtol=1e-4, atol=1e-4)
  torch.testing.assert_close(stages.tokens, _lin(ref, sd, "speech_llama_proj"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("speech_len, audio_len", [(5, 3), (3, 5), (4, 4)])
def test_align_pads_the_shorter_stream(speech_len, audio_len):
  gen = torch.Generator().manual_seed(speech_len)
  speech, audio = torch.randn(2, speech_len, 3, generator=gen), torch.randn(2, audio_len, 2, generator=gen)
  got = salmonn_modules.align(speech, audio).numpy()
  n = max(speech_len, audio_len)
  want = np.zeros((2, n, 5))
  want[:, :speech_len, :3] = speech.numpy()
  want[:, :audio_len, 3:] = audio.numpy()
  np.testing.assert_array_equal(got, want)


def test_lora_layers_add_the_scaled_low_rank_update(converted):
  sd, model, base_q = converted
  x = torch.randn(2, 5, LLM, generator=torch.Generator().manual_seed(3))
  a, b = sd[LORA.format(1, "q", "A", ".default")], sd[LORA.format(1, "q", "B", ".default")]
  with torch.no_grad():
    got = model.llama.layers[1].self_attn.q_proj(x)
  want = F.linear(x, base_q) + (ALPHA / RANK) * (x @ a.T @ b.T)
  torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_older_peft_key_names_convert_identically():
  new = convert_salmonn.convert(synthetic_checkpoint(3)["model"]).state
  old = convert_salmonn.convert(synthetic_checkpoint(3, adapter_name="")["model"]).state
  assert set(new) == set(old)
  for key in new:
    torch.testing.assert_close(new[key], old[key])


def test_adapter_on_converted_model_with_and_without_beats(converted, tokenizer):
  _, model, _ = converted
  adapter = salmonn.SalmonnAdapter(name="synthetic", tokenizer=tokenizer,
                                   feature_extractor=WhisperFeatureExtractor(), model=model)
  wave = (0.1 * np.random.default_rng(0).standard_normal(9000)).astype(np.float32)
  assert "zeros" in adapter.describe()["beats"] and adapter.describe()["without_beats"]
  without = adapter.run_speech([wave], 16000, "eng")
  assert ("beats", 0) not in without
  model.beats = _tiny_beats()
  try:
    assert adapter.describe()["beats"].startswith("present")
    with_beats = adapter.run_speech([wave], 16000, "eng")
  finally:
    model.beats = None
  # 9000 samples, padded to 1 s: 48 BEATs tokens, inside windows 0..2 (frames 0..50)
  assert with_beats[("beats", 2)].hidden.shape == (1, 48, BEATS)
  assert with_beats[("beats", 2)].mask.sum().item() == 8 * math.ceil(9000 / 2560)
  q_with, q_without = with_beats[("qformer", 1)].hidden, without[("qformer", 1)].hidden
  assert not torch.allclose(q_with[:, :3], q_without[:, :3])
  torch.testing.assert_close(q_with[:, 3:], q_without[:, 3:])  # past BEATs' output: zeros again
  text = adapter.run_text(["Guten Tag."], "deu")
  assert text[("llm", LLM_LAYERS)].hidden.shape[-1] == LLM


def test_checkpoint_errors_name_the_keys(tmp_path):
  sd = synthetic_checkpoint()["model"]
  with pytest.raises(ValueError, match="speech_Qformer.extra"):
    convert_salmonn.convert({**sd, "speech_Qformer.extra.weight": torch.zeros(1)})
  whisper, llama = _pretrained_parts(64)
  lacking = {k: v for k, v in sd.items() if "layers.2.self_attn.v_proj.lora_B" not in k}
  with pytest.raises(ValueError, match="lora_B"):
    convert_salmonn.build_model(lacking, whisper, llama, qformer_heads=HEADS)
  path = tmp_path / "salmonn_v1.pth"
  torch.save({"model": sd}, path)
  assert set(convert_salmonn.model_state(str(path))) == set(sd)
  with pytest.raises(ValueError, match="nothing.pth"):
    convert_salmonn.model_state(str(tmp_path / "nothing.pth"))


# ---------------------------------------------------------------------------------------------
# Loading a released-layout directory: whisper/, vicuna/, the SALMONN .pth and BEATs_*.pt.


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
  from transformers import WhisperModel  # pylint: disable=import-outside-toplevel
  from tests.test_salmonn_tokenizer import train_llama_spm  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("salmonn")
  (root / "vicuna").mkdir()
  train_llama_spm(root / "vicuna", 400)
  whisper, llama = _pretrained_parts(400)
  with torch.random.fork_rng(devices=[]):
    torch.manual_seed(7)
    full = WhisperModel(whisper.config)
  full.save_pretrained(root / "whisper")
  WhisperFeatureExtractor().save_pretrained(root / "whisper")
  llama.save_pretrained(root / "vicuna")
  torch.save(synthetic_checkpoint(), root / "salmonn_v1.pth")
  beats_file = root / "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt"
  torch.save(convert_beats.released(_tiny_beats(seed=9)), beats_file)
  return root, beats_file


def _without(root, name, tmp_path):
  """A copy of the release directory (symlinks) lacking one file."""
  copy = tmp_path / "release"
  copy.mkdir()
  for entry in root.iterdir():
    if entry.name != name:
      (copy / entry.name).symlink_to(entry)
  return copy


def test_release_directory_loads_every_part(release_dir):
  root, beats_file = release_dir
  adapter = salmonn.load(str(root), qformer_heads=HEADS, lora_alpha=ALPHA)
  info = adapter.describe()
  assert info["beats"].startswith("present") and info["without_beats"] is False
  assert info["weights"]["beats"] == str(beats_file)
  assert info["weights"]["checkpoint"] == str(root / "salmonn_v1.pth")
  assert info["tokenizer"]["class"] == "SlowLlamaTokenizer" and info["tokenizer"]["size"] == 401
  expected = convert_beats.load(beats_file).state_dict()
  for key, value in adapter.model.beats.state_dict().items():
    assert torch.equal(value, expected[key]), key
  wave = (0.1 * np.random.default_rng(1).standard_normal(20000)).astype(np.float32)
  out = adapter.run_speech([wave], 16000, "eng")
  assert {k for k in out if k[0] == "beats"} == {("beats", l) for l in range(3)}
  assert {k for k in out if k[0] == "whisper"} == {("whisper", 0), ("whisper", 1)}


def test_beats_is_required_unless_waived(release_dir, tmp_path):
  root, beats_file = release_dir
  bare = _without(root, beats_file.name, tmp_path)
  with pytest.raises(ValueError, match="reads 8 BEATs channels .* no BEATs checkpoint was given"):
    salmonn.load(str(bare), qformer_heads=HEADS, lora_alpha=ALPHA)
  waived = salmonn.load(str(bare), qformer_heads=HEADS, lora_alpha=ALPHA, without_beats=True)
  info = waived.describe()
  assert info["without_beats"] is True and info["beats"].startswith("ABSENT")
  assert info["weights"]["beats"] is None and "beats" not in {s["name"] for s in info["sites"]}
  with pytest.raises(ValueError, match="not both"):
    salmonn.load(str(root), qformer_heads=HEADS, without_beats=True)


def test_beats_of_the_wrong_width_is_refused(release_dir, tmp_path):
  root, _ = release_dir
  wide = tmp_path / "BEATs_wide.pt"
  torch.save(convert_beats.released(beats.build_tiny(0)), wide)  # 24 channels, not 8
  with pytest.raises(ValueError, match="gives 24 channels"):
    salmonn.load(str(root), beats=str(wide), qformer_heads=HEADS)
