"""SeamlessM4T (v2, and v1) text and speech encoders seen as sites of activations.

The text encoder is an NLLB-style transformer over `__{lang}__ tokens </s>`. The speech encoder
is a w2v-BERT conformer over 160-dim stacked fbanks, followed by an intermediate FFN
(h + 0.5 * ffn(h)), the length adaptor (strided convolutions shortening the sequence by
`adaptor_stride`) and a closing layer norm. Activations are captured with forward hooks, so the
pre- and post-adaptor states are both available: transformers' own `hidden_states[-1]` of the
speech encoder is the post-adaptor output, not the last conformer layer.

Sites (key = (site, layer)):
* ('text_encoder', l), l = 0..L: 0 is the embedding output (scaled tokens + positions),
  1..L-1 the block outputs, L the final layer-normed output (transformers' `hidden_states`).
* ('speech_encoder', l), l = 0..L: 0 is the feature projection output as it enters the first
  conformer block, 1..L-1 the block outputs, L the conformer's closing layer norm output.
* ('intermediate_ffn', 0): the intermediate FFN's own output ffn(h), before the residual.
* ('pre_adaptor', 0): what enters the length adaptor, h + 0.5 * ffn(h).
* ('post_adaptor', j), j = 0..A-1: the output of adaptor layer j (A = 1 in released models).
* ('speech_output', 0): the closing layer norm after the adaptor = the encoder's
  `last_hidden_state`, what the text decoder attends to.
Masks: text masks cover every non-pad token, language token and </s> included (with
`pool_special_tokens=False`, the sentence's own tokens only); speech sites
before the adaptor use the feature extractor's frame mask; after it, the mask is shortened with
the adaptor's own length formula, layer by layer.

Padding: transformers' adaptor convolves padded frames into the last valid frames of a padded
batch, so a sentence's post-adaptor activations would depend on its batch-mates. By default
(`mask_adaptor_padding=True`) padded frames are zeroed after the adaptor's layer norms, exactly
as a sentence run alone sees zero padding (and, for configs with several adaptor layers, each
layer gets its own shortened mask, where transformers passes the input mask to all); set it
False for transformers' batched behaviour.

Models: 'seamless-tiny' / 'seamless-v1-tiny' (and '-mid') are randomly initialised configs of
the same transformers classes with an offline tokenizer (see `tiny_tokenizer`); anything else
is a hub id or local directory loaded with `from_pretrained`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch
from torch import nn

from engine.models import bpe, common
from engine.models.base import Capture, Family, Site
from engine.models.common import TorchAdapter, hooks, setter

TEXT_SITE = "text_encoder"
SPEECH_SITE = "speech_encoder"
FFN_SITE = "intermediate_ffn"
PRE_ADAPTOR_SITE = "pre_adaptor"
POST_ADAPTOR_SITE = "post_adaptor"
OUTPUT_SITE = "speech_output"
VERSIONS = {"seamless_m4t_v2": "v2", "seamless_m4t": "v1"}  # config.model_type -> version
FAMILY = Family(
    name="seamless", random=r"^seamless(?:-m4t)?(?:-(v1|v2))?-(tiny|mid)$",
    model_types=tuple(VERSIONS),
    site_map={"text": TEXT_SITE, "speech": (SPEECH_SITE, PRE_ADAPTOR_SITE, POST_ADAPTOR_SITE),
              "pre_adaptor": PRE_ADAPTOR_SITE, "post_adaptor": POST_ADAPTOR_SITE})

# SeamlessM4T's text languages: the language tokens of the offline tokenizer.
TEXT_LANGUAGES = (
    "afr", "amh", "arb", "ary", "arz", "asm", "azj", "bel", "ben", "bos", "bul", "cat", "ceb",
    "ces", "ckb", "cmn", "cmn_Hant", "cym", "dan", "deu", "ell", "eng", "est", "eus", "fin",
    "fra", "fuv", "gaz", "gle", "glg", "guj", "heb", "hin", "hrv", "hun", "hye", "ibo", "ind",
    "isl", "ita", "jav", "jpn", "kan", "kat", "kaz", "khk", "khm", "kir", "kor", "lao", "lit",
    "lug", "luo", "lvs", "mai", "mal", "mar", "mkd", "mlt", "mni", "mya", "nld", "nno", "nob",
    "npi", "nya", "ory", "pan", "pbt", "pes", "pol", "por", "ron", "rus", "sat", "slk", "slv",
    "sna", "snd", "som", "spa", "srp", "swe", "swh", "tam", "tel", "tgk", "tgl", "tha", "tur",
    "ukr", "urd", "uzn", "vie", "yor", "yue", "zlm", "zul")

TINY_VOCAB = 40960  # >= alphabet + merges + language tokens: fixed, so weights never depend on it


@dataclasses.dataclass(frozen=True)
class Preset:
  """Sizes of a randomly initialised config."""
  hidden: int
  text_layers: int
  speech_layers: int
  heads: int
  ffn: int
  conv_kernel: int


PRESETS = {
    "tiny": Preset(hidden=32, text_layers=3, speech_layers=3, heads=4, ffn=64, conv_kernel=7),
    "mid": Preset(hidden=512, text_layers=6, speech_layers=6, heads=8, ffn=2048, conv_kernel=31),
}


def random_spec(model: str) -> tuple[str, str] | None:
  """'seamless-tiny' -> ('v2', 'tiny'), 'seamless-v1-mid' -> ('v1', 'mid'); None for weights."""
  m = FAMILY.random_match(model)
  return None if m is None else (m.group(1) or "v2", m.group(2))


# ---------------------------------------------------------------------------------------------
# Offline tokenizer.


def tiny_tokenizer(languages: Sequence[str] = TEXT_LANGUAGES, merges: int = bpe.TINY_MERGES):
  """A real `SeamlessM4TTokenizer` built offline: SeamlessM4T's special tokens (<pad>=0,
  <unk>=1, <s>=2, </s>=3), `__{lang}__` language tokens, a character alphabet covering the
  scripts of all default languages, and BPE merges learned on the bundled corpus (a few tens
  of milliseconds, deterministic)."""
  from transformers import SeamlessM4TTokenizer  # pylint: disable=import-outside-toplevel
  vocab, pairs = bpe.bundled_bpe(merges)
  specials = [f"__{code}__" for code in languages]
  for token in specials:
    vocab.setdefault(token, len(vocab))
  if len(vocab) > TINY_VOCAB:
    raise ValueError(f"offline tokenizer has {len(vocab)} tokens, more than TINY_VOCAB={TINY_VOCAB}")
  src = languages[0] if languages else "eng"
  return SeamlessM4TTokenizer(vocab=vocab, merges=pairs, additional_special_tokens=specials,
                              src_lang=src, tgt_lang=src)


# ---------------------------------------------------------------------------------------------
# Adaptor masks.


def lengths_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
  """[B] lengths -> [B, width] bool mask of the first `lengths` positions."""
  return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def adaptor_mask(layer: nn.Module, mask: torch.Tensor, width: int) -> torch.Tensor:
  """The mask after one adaptor layer, from the layer's own length formula
  (floor((len + 2 * (kernel // 2) - kernel) / stride) + 1)."""
  lengths = layer._compute_sub_sample_lengths_from_attention_mask(mask.long())  # pylint: disable=protected-access
  return lengths_mask(lengths.to(torch.long), width)


# ---------------------------------------------------------------------------------------------
# The adapter.


class SeamlessAdapter(TorchAdapter):
  """A SeamlessM4T text encoder and speech encoder behind the adapter interface."""

  family = FAMILY

  def __init__(self, *, name: str, tokenizer, feature_extractor, text_encoder: nn.Module,
               speech_encoder: nn.Module, version: str = "v2", device: str = "cpu",
               dtype: str = "float32", weights: str = "", mask_adaptor_padding: bool = True,
               pool_special_tokens: bool = True):
    super().__init__(name=name, tokenizer=tokenizer, device=device, dtype=dtype, weights=weights)
    self.version = version
    self.features = feature_extractor
    self.text_encoder = self.place(text_encoder)
    self.speech_encoder = self.place(speech_encoder)
    self.mask_adaptor_padding = mask_adaptor_padding
    self.pool_special_tokens = pool_special_tokens
    self._languages: dict[str, bool] = {}

  # -- structure ------------------------------------------------------------------------------

  @property
  def adaptor_layers(self) -> list[nn.Module]:
    adapter = self.speech_encoder.adapter
    return [] if adapter is None else list(adapter.layers)

  @property
  def adaptor_stride(self) -> int:
    """How many frames the length adaptor folds into one (over all its layers)."""
    stride = 1
    for layer in self.adaptor_layers:
      stride *= layer.stride
    return stride

  def sites(self) -> list[Site]:
    sites = [Site(TEXT_SITE, "text", len(self.text_encoder.layers) + 1),
             Site(SPEECH_SITE, "speech", len(self.speech_encoder.encoder.layers) + 1),
             Site(FFN_SITE, "speech", 1)]
    if self.adaptor_layers:
      sites += [Site(PRE_ADAPTOR_SITE, "speech", 1),
                Site(POST_ADAPTOR_SITE, "speech", len(self.adaptor_layers))]
    return sites + [Site(OUTPUT_SITE, "speech", 1)]

  def language_token(self, language: str) -> str:
    return f"__{language}__"

  def supports_language(self, language: str, modality: str) -> bool:
    if modality == "speech":
      return True  # the speech encoder takes no language
    if modality != "text":
      raise ValueError(f"unknown modality {modality!r}; choose 'text' or 'speech'")
    if language not in self._languages:
      token = self.language_token(language)
      token_id = self.tokenizer.convert_tokens_to_ids(token)
      self._languages[language] = token_id is not None and token_id != self.tokenizer.unk_token_id
    return self._languages[language]

  # -- running --------------------------------------------------------------------------------

  def run_text(self, texts: Sequence[str], language: str) -> dict[tuple[str, int], Capture]:
    if not self.supports_language(language, "text"):
      raise ValueError(f"language {language!r} is not in the tokenizer of {self.name} (no "
                       f"{self.language_token(language)} token)")
    batch = self.tokenizer(list(texts), src_lang=language, padding=True, return_tensors="pt",
                           return_special_tokens_mask=True)
    ids = batch["input_ids"].to(self.device)
    attention = batch["attention_mask"].to(self.device).bool()
    mask = common.text_mask(batch, self.pool_special_tokens).to(self.device)
    enc = self.text_encoder
    layers = list(enc.layers)
    got: dict = {}
    outputs = {layer: setter(got, i + 1) for i, layer in enumerate(layers[:-1])}
    with torch.inference_mode(), hooks(outputs, {layers[0]: setter(got, 0)}):
      got[len(layers)] = enc(input_ids=ids, attention_mask=attention.long()).last_hidden_state
    return {(TEXT_SITE, l): Capture(got[l], mask) for l in range(len(layers) + 1)}

  def speech_features(self, audios: Sequence[np.ndarray],
                      sampling_rate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Waveforms -> ([B, T, 160] stacked fbanks, [B, T] frame mask) on the model's device."""
    return common.stacked_fbanks(self.features, audios, sampling_rate, model="SeamlessM4T",
                                 device=self.device, dtype=self.dtype)

  def run_speech(self, audios: Sequence[np.ndarray], sampling_rate: int,
                 language: str) -> dict[tuple[str, int], Capture]:
    del language  # the speech encoder is language-agnostic
    features, mask = self.speech_features(audios, sampling_rate)
    enc = self.speech_encoder
    layers = list(enc.encoder.layers)
    adaptors = self.adaptor_layers
    got: dict = {}
    stage_masks = [mask]  # stage j = input of adaptor layer j

    def after_adaptor(j):
      def fn(out):
        got[(POST_ADAPTOR_SITE, j)] = out
        stage_masks.append(adaptor_mask(adaptors[j], stage_masks[j], out.shape[1]))
      return fn

    def zero_padding(j):
      return lambda out: out.masked_fill(~stage_masks[j].unsqueeze(-1), 0.0)

    def own_mask(j):  # transformers gives every adaptor layer the unshortened input mask
      def fn(args, kwargs):
        mask_j = stage_masks[j].long()
        if len(args) > 1:
          return (args[0], mask_j, *args[2:]), kwargs
        return args, {**kwargs, "attention_mask": mask_j}
      return fn

    outputs = {layer: setter(got, (SPEECH_SITE, i + 1)) for i, layer in enumerate(layers[:-1])}
    outputs[enc.encoder.layer_norm] = setter(got, (SPEECH_SITE, len(layers)))
    outputs[enc.intermediate_ffn] = setter(got, (FFN_SITE, 0))
    inputs = {layers[0]: setter(got, (SPEECH_SITE, 0))}
    edits, input_edits = {}, {}
    if adaptors:
      inputs[enc.adapter] = setter(got, (PRE_ADAPTOR_SITE, 0))
      for j, layer in enumerate(adaptors):
        outputs[layer] = after_adaptor(j)
        if self.mask_adaptor_padding:
          edits[layer.residual_layer_norm] = zero_padding(j)
          edits[layer.self_attn_layer_norm] = zero_padding(j)
          if j > 0:
            input_edits[layer] = own_mask(j)
    with torch.inference_mode(), hooks(outputs, inputs, edits, input_edits):
      got[(OUTPUT_SITE, 0)] = enc(input_features=features,
                                  attention_mask=mask.long()).last_hidden_state
    masks = {SPEECH_SITE: mask, FFN_SITE: mask, PRE_ADAPTOR_SITE: mask,
             OUTPUT_SITE: stage_masks[-1]}
    return {key: Capture(hidden, stage_masks[key[1] + 1] if key[0] == POST_ADAPTOR_SITE
                         else masks[key[0]])
            for key, hidden in got.items()}

  def describe(self) -> dict:
    cfg = self.speech_encoder.config
    return {
        **super().describe(), "version": self.version,
        "adaptor": {"layers": len(self.adaptor_layers), "kernel": cfg.adaptor_kernel_size,
                    "stride": cfg.adaptor_stride} if self.adaptor_layers else None,
        "mask_adaptor_padding": self.mask_adaptor_padding,
        "pool_special_tokens": self.pool_special_tokens,
        "text_mask": ("every non-pad token: __lang__ tokens </s>" if self.pool_special_tokens
                      else "the sentence's tokens (not __lang__, </s>)"),
        "layer_convention": "0 = embeddings/feature projection, 1..L-1 = blocks, "
                            "L = final layer norm of the block stack",
        "sites": [dataclasses.asdict(s) for s in self.sites()],
    }


# ---------------------------------------------------------------------------------------------
# Random configs and loading.


def random_config(version: str = "v2", preset: str | Preset = "tiny",
                  vocab_size: int = TINY_VOCAB):
  """A full SeamlessM4T config of the given sizes; the speech-generation parts are minimal."""
  from transformers import SeamlessM4TConfig, SeamlessM4Tv2Config  # pylint: disable=import-outside-toplevel
  p = PRESETS[preset] if isinstance(preset, str) else preset
  kw = dict(
      vocab_size=vocab_size, hidden_size=p.hidden, max_position_embeddings=1024,
      encoder_layers=p.text_layers, encoder_ffn_dim=p.ffn, encoder_attention_heads=p.heads,
      decoder_layers=1, decoder_ffn_dim=p.ffn, decoder_attention_heads=p.heads,
      speech_encoder_layers=p.speech_layers, speech_encoder_attention_heads=p.heads,
      speech_encoder_intermediate_size=p.ffn, conv_depthwise_kernel_size=p.conv_kernel,
      dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, adaptor_dropout=0.0,
      encoder_layerdrop=0.0, decoder_layerdrop=0.0, speech_encoder_layerdrop=0.0,
      t2u_vocab_size=64, t2u_encoder_layers=1, t2u_decoder_layers=1, t2u_encoder_ffn_dim=64,
      t2u_decoder_ffn_dim=64, t2u_encoder_attention_heads=4, t2u_decoder_attention_heads=4,
      t2u_max_position_embeddings=64, unit_hifi_gan_vocab_size=64, unit_embed_dim=16,
      lang_embed_dim=8, spkr_embed_dim=8, upsample_initial_channel=16, upsample_rates=(2, 2),
      upsample_kernel_sizes=(4, 4), resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 3),),
      vocoder_num_langs=2, vocoder_num_spkrs=2)
  if version == "v1":
    return SeamlessM4TConfig(**kw)
  if version == "v2":
    return SeamlessM4Tv2Config(**kw, char_vocab_size=64, t2u_variance_predictor_embed_dim=p.hidden,
                               t2u_variance_predictor_hidden_dim=16)
  raise ValueError(f"unknown SeamlessM4T version {version!r}; choose 'v1' or 'v2'")


def model_class(version: str):
  from transformers import SeamlessM4TModel, SeamlessM4Tv2Model  # pylint: disable=import-outside-toplevel
  return {"v1": SeamlessM4TModel, "v2": SeamlessM4Tv2Model}[version]


def build_random(version: str = "v2", preset: str = "tiny", seed: int = 0) -> nn.Module:
  """A seeded, randomly initialised full SeamlessM4T model (same weights in every process)."""
  from transformers.utils import logging as hf_logging  # pylint: disable=import-outside-toplevel
  config = random_config(version, preset)
  verbosity = hf_logging.get_verbosity()
  hf_logging.set_verbosity_error()  # the unused decoder's layer_idx notice
  try:
    with torch.random.fork_rng(devices=[]):
      torch.manual_seed(seed)
      return model_class(version)(config).eval()
  finally:
    hf_logging.set_verbosity(verbosity)


def load(model: str, device: str = "cpu", dtype: str = "float32", *, seed: int = 0,
         text_languages: Sequence[str] | None = None,
         mask_adaptor_padding: bool = True, pool_special_tokens: bool = True) -> SeamlessAdapter:
  """'seamless-tiny', 'seamless-v1-tiny', 'seamless-mid' (random, offline), or real weights from
  a hub id or local directory (e.g. 'facebook/seamless-m4t-v2-large'), whose tokenizer and
  feature extractor come from the same place. text_languages: restrict the offline
  tokenizer's language tokens (random models only). pool_special_tokens: whether the text
  masks keep __lang__ and </s> (the default) or the sentence's own tokens only."""
  from transformers import SeamlessM4TFeatureExtractor  # pylint: disable=import-outside-toplevel
  spec = random_spec(model)
  if spec is not None:
    version, preset = spec
    full = build_random(version, preset, seed)
    tokenizer = tiny_tokenizer(tuple(text_languages or TEXT_LANGUAGES))
    features = SeamlessM4TFeatureExtractor()
    weights = f"random {version} {preset} seed={seed}"
  else:
    if text_languages is not None:
      raise ValueError("text_languages only applies to the random configs (e.g. 'seamless-tiny')")
    from transformers import AutoConfig, AutoProcessor  # pylint: disable=import-outside-toplevel
    try:
      config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot load SeamlessM4T model {model!r}: {e}") from None
    if config.model_type not in VERSIONS:
      raise ValueError(f"{model!r} is a {config.model_type!r} model, not SeamlessM4T")
    version = VERSIONS[config.model_type]
    full = model_class(version).from_pretrained(model, dtype=common.torch_dtype(dtype))
    processor = AutoProcessor.from_pretrained(model)
    tokenizer, features = processor.tokenizer, processor.feature_extractor
    weights = model
  adapter = SeamlessAdapter(
      name=model, tokenizer=tokenizer, feature_extractor=features,
      text_encoder=full.text_encoder, speech_encoder=full.speech_encoder, version=version,
      device=device, dtype=dtype, weights=weights, mask_adaptor_padding=mask_adaptor_padding,
      pool_special_tokens=pool_special_tokens)
  del full  # decoders, text-to-unit model and vocoder are not needed
  return adapter
