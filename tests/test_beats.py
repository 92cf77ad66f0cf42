"""BEATs: Kaldi fbank front end, encoder and converter against float64 NumPy re-computations."""
import dataclasses

import numpy as np
import pytest
import torch

from engine.models import beats, convert_beats
from tests import reference


@pytest.fixture(scope="module")
def tiny():
  return beats.build_tiny(seed=3)


def _wave(n, seed=0):
  rng = np.random.default_rng(seed)
  t = np.arange(n) / 16000
  return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


@pytest.mark.parametrize("samples, seed", [(400, 0), (3999, 1), (16000, 5)])
def test_fbank_matches_kaldi_recomputation(samples, seed):
  wave = _wave(samples, seed).astype(np.float64) * 2 ** 15
  ref = reference.kaldi_fbank(wave)
  exact = beats.kaldi_fbank(torch.tensor(wave)).numpy()  # float64 signal path
  assert exact.shape == ref.shape == (1 + (samples - 400) // 160, 128)
  np.testing.assert_allclose(exact, ref, rtol=0, atol=1e-4)  # float32 filters, as torchaudio's
  # BEATs' float32 path: FFT rounding is relative to the frame's energy, so it shows only in
  # the weakest bins (the lowest, which pre-emphasis attenuates most).
  error = np.abs(beats.kaldi_fbank(torch.tensor(wave, dtype=torch.float32)).numpy() - ref)
  assert np.median(error) < 1e-5 and error[:, 8:].max() < 1e-3 and error.max() < 2e-2


def test_fbank_of_silence_is_the_energy_floor():
  ours = beats.kaldi_fbank(torch.zeros(1600))
  np.testing.assert_allclose(ours.numpy(), np.log(np.finfo(np.float32).eps), rtol=1e-6)


def test_preprocess_scales_to_16_bit_and_normalises():
  """BEATs.preprocess: fbank of the waveform times 2**15, minus 15.41663, over 2 x 6.55582."""
  wave = torch.tensor(_wave(8000, seed=1))
  fbank = beats.preprocess(torch.stack([wave, 0.5 * wave]))
  for row, scale in enumerate((1.0, 0.5)):
    want = (beats.kaldi_fbank(wave * scale * 32768) - 15.41663) / (2 * 6.55582)
    torch.testing.assert_close(fbank[row], want, rtol=0, atol=1e-6)
  assert fbank.dtype == torch.float32 and fbank.shape == (2, 48, 128)


def test_short_wave_is_refused():
  with pytest.raises(ValueError, match="at least 400 samples"):
    beats.kaldi_fbank(torch.zeros(399))


def test_relative_buckets_follow_t5():
  buckets = beats.relative_buckets(90, num_buckets=32, max_distance=64).numpy()
  ref = np.array([[reference.t5_bucket(j - i, 32, 64) for j in range(90)] for i in range(90)])
  np.testing.assert_array_equal(buckets, ref)
  # every bucket but 16 (a positive offset of 0) is reached, and the far ones saturate
  assert buckets.max() == 31 and len(np.unique(buckets)) == 31


@pytest.mark.parametrize("variant", [{}, {"deep_norm": False, "layer_norm_first": True}])
def test_encoder_matches_float64_recomputation(tiny, variant):
  """The iter3+ deep-norm model, and BEATs' pre-LN variant."""
  model = beats.build_tiny(seed=3, **variant).double()
  rng = np.random.default_rng(0)
  fbank = rng.standard_normal((5 * 16 + 7, 128))  # 5 time patches and a remainder BEATs drops
  with torch.no_grad():
    states = model.from_fbank(torch.tensor(fbank)[None]).hidden_states
  params = {k: v.double().numpy() for k, v in model.state_dict().items()}
  ref = reference.beats_encoder(fbank, params, model.cfg)
  assert len(states) == len(ref) == model.cfg.encoder_layers + 1
  for layer, (ours, want) in enumerate(zip(states, ref)):
    assert ours.shape == (1, 40, 24)
    np.testing.assert_allclose(ours[0].numpy(), want, rtol=0, atol=1e-10, err_msg=f"layer {layer}")
  del tiny


def test_gate_and_bias_change_the_output(tiny):
  """The gated relative bias is live: zeroing its table or its gate weights moves the output."""
  fbank = torch.randn(1, 64, 128, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    base = tiny.from_fbank(fbank).last_hidden_state
    for name in ("encoder.layers.0.self_attn.relative_attention_bias.weight",
                 "encoder.layers.1.self_attn.grep_linear.weight"):
      model = beats.build_tiny(seed=3)
      model.get_parameter(name).zero_()
      assert (model.from_fbank(fbank).last_hidden_state - base).abs().max() > 1e-3, name


@pytest.mark.parametrize("samples", [2959, 16000, 48000 + 123])
def test_token_count(tiny, samples):
  with torch.no_grad():
    out = tiny(torch.tensor(_wave(samples))[None])
  assert out.last_hidden_state.shape[1] == beats.tokens_for(samples)
  assert beats.tokens_for(480000) == 1496  # 30 s: 2998 frames, 187 time patches x 8 bands


def test_padding_mask_pools_per_token(tiny):
  waves = torch.zeros(2, 16000)
  waves[0] = torch.tensor(_wave(16000))
  waves[1, :8000] = torch.tensor(_wave(8000))
  pad = torch.zeros(2, 16000, dtype=torch.bool)
  pad[1, 8000:] = True
  with torch.no_grad():
    out = tiny(waves, pad)
  # BEATs pools the sample mask onto the 98 fbank frames in runs of 16000 // 98 = 163 samples,
  # then onto the 48 tokens in runs of 2 frames: frames 50.. (163 * 50 >= 8000) are padding,
  # hence tokens 25..47.
  assert out.padding_mask.shape == (2, 48)
  assert not bool(out.padding_mask[0].any())
  assert out.padding_mask[1].tolist() == [False] * 25 + [True] * 23


def test_too_short_for_one_patch_is_refused(tiny):
  with pytest.raises(ValueError, match="at least 16 fbank frames"):
    tiny(torch.zeros(1, 2799))
  assert tiny(torch.zeros(1, 2800)).last_hidden_state.shape[1] == 8


# ---------------------------------------------------------------------------------------------
# Converter: a scaled-down checkpoint written in the released key layout.


def _released_keys(cfg):
  """The released checkpoint's tensor names and shapes, as BEATs' modules name them."""
  c, e, f, h, p = (cfg.encoder_embed_dim, cfg.embed_dim, cfg.encoder_ffn_embed_dim,
                   cfg.encoder_attention_heads, cfg.input_patch_size)
  keys = {"patch_embedding.weight": (e, 1, p, p), "layer_norm.weight": (e,), "layer_norm.bias": (e,),
          "post_extract_proj.weight": (c, e), "post_extract_proj.bias": (c,),
          "encoder.pos_conv.0.bias": (c,), "encoder.pos_conv.0.weight_g": (1, 1, cfg.conv_pos),
          "encoder.pos_conv.0.weight_v": (c, c // cfg.conv_pos_groups, cfg.conv_pos),
          "encoder.layer_norm.weight": (c,), "encoder.layer_norm.bias": (c,),
          "predictor.weight": (cfg.predictor_class, c), "predictor.bias": (cfg.predictor_class,)}
  for i in range(cfg.encoder_layers):
    a = f"encoder.layers.{i}."
    for proj in "qkv":
      keys[a + f"self_attn.{proj}_proj.weight"], keys[a + f"self_attn.{proj}_proj.bias"] = (c, c), (c,)
    keys.update({a + "self_attn.out_proj.weight": (c, c), a + "self_attn.out_proj.bias": (c,),
                 a + "self_attn.relative_attention_bias.weight": (cfg.num_buckets, h),
                 a + "self_attn.grep_linear.weight": (8, c // h), a + "self_attn.grep_linear.bias": (8,),
                 a + "self_attn.grep_a": (1, h, 1, 1),
                 a + "self_attn_layer_norm.weight": (c,), a + "self_attn_layer_norm.bias": (c,),
                 a + "fc1.weight": (f, c), a + "fc1.bias": (f,), a + "fc2.weight": (c, f),
                 a + "fc2.bias": (c,), a + "final_layer_norm.weight": (c,),
                 a + "final_layer_norm.bias": (c,)})
  return keys


@pytest.fixture()
def released_file(tmp_path):
  cfg = dict(beats.TINY_CFG, finetuned_model=True, predictor_class=5, dropout=0.1,
             layer_wise_gradient_decay_ratio=0.6, encoder_layerdrop=0.05)
  shapes = _released_keys(beats.BeatsConfig.from_cfg(cfg))
  gen = torch.Generator().manual_seed(0)
  state = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
  shared = state["encoder.layers.0.self_attn.relative_attention_bias.weight"]
  for i in range(1, cfg["encoder_layers"]):
    state[f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"] = shared.clone()
  path = tmp_path / "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt"
  torch.save({"cfg": cfg, "model": state}, path)
  return path, cfg, state


def test_converter_round_trips_the_released_layout(released_file):
  path, cfg, state = released_file
  model = convert_beats.load(path)
  assert model.cfg == beats.BeatsConfig.from_cfg(cfg)
  ours = model.state_dict()
  for key, value in state.items():
    if key.startswith("predictor."):
      continue
    name = key.replace("pos_conv.0.", "pos_conv.")
    name = name if name in ours else "encoder.layers.0.self_attn.relative_attention_bias.weight"
    torch.testing.assert_close(ours[name], value, rtol=0, atol=0, msg=key)
  back = convert_beats.released(model, predictor={k[len("predictor."):]: v for k, v in state.items()
                                                  if k.startswith("predictor.")})
  assert set(back["model"]) == set(state)
  for key, value in state.items():
    assert torch.equal(back["model"][key], value), key
  assert convert_beats.convert(path).dropped == ["predictor.weight", "predictor.bias"]
  again = beats.BeatsConfig.from_cfg(back["cfg"])
  assert again == model.cfg and dataclasses.asdict(again)["deep_norm"] is True


def test_converter_reads_parametrized_weight_norm(released_file):
  _, cfg, state = released_file
  state = dict(state)
  state["encoder.pos_conv.0.parametrizations.weight.original0"] = state.pop("encoder.pos_conv.0.weight_g")
  state["encoder.pos_conv.0.parametrizations.weight.original1"] = state.pop("encoder.pos_conv.0.weight_v")
  model = convert_beats.load({"cfg": cfg, "model": state})
  assert torch.equal(model.encoder.pos_conv.weight_g,
                     state["encoder.pos_conv.0.parametrizations.weight.original0"])


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({"encoder.extra.weight": torch.zeros(1)}), "outside the released layout"),
    (lambda s: s.pop("encoder.layers.1.fc2.bias"), "lacks 1 weights"),
    (lambda s: s["encoder.layers.1.self_attn.relative_attention_bias.weight"].add_(1),
     "differs from block 0"),
    (lambda s: s.update({"encoder.layers.0.fc1.bias": torch.zeros(3)}), "shape mismatch"),
])
def test_converter_refuses_a_bad_checkpoint(released_file, edit, message):
  _, cfg, state = released_file
  state = {k: v.clone() for k, v in state.items()}
  edit(state)
  with pytest.raises(ValueError, match=message):
    convert_beats.load({"cfg": cfg, "model": state})


def test_converter_refuses_a_bare_state_dict(released_file, tmp_path):
  _, _, state = released_file
  with pytest.raises(ValueError, match="'cfg' and 'model'"):
    convert_beats.load(state)
  with pytest.raises(ValueError, match="does not exist"):
    convert_beats.load(tmp_path / "missing.pt")
