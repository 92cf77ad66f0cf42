"""The floor every torch adapter stands on: dtype, device, hooks, fbank input, tokenizer digest,
checkpoint state. Adapters import from here, never from one another."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from engine.models.base import Adapter, Capture

SAMPLING_RATE = 16000
MIN_SAMPLES = 560  # two fbank windows (400 samples, hop 160), stacked into one speech frame
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
  if isinstance(dtype, torch.dtype):
    return dtype
  if dtype not in DTYPES:
    raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
  return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
  """'auto' -> cuda when available, else cpu."""
  if str(device) == "auto":
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
  return torch.device(device)


def tokenizer_digest(tokenizer) -> str:
  """Names the vocabulary (and merges): stable while src_lang switches the post-processor."""
  backend = getattr(tokenizer, "_tokenizer", None)
  if backend is not None:
    model = json.loads(backend.to_str())["model"]
    blob = json.dumps([model.get("vocab"), model.get("merges")], sort_keys=True)
  else:
    blob = repr(sorted(tokenizer.get_vocab().items()))
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


class TorchAdapter(Adapter):
  """What every torch adapter holds: a name, a tokenizer, a device and dtype, its weights."""

  def __init__(self, *, name: str, tokenizer, device: str = "cpu", dtype: str = "float32",
               weights=None):
    self.name = name
    self.tokenizer = tokenizer
    self.device = resolve_device(device)
    self.dtype = torch_dtype(dtype)
    self.weights = weights

  def place(self, module: nn.Module) -> nn.Module:
    """A module on the adapter's device and dtype, in eval mode."""
    return module.to(self.device, self.dtype).eval()

  @functools.cached_property
  def _tokenizer_digest(self) -> str:
    return tokenizer_digest(self.tokenizer)  # ~1 s for a 256k vocabulary: once

  def describe(self) -> dict:
    """The fields every family reports; each adds its own."""
    return {"name": self.name, "family": self.family.name,
            "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device),
            "weights": self.weights,
            "tokenizer": {"class": type(self.tokenizer).__name__, "size": len(self.tokenizer),
                          "digest": self._tokenizer_digest}}


# ---------------------------------------------------------------------------------------------
# Speech input.


def stacked_fbanks(extractor, audios: Sequence[np.ndarray], sampling_rate: int, *, model: str,
                   device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
  """Waveforms -> ([B, T, 160] stacked fbanks, [B, T] frame mask) of a w2v-BERT frontend
  (`SeamlessM4TFeatureExtractor`) on the model's device."""
  if sampling_rate != SAMPLING_RATE:
    raise ValueError(f"{model} takes {SAMPLING_RATE} Hz speech; got {sampling_rate} Hz")
  short = [i for i, a in enumerate(audios) if len(a) < MIN_SAMPLES]
  if short:
    raise ValueError(f"speech items {short} of this batch ({[len(audios[i]) for i in short]} "
                     f"samples) are too short for one speech frame (at least {MIN_SAMPLES} "
                     "samples: two 25 ms fbank windows 10 ms apart)")
  batch = extractor([np.asarray(a, dtype=np.float32) for a in audios],
                    sampling_rate=sampling_rate, padding=True, return_tensors="pt",
                    return_attention_mask=True)
  mask = batch["attention_mask"].to(device).bool()
  return batch["input_features"].to(device, dtype), mask


def text_mask(batch: Mapping, pool_special_tokens: bool = True) -> torch.Tensor:
  """[B, T] positions a text representation pools, from a tokenizer batch made with
  `return_special_tokens_mask=True`: every non-pad token, or without the special ones
  (language tokens, </s>) only the sentence's own."""
  mask = batch["attention_mask"].bool()
  return mask if pool_special_tokens else mask & ~batch["special_tokens_mask"].bool()


def single(vectors: torch.Tensor) -> Capture:
  """[B, D] sentence vectors -> a T=1 capture with an all-True mask."""
  b = vectors.shape[0]
  return Capture(vectors.unsqueeze(1), torch.ones(b, 1, dtype=torch.bool, device=vectors.device))


# ---------------------------------------------------------------------------------------------
# Forward hooks.


def _first(output):
  return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def hooks(outputs: Mapping, inputs: Mapping | None = None, edits: Mapping | None = None,
          input_edits: Mapping | None = None) -> Iterator[None]:
  """Records module outputs ({module: fn(output)}) and inputs ({module: fn(hidden input)});
  `edits` ({module: fn(output) -> output}) replace a module's output, `input_edits`
  ({module: fn(args, kwargs) -> (args, kwargs)}) its arguments."""
  handles = []

  def on_output(fn):
    return lambda module, args, output: fn(_first(output))

  def on_input(fn):
    def hook(module, args, kwargs):
      fn(args[0] if args else kwargs["hidden_states"])
    return hook

  def on_edit(fn):
    return lambda module, args, output: fn(output)

  def on_input_edit(fn):
    return lambda module, args, kwargs: fn(args, kwargs)

  try:
    for module, fn in outputs.items():
      handles.append(module.register_forward_hook(on_output(fn)))
    for module, fn in (inputs or {}).items():
      handles.append(module.register_forward_pre_hook(on_input(fn), with_kwargs=True))
    for module, fn in (edits or {}).items():
      handles.append(module.register_forward_hook(on_edit(fn)))
    for module, fn in (input_edits or {}).items():
      handles.append(module.register_forward_pre_hook(on_input_edit(fn), with_kwargs=True))
    yield
  finally:
    for h in handles:
      h.remove()


def setter(store, key) -> Callable:
  """fn(value) storing value at store[key] (a hook target)."""
  def fn(value):
    store[key] = value
  return fn


@contextlib.contextmanager
def recording(modules: Sequence[nn.Module], entering: nn.Module | None = None) -> Iterator[list]:
  """Collects each module's (first) output during the forward pass inside the block; with
  `entering`, the list starts with that module's hidden-state input (e.g. the embedding
  output entering layer 0)."""
  lead = 0 if entering is None else 1
  out: list = [None] * (lead + len(modules))
  outputs = {m: setter(out, lead + i) for i, m in enumerate(modules)}
  inputs = {} if entering is None else {entering: setter(out, 0)}
  with hooks(outputs, inputs):
    yield out


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def renamed(key: str, rules) -> str | None:
  """`key` renamed by the first (pattern, replacement) rule whose pattern matches its start,
  or None when none does (the converters' one renaming rule)."""
  for pattern, repl in rules:
    if re.match(pattern, key):
      return re.sub(pattern, repl, key)
  return None


def model_state(checkpoint, *, what: str) -> dict[str, torch.Tensor]:
  """A checkpoint path, a {'model': state} dict or a state dict -> the flat state dict."""
  state = load_checkpoint(checkpoint, what=what)
  state = state.get("model", state)
  return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_checkpoint(checkpoint, *, what: str) -> Mapping:
  """A checkpoint path (or an already loaded mapping) -> the mapping it holds, tensors first:
  pickled objects are unpickled only when a tensors-only load fails."""
  source = checkpoint
  if isinstance(checkpoint, (str, os.PathLike)):
    path = os.fspath(checkpoint)
    if not os.path.exists(path):
      raise ValueError(f"{what} checkpoint file {path!r} does not exist")
    try:
      checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # pylint: disable=broad-except
      # fairseq checkpoints may pickle their config next to the tensors.
      try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
      except ModuleNotFoundError as e:
        raise ValueError(f"{what} checkpoint {path!r} pickles objects of module {e.name!r}, "
                         f"which is not installed: pip install {e.name}") from None
  if not isinstance(checkpoint, Mapping):
    raise ValueError(f"{what} checkpoint {source!r} is not a mapping of tensors")
  return checkpoint
