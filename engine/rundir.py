"""A sweep's output directory: what is in it, its state file, and claiming it.

  sweep.json        the settings that decide its numbers (its identity) and facts learnt on the
                    way (the model's layer counts and site map, the plan's digest)
  activations/      the activation store (engine.store); with several processes each writes
                    its own, activations.p{index}/; a sweep over several models holds one
                    store per model, activations/{model slug}/ (.p{index} per process)
  checkpoints/      orbax checkpoints of the pair stage (engine.scoring)
  results.parquet   the tidy table (engine.table.COLUMNS), also as results.csv
  summary.json, plots/   written from the table by cli.report

A directory holding a sweep with another identity is refused, naming the settings that differ;
a sweep over several models may be resumed with more models (the stores it holds are reused, the
pairs rescored).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from engine.settings import SweepError

# 2: identity by flag name with --kernel_dtype, the site map recorded; 3: the adapter options
FORMAT_VERSION = 3
STATE_JSON = "sweep.json"
STORE_DIR = "activations"
CHECKPOINT_DIR = "checkpoints"
# Everything a sweep writes into its output directory (what --overwrite removes, nothing else).
OWNED = (STATE_JSON, STORE_DIR, CHECKPOINT_DIR, "results.parquet", "results.csv",
         "summary.json", "plots")


def read_state(out: Path) -> dict | None:
  path = out / STATE_JSON
  if not path.exists():
    return None
  try:
    state = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, json.JSONDecodeError) as e:
    raise SweepError(f"cannot read {path}: {e}; use --overwrite to start over") from None
  if state.get("format") != FORMAT_VERSION:
    raise SweepError(f"{path} has format {state.get('format')!r}, this engine writes "
                     f"{FORMAT_VERSION}; use a new --output_dir or --overwrite")
  return state


def write_state(out: Path, state: dict) -> None:
  path = out / STATE_JSON
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
  os.replace(tmp, path)


def store_name(index: int = 0, count: int = 1, slug: str | None = None) -> str:
  """The store process `index` of `count` writes: its own, so no two processes write one; in a
  sweep over several models, each model's own (`slug`, engine.keys.model_slug)."""
  base = STORE_DIR if slug is None else f"{STORE_DIR}/{slug}"
  return base if count == 1 else f"{base}.p{index}"


def _models(identity: dict) -> list[str]:
  return str(identity.get("model", "")).split(",")


def _adds_models(old: dict, new: dict) -> bool:
  """Whether `new` is the several-model sweep `old` with more models, all else equal."""
  rest = [k for k in new if k != "model" and old.get(k) != new[k]]
  before, after = _models(old), _models(new)
  return not rest and 1 < len(before) < len(after) and set(before) <= set(after)


def stores_in(out: Path) -> list[Path]:
  return [p for p in [out / STORE_DIR, *sorted(out.glob(f"{STORE_DIR}.p*"))] if p.is_dir()]


def _flag_value(value) -> str:
  if value is None:
    return "(unset)"
  if isinstance(value, list):
    if len(value) > 6:  # e.g. the 30 default languages
      return f"{','.join(map(str, value[:3]))},...,{value[-1]} ({len(value)})"
    return ",".join(map(str, value))
  return str(value)


def prepare(out: Path, identity: dict, *, overwrite: bool = False,
            vet: Callable[[], None] = lambda: None) -> dict:
  """Claims the output directory: new, same identity (resume), or refused; returns the state.

  vet: checks to pass before anything is discarded or created (those needing model code).
  """
  if out.exists() and not out.is_dir():
    raise SweepError(f"--output_dir={out} is a file, not a directory")
  if overwrite:
    vet()
    for path in [*(out / name for name in OWNED), *stores_in(out)]:
      if path.is_dir():
        shutil.rmtree(path)
      elif path.exists():
        path.unlink()
  state = read_state(out)
  if state is not None and not stores_in(out):
    state = None  # a sweep that stopped before extracting anything: nothing to keep
  if state is not None:
    old = state["identity"]
    if _adds_models(old, identity):
      vet()
      if (out / CHECKPOINT_DIR).exists():  # another plan's checkpoints: rescored
        shutil.rmtree(out / CHECKPOINT_DIR)
      state = {**state, "identity": identity, "plan": None}
      write_state(out, state)
      return state
    differ = [k for k in identity if old.get(k) != identity[k]]
    if differ:
      what = "; ".join(f"--{k}={_flag_value(old.get(k))} there, --{k}={_flag_value(identity[k])}"
                       " now" for k in differ)
      raise SweepError(f"{out} holds a sweep with other settings ({what}); use a new "
                       "--output_dir, or --overwrite to discard it")
    return state
  vet()
  out.mkdir(parents=True, exist_ok=True)
  state = {"format": FORMAT_VERSION, "identity": identity, "extracted": None, "plan": None}
  write_state(out, state)
  return state
