"""The released BEATs checkpoint (`{'cfg': dict, 'model': state}`) -> `engine.models.beats.Beats`.

Key mapping (BEATs' fairseq-style modules -> ours): identical names except
  encoder.pos_conv.0.{weight_g,weight_v,bias}   -> encoder.pos_conv.{weight_g,weight_v,bias}
  (torch's newer parametrized weight norm, `encoder.pos_conv.0.parametrizations.weight.
  original{0,1}`, is read as g and v too)
  encoder.layers.N.self_attn.relative_attention_bias.weight, one per block in the file but one
  shared module in BEATs -> encoder.layers.0.self_attn.relative_attention_bias.weight
Dropped on purpose: the fine-tuned AudioSet classifier (`predictor.*`): SALMONN reads features.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import torch

from engine.models import common
from engine.models.beats import Beats, BeatsConfig

_POS = r"^encoder\.pos_conv\.0\."
_BIAS = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.relative_attention_bias\.weight$")
RENAMES = (
    (_POS + r"(weight_g|weight_v|bias)$", r"encoder.pos_conv.\1"),
    (_POS + r"parametrizations\.weight\.original0$", "encoder.pos_conv.weight_g"),
    (_POS + r"parametrizations\.weight\.original1$", "encoder.pos_conv.weight_v"),
)
DROPPED = (r"^predictor\.",)


@dataclasses.dataclass
class Converted:
  """The config, the renamed tensors for `Beats` and the checkpoint keys deliberately left out."""
  cfg: BeatsConfig
  state: dict[str, torch.Tensor]
  dropped: list[str]


def read(checkpoint) -> tuple[dict, dict[str, torch.Tensor]]:
  """A BEATs .pt path or its loaded dict -> (cfg dict, state dict)."""
  source = checkpoint
  checkpoint = common.load_checkpoint(checkpoint, what="BEATs")
  if "cfg" not in checkpoint or "model" not in checkpoint:
    raise ValueError(f"BEATs checkpoint {source!r} is not a dict with 'cfg' and 'model' keys "
                     "(the layout of BEATs_iter3_plus_AS2M*.pt)")
  cfg = checkpoint["cfg"]
  cfg = dict(cfg if isinstance(cfg, Mapping) else vars(cfg))
  return cfg, {k: v for k, v in checkpoint["model"].items() if isinstance(v, torch.Tensor)}


def convert(checkpoint) -> Converted:
  """Renames every key; a key neither mapped nor knowingly dropped is an error, and so is a
  per-block copy of the shared relative position bias that differs from block 0's."""
  cfg_dict, state = read(checkpoint)
  cfg = BeatsConfig.from_cfg(cfg_dict)
  out, dropped = {}, []
  shared = state.get("encoder.layers.0.self_attn.relative_attention_bias.weight")
  for key, value in state.items():
    if (m := _BIAS.match(key)) and m.group(1) != "0":
      if shared is None or not torch.equal(value, shared):
        raise ValueError(f"BEATs checkpoint: {key} differs from block 0's relative position "
                         "bias, which BEATs shares across blocks")
      continue
    if (new := common.renamed(key, RENAMES)) is not None:
      out[new] = value
    elif any(re.match(p, key) for p in DROPPED):
      dropped.append(key)
    else:
      out[key] = value
  return Converted(cfg, out, dropped)


def load(checkpoint, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32) -> Beats:
  """BEATs from a released checkpoint; every tensor must land on a parameter of its shape."""
  converted = convert(checkpoint)
  model = Beats(converted.cfg)
  expected = model.state_dict()
  unknown = sorted(set(converted.state) - set(expected))
  if unknown:
    raise ValueError(f"BEATs checkpoint: {len(unknown)} keys outside the released layout, "
                     f"e.g. {unknown[:5]}")
  missing = sorted(set(expected) - set(converted.state))
  if missing:
    raise ValueError(f"BEATs checkpoint lacks {len(missing)} weights, e.g. {missing[:5]}")
  bad = [k for k, v in converted.state.items() if tuple(v.shape) != tuple(expected[k].shape)]
  if bad:
    raise ValueError(f"BEATs checkpoint shape mismatch for {bad[:5]} (cfg {converted.cfg})")
  model.load_state_dict(converted.state)
  return model.to(device, dtype).eval()


def released(model: Beats, predictor: Mapping[str, torch.Tensor] | None = None) -> dict:
  """The inverse: `{'cfg', 'model'}` in the released layout (the bias copied into every block)."""
  state = {}
  for key, value in model.state_dict().items():
    if key.startswith("encoder.pos_conv."):
      key = key.replace("encoder.pos_conv.", "encoder.pos_conv.0.")
    state[key] = value.detach().clone()
  bias = state.get("encoder.layers.0.self_attn.relative_attention_bias.weight")
  if bias is not None:
    for i in range(1, model.cfg.encoder_layers):
      state[f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"] = bias.clone()
  state.update({f"predictor.{k}": v for k, v in (predictor or {}).items()})
  return {"cfg": dataclasses.asdict(model.cfg), "model": state}
