"""Single-modality encoders as first-class members: a speech encoder has speech sites only, a
text encoder text sites only, so the plans that need both modalities simply find no pairs.

Speech: Whisper's encoder, the wav2vec2 family (wav2vec 2.0, XLS-R, MMS: model type 'wav2vec2'),
w2v-BERT 2.0 ('wav2vec2-bert'). Text: the NLLB / M2M100 encoder ('m2m_100'), XLM-R
('xlm-roberta'). Layers follow transformers' `hidden_states` of the encoder (l=0 the
embeddings or feature projection, l=L the last layer's output as the model returns it).

Two family cards (engine/models/speech_encoders.py, text_encoders.py) share this machinery;
each site map has one side only, the other empty.

Sites (key = (site, layer)): ('speech_encoder', l) or ('text_encoder', l), l = 0..L.
Masks: speech, the frames that hold the clip (from the feature extractor's mask and the
encoder's own length formula); text, every non-pad token (language code and </s> included:
these encoders have no chat template).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from engine.models import audio_lm, bpe, common
from engine.models.base import Capture, Family, Site

TEXT_SITE = "text_encoder"
SPEECH_SITE = "speech_encoder"
SAMPLING_RATE = 16000
TINY_VOCAB = 37888  # embedding rows of the tiny text encoders (>= the offline tokenizers)


@dataclasses.dataclass(frozen=True)
class Encoder:
  """One encoder family: its modality, model types, tiny build and how to run it."""
  name: str
  modality: str
  model_types: tuple[str, ...]
  tiny_names: tuple[str, ...]
  build_tiny: Callable[[int], tuple[nn.Module, object]]  # seed -> (encoder, tokenizer | extractor)
  from_pretrained: Callable[[str, torch.dtype], tuple[nn.Module, object]]


class EncoderAdapter(common.TorchAdapter):
  """A text-only or speech-only encoder behind the adapter interface."""

  def __init__(self, *, name: str, family: Family, encoder: Encoder, model: nn.Module,
               preprocessor, device: str = "cpu", dtype: str = "float32", weights: str = ""):
    super().__init__(name=name, tokenizer=preprocessor if encoder.modality == "text" else None,
                     device=device, dtype=dtype, weights=weights)
    self.family = family
    self.encoder = encoder
    self.preprocessor = preprocessor
    self.model = self.place(model)

  @property
  def modality(self) -> str:
    return self.encoder.modality

  @property
  def site(self) -> str:
    return TEXT_SITE if self.modality == "text" else SPEECH_SITE

  @functools.cached_property
  def _layers(self) -> int:
    cfg = self.model.config
    return int(getattr(cfg, "encoder_layers", None) or cfg.num_hidden_layers) + 1

  def sites(self) -> list[Site]:
    return [Site(self.site, self.modality, self._layers)]

  def supports_language(self, language: str, modality: str) -> bool:
    if modality != self.modality:
      return False
    if self.encoder.name == "nllb":
      try:
        code = nllb_code(language)
      except ValueError:
        return False
      return self.preprocessor.convert_tokens_to_ids(code) != self.preprocessor.unk_token_id
    return True

  def _only(self, modality: str) -> None:
    if modality != self.modality:
      raise ValueError(f"model {self.name} is a {self.modality}-only encoder: it has no "
                       f"{modality} sites; extract it with modalities=['{self.modality}']")

  def _captures(self, hidden: Sequence[torch.Tensor], mask: torch.Tensor) -> dict:
    if len(hidden) != self._layers:
      raise ValueError(f"{self.name} returned {len(hidden)} hidden states, expected {self._layers}")
    return {(self.site, l): Capture(h, mask) for l, h in enumerate(hidden)}

  def run_text(self, texts: Sequence[str], language: str) -> dict[tuple[str, int], Capture]:
    self._only("text")
    tok = self.preprocessor
    if self.encoder.name == "nllb":
      tok.src_lang = nllb_code(language)
    batch = tok(list(texts), padding=True, return_tensors="pt")
    ids = batch["input_ids"].to(self.device)
    mask = batch["attention_mask"].to(self.device)
    with torch.inference_mode():
      out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return self._captures(out.hidden_states, mask.bool())

  def run_speech(self, audios: Sequence[np.ndarray], sampling_rate: int,
                 language: str) -> dict[tuple[str, int], Capture]:
    del language
    self._only("speech")
    if sampling_rate != SAMPLING_RATE:
      raise ValueError(f"{self.name} takes {SAMPLING_RATE} Hz speech; got {sampling_rate} Hz")
    clips = [np.asarray(a, np.float32) for a in audios]
    fe = self.preprocessor
    name = self.encoder.name
    if name == "whisper":
      batch = fe(clips, sampling_rate=SAMPLING_RATE, return_tensors="pt",
                 return_attention_mask=True)
      inputs = {"input_features": batch["input_features"].to(self.device, self.dtype)}
      lengths = (batch["attention_mask"].sum(-1) - 1) // 2 + 1
    elif name == "wav2vec2":
      batch = fe(clips, sampling_rate=SAMPLING_RATE, padding=True, return_tensors="pt",
                 return_attention_mask=True)
      inputs = {"input_values": batch["input_values"].to(self.device, self.dtype)}
      if fe.return_attention_mask:  # models with group-norm front-ends take none
        inputs["attention_mask"] = batch["attention_mask"].to(self.device)
      lengths = self.model._get_feat_extract_output_lengths(batch["attention_mask"].sum(-1))  # pylint: disable=protected-access
    else:  # w2v-BERT 2.0: stacked fbanks, one frame per two 10 ms windows
      batch = fe(clips, sampling_rate=SAMPLING_RATE, padding=True, return_tensors="pt",
                 return_attention_mask=True)
      inputs = {"input_features": batch["input_features"].to(self.device, self.dtype),
                "attention_mask": batch["attention_mask"].to(self.device)}
      lengths = batch["attention_mask"].sum(-1)
    with torch.inference_mode():
      out = self.model(**inputs, output_hidden_states=True)
    width = out.hidden_states[0].shape[1]
    mask = torch.arange(width, device=self.device)[None, :] < lengths.to(self.device)[:, None]
    return self._captures(out.hidden_states, mask)

  def describe(self) -> dict:
    tokenizer = None
    if self.modality == "text":
      tokenizer = {"class": type(self.tokenizer).__name__, "size": len(self.tokenizer),
                   "digest": self._tokenizer_digest}
    return {"name": self.name, "family": self.family.name, "encoder": self.encoder.name,
            "modality": self.modality, "weights": self.weights,
            "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device),
            "model_type": self.model.config.model_type, "tokenizer": tokenizer,
            "preprocessor": type(self.preprocessor).__name__,
            "layer_convention": "transformers hidden_states: 0 = embeddings / feature "
                                "projection, L = last layer output",
            "sites": [dataclasses.asdict(s) for s in self.sites()]}


# ---------------------------------------------------------------------------------------------
# Tiny builds and real weights, per family.


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
  return audio_lm.seeded(build, seed)


def nllb_code(language: str) -> str:
  """Canonical code -> NLLB code ('eng' -> 'eng_Latn'), from engine.data's language table."""
  from engine.data import languages  # pylint: disable=import-outside-toplevel
  return languages.get_language(language).nllb


def tiny_nllb_tokenizer():
  """A real `NllbTokenizer` built offline: NLLB's <s>=0, <pad>=1, </s>=2, <unk>=3 and
  language codes over the bundled-corpus BPE, NFKC-normalised as NLLB's SentencePiece is."""
  from transformers import NllbTokenizer  # pylint: disable=import-outside-toplevel
  tokens, merges = bpe.bundled_tokens()
  vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
  for token in tokens:
    vocab.setdefault(token, len(vocab))
  tokenizer = NllbTokenizer(vocab=vocab, merges=merges)
  tokenizer.backend_tokenizer.normalizer = bpe.normalizer()
  return tokenizer


def _whisper_tiny(seed: int):
  # pylint: disable=import-outside-toplevel
  from transformers import WhisperConfig, WhisperFeatureExtractor
  from transformers.models.whisper.modeling_whisper import WhisperEncoder
  cfg = WhisperConfig(num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                      encoder_ffn_dim=64, max_source_positions=1500)
  return _seeded(lambda: WhisperEncoder(cfg), seed), WhisperFeatureExtractor()


def _whisper_real(model: str, dtype):
  from transformers import WhisperFeatureExtractor, WhisperModel  # pylint: disable=import-outside-toplevel
  return (WhisperModel.from_pretrained(model, dtype=dtype).get_encoder(),
          WhisperFeatureExtractor.from_pretrained(model))


def _wav2vec2_tiny(seed: int):
  from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model  # pylint: disable=import-outside-toplevel
  cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
                       num_conv_pos_embedding_groups=4, feat_extract_norm="layer",
                       do_stable_layer_norm=True, mask_time_prob=0.0)  # XLS-R / MMS layout
  fe = Wav2Vec2FeatureExtractor(return_attention_mask=True, do_normalize=True)
  return _seeded(lambda: Wav2Vec2Model(cfg), seed), fe


def _wav2vec2_real(model: str, dtype):
  from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model  # pylint: disable=import-outside-toplevel
  return (Wav2Vec2Model.from_pretrained(model, dtype=dtype),
          Wav2Vec2FeatureExtractor.from_pretrained(model))


def _w2v_bert_tiny(seed: int):
  from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertModel  # pylint: disable=import-outside-toplevel
  cfg = Wav2Vec2BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, conv_depthwise_kernel_size=7,
                           add_adapter=False, mask_time_prob=0.0)
  return _seeded(lambda: Wav2Vec2BertModel(cfg), seed), SeamlessM4TFeatureExtractor()


def _w2v_bert_real(model: str, dtype):
  from transformers import AutoFeatureExtractor, Wav2Vec2BertModel  # pylint: disable=import-outside-toplevel
  return (Wav2Vec2BertModel.from_pretrained(model, dtype=dtype),
          AutoFeatureExtractor.from_pretrained(model))


def _nllb_tiny(seed: int):
  from transformers import M2M100Config, M2M100Model  # pylint: disable=import-outside-toplevel
  tok = tiny_nllb_tokenizer()
  cfg = M2M100Config(vocab_size=TINY_VOCAB, d_model=32, encoder_layers=2, decoder_layers=1,
                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                     decoder_ffn_dim=64, max_position_embeddings=1024,
                     pad_token_id=tok.pad_token_id,
                     scale_embedding=True)
  return _seeded(lambda: M2M100Model(cfg).get_encoder(), seed), tok


def _nllb_real(model: str, dtype):
  from transformers import AutoTokenizer, M2M100Model  # pylint: disable=import-outside-toplevel
  return (M2M100Model.from_pretrained(model, dtype=dtype).get_encoder(),
          AutoTokenizer.from_pretrained(model))


def tiny_xlmr_tokenizer():
  """A real `XLMRobertaTokenizer` built offline: XLM-R's <s>=0, <pad>=1, </s>=2, <unk>=3 and
  a unigram model over the bundled-corpus BPE pieces (equal scores: fewest pieces win)."""
  from transformers import XLMRobertaTokenizer  # pylint: disable=import-outside-toplevel
  tokens, _ = bpe.bundled_tokens()
  vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
  vocab += [(t, -1.0) for t in tokens if t not in {"<s>", "<pad>", "</s>", "<unk>"}]
  return XLMRobertaTokenizer(vocab=vocab)


def _xlmr_tiny(seed: int):
  from transformers import XLMRobertaConfig, XLMRobertaModel  # pylint: disable=import-outside-toplevel
  tok = tiny_xlmr_tokenizer()
  cfg = XLMRobertaConfig(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=514, pad_token_id=tok.pad_token_id)
  return _seeded(lambda: XLMRobertaModel(cfg, add_pooling_layer=False), seed), tok


def _xlmr_real(model: str, dtype):
  from transformers import AutoTokenizer, XLMRobertaModel  # pylint: disable=import-outside-toplevel
  return (XLMRobertaModel.from_pretrained(model, dtype=dtype, add_pooling_layer=False),
          AutoTokenizer.from_pretrained(model))


ENCODERS = {
    "whisper": Encoder("whisper", "speech", ("whisper",), ("whisper-encoder-tiny",),
                       _whisper_tiny, _whisper_real),
    "wav2vec2": Encoder("wav2vec2", "speech", ("wav2vec2",), ("wav2vec2-tiny",),
                        _wav2vec2_tiny, _wav2vec2_real),
    "w2v_bert": Encoder("w2v_bert", "speech", ("wav2vec2-bert",), ("w2v-bert-tiny",),
                        _w2v_bert_tiny, _w2v_bert_real),
    "nllb": Encoder("nllb", "text", ("m2m_100", "nllb-moe"), ("nllb-encoder-tiny",),
                    _nllb_tiny, _nllb_real),
    "xlm_roberta": Encoder("xlm_roberta", "text", ("xlm-roberta",), ("xlm-r-tiny",),
                           _xlmr_tiny, _xlmr_real),
}


def family_card(name: str, modality: str) -> Family:
  """The card of the speech-only or text-only encoders: their tiny names, their model types,
  and a site map whose other side is empty (no cross-modal pairs within one of them)."""
  members = [e for e in ENCODERS.values() if e.modality == modality]
  names = [n for e in members for n in e.tiny_names]
  site_map = {"text": TEXT_SITE, "speech": ()} if modality == "text" else \
      {"text": (), "speech": SPEECH_SITE}
  return audio_lm.TypedFamily(name=name, random="^(?:" + "|".join(names) + ")$",
                              site_map=site_map,
                              model_types=tuple(t for e in members for t in e.model_types))


def load(family: Family, model: str, device: str = "cpu", dtype: str = "float32", *,
         seed: int = 0) -> EncoderAdapter:
  """A tiny random encoder of the family or real weights from a hub id or local directory,
  told apart by the config's model_type."""
  members = [e for e in ENCODERS.values() if set(e.model_types) <= set(family.model_types)]
  tiny = {n: e for e in members for n in e.tiny_names}
  key = model.strip().lower()
  if key in tiny:
    enc = tiny[key]
    net, pre = enc.build_tiny(seed)
    return EncoderAdapter(name=model, family=family, encoder=enc, model=net, preprocessor=pre,
                          device=device, dtype=dtype, weights=f"random seed={seed}")
  from transformers import AutoConfig  # pylint: disable=import-outside-toplevel
  try:
    config = AutoConfig.from_pretrained(model)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot load model {model!r}: {e}") from None
  by_type = {t: e for e in members for t in e.model_types}
  if config.model_type not in by_type:
    raise ValueError(f"{model!r} is a {config.model_type!r} model, not one of the "
                     f"{family.name} (model types {sorted(by_type)})")
  enc = by_type[config.model_type]
  net, pre = enc.from_pretrained(model, common.torch_dtype(dtype))
  return EncoderAdapter(name=model, family=family, encoder=enc, model=net, preprocessor=pre,
                        device=device, dtype=dtype, weights=model)
