"""Voxtral (Mistral AI 2025): a Whisper-large-v3-style encoder over 30 s windows (every clip
padded to a multiple of 30 s, no attention mask), four consecutive frames stacked into one
audio token (12.5 per second), a two-layer MLP projector, a Mistral/Llama LM.

Audio enters as `<s>[INST][BEGIN_AUDIO][AUDIO]...[/INST]`, 375 [AUDIO] tokens per 30 s window,
the instruct format mistral_common's Tekken tokenizer writes for a user turn holding one clip;
text as `<s>[INST]{sentence}[/INST]`. Real checkpoints ship a mistral_common tokenizer (not a
dependency here), so both prompts are assembled from the tokenizer's special tokens, and the
features come from VoxtralProcessor's own 30 s chunking. The model sees the padding silence of
the last window as audio tokens; only the tokens whose frames hold the clip count as content.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from engine.models import audio_lm

# Tekken's control tokens at their ids (the audio token is id 24, as VoxtralProcessor fixes it).
CONTROL = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
           "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
           "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
           "[TOOL_CONTENT]", "<SPECIAL_20>", "<SPECIAL_21>", "<SPECIAL_22>", "<SPECIAL_23>",
           "[AUDIO]", "[BEGIN_AUDIO]", "[TRANSCRIBE]")
TINY_VOCAB = 4096
MEL_BINS = 128
WINDOW_SAMPLES = 30 * audio_lm.SAMPLING_RATE
HOP = 160  # samples per mel frame
FRAMES_PER_WINDOW = 1500  # encoder frames per 30 s window (after the stride-2 conv)
TEXT_TEMPLATE = "<s>[INST]{}[/INST]"


@functools.lru_cache(maxsize=2)
def _tekken_like_json(vocab_size: int) -> str:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(CONTROL),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(audio_lm.corpus_sentences(), trainer=trainer)
  return tok.to_str()


def tiny_tokenizer(vocab_size: int = 4000):
  """A byte-level BPE over the bundled corpus with Tekken's control tokens at Tekken's ids, as a
  fast tokenizer that adds no special tokens itself (the prompt spells them out)."""
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
  tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tekken_like_json(vocab_size)),
                                unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                pad_token="<pad>")
  tok.add_special_tokens({"additional_special_tokens": list(CONTROL[3:])})
  return tok


def tiny_processor():
  """The real `VoxtralProcessor` over the offline tokenizer and a 128-bin Whisper extractor."""
  from transformers import VoxtralProcessor, WhisperFeatureExtractor  # pylint: disable=import-outside-toplevel
  return VoxtralProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=MEL_BINS),
                          tokenizer=tiny_tokenizer())


def build_tiny(seed: int = 0):
  from transformers import VoxtralConfig, VoxtralForConditionalGeneration  # pylint: disable=import-outside-toplevel
  processor = tiny_processor()
  config = VoxtralConfig(
      audio_config=dict(num_mel_bins=MEL_BINS, hidden_size=32, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4,
                        max_source_positions=FRAMES_PER_WINDOW),
      text_config=dict(model_type="llama", vocab_size=TINY_VOCAB, hidden_size=32,
                       intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=4096, head_dim=8),
      audio_token_id=processor.audio_token_id)
  model = audio_lm.seeded(lambda: VoxtralForConditionalGeneration(config), seed)
  return model, processor


def processor_from_pretrained(model: str):
  """The checkpoint's VoxtralProcessor; its Tekken tokenizer needs mistral_common."""
  from transformers import AutoProcessor  # pylint: disable=import-outside-toplevel
  try:
    return AutoProcessor.from_pretrained(model)
  except ImportError as e:
    raise ValueError(f"model {model} ships a mistral_common (Tekken) tokenizer: install "
                     f"mistral-common to load it ({str(e).strip().splitlines()[0]})") from None


def model_class():
  from transformers import VoxtralForConditionalGeneration  # pylint: disable=import-outside-toplevel
  return VoxtralForConditionalGeneration


def text_prompt(processor, conv) -> str:
  """Mistral's instruct format for one user turn holding the sentence."""
  (item,) = conv[0]["content"]
  if item["type"] != "text":
    raise ValueError("Voxtral's text prompt holds text only")
  return TEXT_TEMPLATE.format(item["text"])


def _stack(adapter) -> int:
  cfg = adapter.model.config.audio_config
  return cfg.intermediate_size // cfg.hidden_size  # frames folded into one audio token


def speech_inputs(adapter, audios) -> dict:
  """Features by VoxtralProcessor's own 30 s chunking; ids of `<s>[INST][BEGIN_AUDIO]`,
  one [AUDIO] per token of every window, `[/INST]`."""
  processor, stack = adapter.processor, _stack(adapter)
  kw = dict(type(processor).audio_kwargs)
  positions = kw.pop("max_source_positions")
  kw.pop("return_tensors", None)
  clips = [np.asarray(a, np.float32) for a in audios]
  features = processor._retrieve_input_features(clips, positions, **kw, return_tensors="pt")  # pylint: disable=protected-access
  tok = processor.tokenizer
  head = tok.convert_tokens_to_ids(["<s>", "[INST]", "[BEGIN_AUDIO]"])
  tail = tok.convert_tokens_to_ids(["[/INST]"])
  per_window = FRAMES_PER_WINDOW // stack
  rows = [head + [processor.audio_token_id] * per_window * math.ceil(len(c) / WINDOW_SAMPLES)
          + tail for c in clips]
  width = max(len(r) for r in rows)
  ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
  mask = torch.zeros((len(rows), width), dtype=torch.long)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = torch.tensor(r)
    mask[i, :len(r)] = 1
  return {"input_ids": ids, "attention_mask": mask, "input_features": features}


def layout(adapter, batch: dict, audios):
  """Each 30 s window keeps all its 1500 frames (and 1500 / stack tokens); content stops at the
  frame (token) holding the clip's last sample."""
  del batch
  stack = _stack(adapter)
  frames, tokens = [], []
  for i, a in enumerate(audios):
    n_frames = math.ceil(len(a) / (2 * HOP))
    n_tokens = math.ceil(n_frames / stack)
    for w in range(math.ceil(len(a) / WINDOW_SAMPLES)):
      lo = w * FRAMES_PER_WINDOW
      frames.append(audio_lm.Chunk(i, FRAMES_PER_WINDOW,
                                   min(max(n_frames - lo, 0), FRAMES_PER_WINDOW)))
      per = FRAMES_PER_WINDOW // stack
      tokens.append(audio_lm.Chunk(i, per, min(max(n_tokens - w * per, 0), per)))
  return frames, tokens


FAMILY = audio_lm.family_card("voxtral", ("voxtral-tiny",), ("voxtral",))
RECIPE = audio_lm.Recipe(family=FAMILY, build_tiny=build_tiny, model_class=model_class,
                         parts=audio_lm.projector_parts, body=lambda m: m.model, layout=layout,
                         speech_inputs=speech_inputs, text_prompt=text_prompt,
                         processor_from_pretrained=processor_from_pretrained)


def load(model: str, **kwargs) -> audio_lm.AudioLMAdapter:
  """'voxtral-tiny' (random, offline) or e.g. 'mistralai/Voxtral-Mini-3B-2507'."""
  return audio_lm.load(RECIPE, model, **kwargs)
