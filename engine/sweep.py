"""The sweep: a corpus through a model into an activation store, then a comparison plan scored.

One output directory holds everything a sweep needs to resume and everything it produces:

  sweep.json        the settings that decide its numbers (its identity) and facts learnt on the
                    way (the model's layer counts, the plan's digest)
  activations/      the activation store (engine.store), written by engine.extract; with
                    several processes each writes its own, activations.p{index}/
  checkpoints/      orbax checkpoints of the pair stage: per plan position a done flag, the
                    score and both kept ranks, saved after every chunk
  results.parquet   the tidy table (engine.analysis.COLUMNS), also as results.csv
  summary.json, plots/   written from the table by cli.report

Work is resumable at two grains: extraction by the store (complete representations and written
batches are skipped), pair scoring by chunk (engine.pairs.chunk_plan). Bases are computed once
per (site, layer) place for every representation there, kept while a pending chunk still needs
them, and joined for the chunk at hand (zero-padding ranks and features is exact).
A directory holding a sweep with another identity is refused, naming the settings that differ.

Several processes (hosts, after engine.distributed.initialize) run one sweep in a directory
they all see: each extracts a contiguous block of the languages into its own store and computes
the bases of its block; the bases are all-gathered, so every process holds a place's bases in
the global key order, the pairs are sharded over every process's devices, and every process
gets every score. Only process 0 writes sweep.json, the table, the summary and the figures; all
take part in orbax's checkpoints (process 0 writes them). Failures in a stage that processes run
on their own are exchanged, so every process stops with the same one-line error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from engine import pairs as pairs_lib

FORMAT_VERSION = 1
STATE_JSON = "sweep.json"
STORE_DIR = "activations"
CHECKPOINT_DIR = "checkpoints"
# Everything a sweep writes into its output directory (what --overwrite removes, nothing else).
OWNED = (STATE_JSON, STORE_DIR, CHECKPOINT_DIR, "results.parquet", "results.csv",
         "summary.json", "plots")
PAPER_PLAN = "paper"
SOURCES = ("bundled", "fleurs")
MODEL_DTYPES = ("float32", "bfloat16", "float16")
KERNEL_DTYPES = ("float32", "float64")
# Test hook: the process SIGKILLs itself after this many chunks are checkpointed (resume tests).
KILL_AFTER_ENV = "XMODAL_SWEEP_KILL_AFTER_CHUNKS"


class SweepError(ValueError):
  """A sweep that cannot run as asked; the message is one line naming the bad value."""


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """What to sweep. Fields in IDENTITY decide the numbers; the rest only how they are made."""
  model: str = "seamless-tiny"
  source: str = "bundled"
  split: str = "test"
  languages: tuple[str, ...] | None = None  # None: every bundled language / the 30 defaults
  modalities: tuple[str, ...] = ("text", "speech")
  sites: tuple[str, ...] | None = None  # None: every site of the model
  layers: tuple[int, ...] | None = None  # None: every layer; negative from the end
  pooling: str = "mean"
  model_dtype: str = "float32"
  max_sentences: int | None = None
  metric: str = "svcca"
  threshold: float = 0.99
  plan: str = PAPER_PLAN
  pivot: str | None = None
  dtype: str = "float32"
  # -- how, not what: may change between a run and its resumption
  output_dir: str = "runs/default"
  fleurs_dir: str | None = None
  cache_dir: str | None = None
  devices: str = "auto"
  device: str = "auto"
  batch_size: int = 16
  max_speech_seconds: float | None = None
  chunk_pairs: int | None = None
  progress: bool = True


IDENTITY = ("model", "source", "split", "languages", "modalities", "sites", "layers", "pooling",
            "model_dtype", "max_sentences", "metric", "threshold", "plan", "pivot", "dtype")


@dataclasses.dataclass
class SweepResult:
  output_dir: Path
  table: "object"  # pandas.DataFrame in engine.analysis.COLUMNS
  plan: list
  chunks: int
  chunks_run: int
  degenerate: int  # representations whose kept rank is >= RANK_WARNING_FRACTION * n
  n: int


# ----------------------------------------------------------------------------- settings


def normalize(config: SweepConfig) -> SweepConfig:
  """Checks the settings and spells them canonically (so 'en,de' and 'eng,deu' are one sweep).

  Needs no model code (torch), so a refused output directory is reported at once;
  `check_model` checks the rest before a new sweep is started.
  """
  from engine import data, svcca  # pylint: disable=import-outside-toplevel
  c = config
  _one_of("source", c.source, SOURCES)
  _one_of("metric", c.metric, svcca.METRICS)
  _one_of("model_dtype", c.model_dtype, MODEL_DTYPES)
  _one_of("dtype", c.dtype, KERNEL_DTYPES)
  if not 0.0 < c.threshold <= 1.0:
    raise SweepError(f"--threshold={c.threshold} is not in (0, 1]")
  languages = c.languages
  if languages is None and c.source == "bundled":
    languages = data.bundled_languages()
  languages = tuple(data.resolve_languages(languages))
  modalities = tuple(dict.fromkeys(c.modalities))
  for m in modalities:
    _one_of("modalities", m, pairs_lib.MODALITIES)
  if not modalities:
    raise SweepError("--modalities is empty; choose text, speech or both")
  for name, value in (("max_sentences", c.max_sentences), ("batch_size", c.batch_size),
                      ("chunk_pairs", c.chunk_pairs)):
    if value is not None and value < 1:
      raise SweepError(f"--{name}={value} must be at least 1")
  if c.plan != PAPER_PLAN:
    names = c.plan.split("+")
    bad = [n for n in names if n not in pairs_lib.PLANS]
    if bad:
      raise SweepError(f"--plan={c.plan}: unknown plan {bad[0]!r}; choose {PAPER_PLAN} or one of "
                       f"{', '.join(pairs_lib.PLANS)} (join several with '+')")
  pivot = data.resolve_language(c.pivot) if c.pivot else None
  if pivot is not None and pivot not in languages:
    raise SweepError(f"--pivot={c.pivot} is not among the sweep's languages")
  parse_devices(c.devices)
  return dataclasses.replace(
      c, languages=languages, modalities=modalities, pivot=pivot,
      sites=tuple(dict.fromkeys(c.sites)) if c.sites else None,
      layers=tuple(int(l) for l in dict.fromkeys(c.layers)) if c.layers else None,
      threshold=float(c.threshold))


def check_model(config: SweepConfig) -> None:
  """The settings only the model code can check: that the model names a family we have an
  adapter for, and the pooling."""
  from engine.models import family_of  # pylint: disable=import-outside-toplevel
  from engine.models.pooling import POOLINGS  # pylint: disable=import-outside-toplevel
  family_of(config.model)
  _one_of("pooling", config.pooling, POOLINGS)


def _one_of(name: str, value, choices) -> None:
  if value not in choices:
    raise SweepError(f"--{name}={value} is not one of {', '.join(map(str, choices))}")


def parse_devices(value: str) -> int | str:
  """'auto' (every accelerator, one CPU device), 'all', or a positive count."""
  if value in ("auto", "all"):
    return value
  try:
    count = int(value)
  except (TypeError, ValueError):
    raise SweepError(f"--devices={value} is not 'auto', 'all' or a device count") from None
  if count < 1:
    raise SweepError(f"--devices={value} must be at least 1")
  return count


def identity(config: SweepConfig) -> dict:
  return {name: _plain(getattr(config, name)) for name in IDENTITY}


def _plain(value):
  return list(value) if isinstance(value, tuple) else value


def _flag_value(value) -> str:
  if value is None:
    return "(unset)"
  if isinstance(value, list):
    if len(value) > 6:  # e.g. the 30 default languages
      return f"{','.join(map(str, value[:3]))},...,{value[-1]} ({len(value)})"
    return ",".join(map(str, value))
  return str(value)


# ----------------------------------------------------------------------------- output dir


def _read_state(out: Path) -> dict | None:
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


def _write_state(out: Path, state: dict) -> None:
  path = out / STATE_JSON
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
  os.replace(tmp, path)


def store_name(index: int = 0, count: int = 1) -> str:
  """The store process `index` of `count` writes: its own, so no two processes write one."""
  return STORE_DIR if count == 1 else f"{STORE_DIR}.p{index}"


def _stores_in(out: Path) -> list[Path]:
  return [p for p in [out / STORE_DIR, *sorted(out.glob(f"{STORE_DIR}.p*"))] if p.is_dir()]


def prepare(config: SweepConfig, *, overwrite: bool = False) -> dict:
  """Claims the output directory: new, same identity (resume), or refused; returns the state."""
  out = Path(config.output_dir)
  if out.exists() and not out.is_dir():
    raise SweepError(f"--output_dir={out} is a file, not a directory")
  if overwrite:
    check_model(config)
    for path in [*(out / name for name in OWNED), *_stores_in(out)]:
      if path.is_dir():
        shutil.rmtree(path)
      elif path.exists():
        path.unlink()
  state = _read_state(out)
  wanted = identity(config)
  if state is not None and not _stores_in(out):
    state = None  # a sweep that stopped before extracting anything: nothing to keep
  if state is not None:
    old = state["identity"]
    differ = [k for k in IDENTITY if old.get(k) != wanted[k]]
    if differ:
      what = "; ".join(f"--{k}={_flag_value(old.get(k))} there, --{k}={_flag_value(wanted[k])} "
                       "now" for k in differ)
      raise SweepError(f"{out} holds a sweep with other settings ({what}); use a new "
                       "--output_dir, or --overwrite to discard it")
    return state
  check_model(config)
  out.mkdir(parents=True, exist_ok=True)
  state = {"format": FORMAT_VERSION, "identity": wanted, "extracted": None, "plan": None}
  _write_state(out, state)
  return state


# ----------------------------------------------------------------------------- extraction


def load_corpus(config: SweepConfig, among: Sequence[int] | None = None):
  """The corpus of the sweep (audio only when speech is swept). among: FLEURS sentence ids
  the languages of other processes have too (engine.data.fleurs.eligible_ids)."""
  import datasets  # pylint: disable=import-outside-toplevel
  from engine import data  # pylint: disable=import-outside-toplevel
  datasets.disable_progress_bars()
  with_audio = "speech" in config.modalities
  if config.source == "fleurs":
    return data.load_fleurs(list(config.languages), split=config.split,
                            local_dir=config.fleurs_dir, max_sentences=config.max_sentences,
                            cache_dir=config.cache_dir, among=among)
  corpus = data.load_bundled(list(config.languages), with_audio=with_audio,
                             cache_dir=config.cache_dir)
  if config.max_sentences is not None:
    corpus = data.first_sentences(corpus, config.max_sentences)
  return corpus


def expected_keys(adapter, corpus, config: SweepConfig) -> list[pairs_lib.RepKey]:
  """The representations extraction will produce (speech only where the corpus has audio)."""
  from engine.data import corpus_info  # pylint: disable=import-outside-toplevel
  from engine.extract import select_sites  # pylint: disable=import-outside-toplevel
  selection = select_sites(adapter, config.modalities, config.sites, config.layers)
  no_speech = corpus_info(corpus).get("no_speech") or {}
  keys = []
  for language in config.languages:
    for modality, places in selection.items():
      if modality == "speech" and (language in no_speech or
                                   not adapter.supports_language(language, "speech")):
        continue
      keys += [pairs_lib.RepKey(language, modality, site, layer) for site, layer in places]
  return ordered(keys, config, [s.name for s in adapter.sites()])


def ordered(keys, config: SweepConfig, sites: Sequence[str]) -> list[pairs_lib.RepKey]:
  """Keys by language (as requested), modality, site (as the model lists them), layer: the plan,
  and so the table and the figures, follow the requested language order."""
  site_order = list(dict.fromkeys(sites))

  def rank(k):
    return (config.languages.index(k.language), config.modalities.index(k.modality),
            site_order.index(k.site) if k.site in site_order else len(site_order), k.site, k.layer)

  return sorted((pairs_lib.RepKey(*k) for k in keys), key=rank)


def _together(stage: Callable[[], object]) -> list:
  """Runs `stage` on every process; returns every process's (JSON-able) result, in order.

  If it fails on any process, every process raises: the failing one its own error, the others
  a SweepError naming that process and its error, so none waits forever in a collective.
  """
  from engine import distributed  # pylint: disable=import-outside-toplevel
  failure, error, result = None, None, None
  try:
    result = stage()
  except Exception as e:  # pylint: disable=broad-except  (re-raised below)
    failure, error = e, " ".join(str(e).split()) or type(e).__name__
  outcomes = distributed.allgather_json({"error": error, "result": result})
  if failure is not None:
    raise failure
  for index, outcome in enumerate(outcomes):
    if outcome["error"] is not None:
      raise SweepError(f"process {index}: {outcome['error']}")
  return [o["result"] for o in outcomes]


def _process() -> tuple[int, int]:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index(), jax.process_count()


def _languages_of(config: SweepConfig, index: int, count: int) -> tuple[str, ...]:
  """A process's languages: a contiguous block of the requested ones, in their order, so that
  its keys form one block of every (site, layer) place (`ordered` sorts by language first)."""
  from engine import distributed  # pylint: disable=import-outside-toplevel
  return tuple(distributed.share(config.languages, index, count))


def _common_fleurs_ids(config: SweepConfig, mine: Sequence[str]) -> list[int]:
  """The FLEURS sentences every process's languages have (the first --max_sentences): what one
  process loading all the languages would keep."""
  from engine.data import fleurs  # pylint: disable=import-outside-toplevel
  found = _together(lambda: fleurs.eligible_ids(list(mine), config.split,
                                                local_dir=config.fleurs_dir) if mine else None)
  ids = sorted(set.intersection(*(set(f) for f in found if f is not None)))
  return ids[:config.max_sentences] if config.max_sentences is not None else ids


def extract_stage(config: SweepConfig, state: dict, log: Callable[[str], None]
                  ) -> tuple[dict, str | None]:
  """Extracts into the store unless a previous run finished that.

  Prints the plan first (from the representations extraction is to produce). Returns the state
  and that plan's digest (None when extraction was already done). With several processes each
  extracts its block of the languages into its own store; the keys, the model's layer counts
  and skipped speech are exchanged, so every process makes the same plan.
  """
  from engine.extract import extract  # pylint: disable=import-outside-toplevel
  from engine.models import get_adapter  # pylint: disable=import-outside-toplevel
  from engine.models.seamless import resolve_device  # pylint: disable=import-outside-toplevel
  out = Path(config.output_dir)
  if state.get("extracted"):
    return state, None
  index, count = _process()
  mine = _languages_of(config, index, count)
  local = dataclasses.replace(config, languages=mine)
  work = {}
  among = _common_fleurs_ids(config, mine) if config.source == "fleurs" and count > 1 else None

  def begin():
    if not mine:  # more processes than languages
      return None
    work["corpus"] = corpus = load_corpus(local, among)
    work["adapter"] = adapter = get_adapter(config.model, device=str(resolve_device(config.device)),
                                            dtype=config.model_dtype)
    ids = corpus.select_columns(["id"]).to_pandas()["id"].unique()
    return {"keys": [list(k) for k in expected_keys(adapter, corpus, local)],
            "layer_counts": {s.name: s.layers for s in adapter.sites()},
            "rows": len(corpus), "ids": sorted(int(i) for i in ids)}

  shares = [s for s in _together(begin) if s is not None]
  if any(s["ids"] != shares[0]["ids"] for s in shares):
    raise SweepError("the processes loaded corpora with different sentence ids; do all hosts "
                     "run the same code on the same data?")
  layer_counts = shares[0]["layer_counts"]
  keys = ordered([k for s in shares for k in s["keys"]], config, list(layer_counts))
  planned = _make_plan(config, keys, layer_counts)
  log(describe_plan(config, planned, corpus_rows=sum(s["rows"] for s in shares)))

  def run():
    if not mine:
      return {}
    report = extract(work["adapter"], work["corpus"], out / store_name(index, count),
                     modalities=config.modalities, sites=config.sites, layers=config.layers,
                     pooling=config.pooling, batch_size=config.batch_size,
                     max_speech_seconds=config.max_speech_seconds, progress=config.progress)
    return report.skipped

  skipped = {k: v for s in _together(run) for k, v in s.items()}
  for key, reason in skipped.items():
    log(f"no {key.split('.')[1]} for {key.split('.')[0]}: {reason}")
  stores = {store_name(i, count): list(_languages_of(config, i, count)) for i in range(count)}
  state = {**state, "extracted": {"layer_counts": layer_counts, "sites": list(layer_counts),
                                  "skipped": skipped,
                                  "stores": {k: v for k, v in stores.items() if v}}}
  if index == 0:
    _write_state(out, state)
  return state, plan_digest(planned)


# ----------------------------------------------------------------------------- the plan


def plan_names(config: SweepConfig, keys: Sequence[pairs_lib.RepKey], site_map: dict) -> list[str]:
  """The plan's parts: 'paper' is the families the paper reports, as far as the keys allow."""
  if config.plan != PAPER_PLAN:
    return config.plan.split("+")
  modalities = {k.modality for k in keys}
  names = []
  if {"text", "speech"} <= modalities and site_map.get("text") and site_map.get("speech"):
    names.append("cross_modal")
  names += [f"cross_lingual_{m}" for m in ("text", "speech") if m in modalities]
  if site_map.get("pre_adaptor") and site_map.get("post_adaptor"):
    names.append("adaptor")
  return names


def _make_plan(config: SweepConfig, keys, layer_counts: dict) -> list:
  if not keys:
    raise SweepError("nothing to compare: the sweep has no representations")
  try:
    site_map = pairs_lib.default_site_map(config.model, keys)
    plan = pairs_lib.make_plan(plan_names(config, keys, site_map), keys, pivot=config.pivot,
                               site_map=site_map, layer_counts=layer_counts)
  except ValueError as e:
    raise SweepError(f"--plan={config.plan}: {e}") from None
  if not plan:
    raise SweepError(f"--plan={config.plan} has no pairs among the {len(keys)} representations "
                     "(more languages or both modalities needed?)")
  return plan


def plan_digest(plan: Sequence) -> str:
  h = hashlib.sha256()
  for a, b, family in plan:
    h.update(f"{a.name}|{b.name}|{family}\n".encode())
  return h.hexdigest()


def describe_plan(config: SweepConfig, plan: Sequence, *, heading: str = "plan",
                  corpus_rows: int | None = None, devices: str | None = None,
                  done: int = 0) -> str:
  """The plan in a few lines: representations, pairs per family, chunks."""
  chunks = pairs_lib.chunk_plan(plan, max_pairs=config.chunk_pairs)
  reps = pairs_lib.plan_keys(plan)
  lines = [f"{heading}: {config.model} on {config.source} ({len(config.languages)} languages"
           + (f", {corpus_rows} corpus rows" if corpus_rows is not None else "")
           + f"; {'+'.join(config.modalities)}), {config.metric} at threshold {config.threshold},"
           f" plan {config.plan}"]
  lines.append(f"  {len(reps)} representations, {len(plan)} pairs in {len(chunks)} chunks"
               + (f" on {devices}" if devices else "")
               + (f"; {done} pairs already scored" if done else ""))
  for family, count in pairs_lib.family_counts(plan).items():
    lines.append(f"    {family:<22}{count:>8}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- pair stage


def _mesh(devices: str):
  """The pair mesh --devices asks for; with several processes it spans all of them."""
  import jax  # pylint: disable=import-outside-toplevel
  from engine import sharding  # pylint: disable=import-outside-toplevel
  available = jax.devices()  # every process's devices
  wanted = parse_devices(devices)
  processes = jax.process_count()
  if wanted == "auto":
    if jax.default_backend() != "cpu":
      chosen = available
    else:  # one CPU device per process
      chosen = [next(d for d in available if d.process_index == p) for p in range(processes)]
  elif wanted == "all":
    chosen = available
  elif processes > 1:  # every process takes part in each pair program: the same count from each
    if wanted % processes:
      raise SweepError(f"--devices={devices}: with {processes} processes the count must be a "
                       f"multiple of {processes} (the same number of devices from each)")
    per = wanted // processes
    chosen = []
    for p in range(processes):
      own = [d for d in available if d.process_index == p]
      if per > len(own):
        raise SweepError(f"--devices={devices}: process {p} has only {len(own)} "
                         f"{jax.default_backend()} device(s)")
      chosen += own[:per]
  else:
    if wanted > len(available):
      raise SweepError(f"--devices={devices}: only {len(available)} "
                       f"{jax.default_backend()} device(s) are available")
    chosen = available[:wanted]
  mesh = sharding.pair_mesh(chosen)
  return mesh, sharding.device_summary(mesh)


def _checkpointer(out: Path):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)
  options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False)
  return ocp, ocp.CheckpointManager((out / CHECKPOINT_DIR).absolute(), options=options)


def _fresh(size: int) -> dict:
  return {"done": np.zeros(size, bool), "score": np.zeros(size, np.float64),
          "rank_a": np.zeros(size, np.int64), "rank_b": np.zeros(size, np.int64)}


def _join(parts: list):
  """Bases of several places as one Bases, zero-padding ranks (K) and features (d)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from engine.svcca import Bases  # pylint: disable=import-outside-toplevel
  if len(parts) == 1:
    return parts[0]
  k = max(b.u.shape[-1] for b in parts)
  u = jnp.concatenate([jnp.pad(b.u, ((0, 0), (0, 0), (0, k - b.u.shape[-1]))) for b in parts])
  s = jnp.concatenate([jnp.pad(b.s, ((0, 0), (0, k - b.s.shape[-1]))) for b in parts])
  w = None
  if parts[0].w is not None:
    d = max(b.w.shape[-1] for b in parts)
    w = jnp.concatenate([jnp.pad(b.w, ((0, 0), (0, k - b.w.shape[1]), (0, d - b.w.shape[2])))
                         for b in parts])
  return Bases(u=u, s=s, w=w, rank=jnp.concatenate([b.rank for b in parts]))


class _PlaceBases:
  """Bases per (site, layer) place, computed once, dropped when no pending chunk needs them.

  Each process computes the bases of its own keys (`where` maps them to their store) and the
  processes exchange them (engine.distributed.gather_bases); its keys are one block of every
  place, in process order, so the gathered bases are in the place's key order.
  """

  def __init__(self, where: dict, n: int, plan_keys, chunks, config: SweepConfig):
    self.where, self.n, self.config = where, n, config
    self.keys: dict[tuple, list] = {}
    for k in plan_keys:
      self.keys.setdefault((k.site, k.layer), []).append(k)
    self.uses: dict[tuple, int] = {}
    for chunk in chunks:
      for place in chunk.group:
        self.uses[place] = self.uses.get(place, 0) + 1
    self.cache: dict[tuple, object] = {}

  def bases(self, chunk):
    """(joined Bases, their keys in order) for a chunk."""
    parts, keys = [], []
    for place in chunk.group:
      if place not in self.cache:
        self.cache[place] = self._compute(self.keys[place])
      parts.append(self.cache[place])
      keys += self.keys[place]
    return _join(parts), keys

  def _compute(self, keys):
    from engine import distributed, svcca  # pylint: disable=import-outside-toplevel
    own = [k for k in keys if k in self.where]
    if own:
      local = svcca.compute_bases([self.where[k].load(k) for k in own], metric=self.config.metric,
                                  threshold=self.config.threshold, names=[k.name for k in own],
                                  dtype=self.config.dtype, warn=False)
    else:
      local = distributed.no_bases(self.n, self.config.dtype, self.config.metric == "pwcca")
    bases = distributed.gather_bases(local)
    if len(bases.rank) != len(keys):
      raise SweepError(f"the processes hold {len(bases.rank)} of the {len(keys)} representations "
                       f"at {keys[0].site} layer {keys[0].layer}")
    return bases

  def release(self, chunk) -> None:
    for place in chunk.group:
      self.uses[place] -= 1
      if self.uses[place] == 0:
        self.cache.pop(place, None)


def _progress(total: int, enabled: bool):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, unit="pair", desc="pairs", dynamic_ncols=True, disable=not enabled)


def score_stage(config: SweepConfig, state: dict, log: Callable[[str], None],
                planned: str | None = None, mesh=None) -> SweepResult:
  """Scores the plan chunk by chunk, checkpointing after each; writes the results table.

  The plan comes from the store's representations; it is printed unless it is the one printed
  before extraction (digest `planned`). mesh: (Mesh, description), default from --devices.
  """
  from engine import analysis, distributed, sharding, svcca  # pylint: disable=import-outside-toplevel
  out = Path(config.output_dir)
  if config.dtype == "float64":
    sharding.set_dtype("float64")
  index, count = _process()
  own = {}
  _together(lambda: own.update(zip(("where", "n"), _own_keys(config, state, index, count))))
  where, n = own["where"], own["n"]
  layer_counts = state["extracted"]["layer_counts"]
  held = distributed.allgather_json([[*k, n] for k in where])
  ns = {k[-1] for share in held for k in share}
  if len(ns) > 1:
    raise SweepError(f"the stores hold different numbers of sentences ({sorted(ns)}); use "
                     "--overwrite to extract again")
  keys = ordered([k[:-1] for share in held for k in share], config, state["extracted"]["sites"])
  n = ns.pop() if ns else n
  plan = _make_plan(config, keys, layer_counts)
  digest = plan_digest(plan)
  if state.get("plan") != digest:
    if state.get("plan") is not None and (out / CHECKPOINT_DIR).exists():
      log("the plan differs from the one checkpointed (the engine's plans changed?); "
          "scoring it afresh from the stored activations")
      if index == 0:
        shutil.rmtree(out / CHECKPOINT_DIR)
    state = {**state, "plan": digest}
    if index == 0:
      _write_state(out, state)
    distributed.barrier("sweep-plan")
  chunks = pairs_lib.chunk_plan(plan, max_pairs=config.chunk_pairs)
  ocp, manager = _checkpointer(out)
  sweep = _fresh(len(plan))
  if manager.latest_step() is not None:
    sweep = _restore(ocp, manager, sweep, out / CHECKPOINT_DIR)
  pending = [c for c in chunks if not sweep["done"][c.plan_index].all()]
  mesh, devices = mesh or _mesh(config.devices)
  done = int(sweep["done"].sum())
  if digest != planned:
    log(describe_plan(config, plan, heading="plan" if planned is None else "revised plan",
                      devices=devices, done=done))
  else:
    log(f"scoring {len(plan) - done} pairs in {len(pending)} chunks on {devices}")
  places = _PlaceBases(where, n, pairs_lib.plan_keys(plan), pending, config)
  kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
  step = int(manager.latest_step() or 0)
  with manager, _progress(sum(len(c.plan_index) for c in pending), config.progress) as bar:
    for run, chunk in enumerate(pending, start=1):
      bases, joined = places.bases(chunk)
      idx = pairs_lib.index_pairs([plan[p] for p in chunk.plan_index], joined)
      result = svcca.pair_scores(bases, idx, metric=config.metric, mesh=mesh)
      places.release(chunk)
      at = chunk.plan_index
      sweep["score"][at], sweep["done"][at] = result.score, True
      sweep["rank_a"][at], sweep["rank_b"][at] = result.rank_a, result.rank_b
      step += 1
      manager.save(step, args=ocp.args.StandardSave(sweep))
      manager.wait_until_finished()
      bar.update(len(at))
      if kill_after and run >= kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
  table = analysis.results_table(plan, sweep["score"], sweep["rank_a"], sweep["rank_b"],
                                 model=config.model, metric=config.metric, n=n)
  if index == 0:
    write_table(table, out)
  return SweepResult(out, table, plan, len(chunks), len(pending), degenerate(table), n)


def _own_keys(config: SweepConfig, state: dict, index: int, count: int) -> tuple[dict, int]:
  """This process's complete representations ({key: store}) and the stores' sentence count.

  Its keys are those of its block of the languages, read from whichever stores hold them (the
  processes that extracted them, with the same process count, this process itself).
  """
  from engine.store import open_store  # pylint: disable=import-outside-toplevel
  out = Path(config.output_dir)
  stores = state["extracted"].get("stores") or {STORE_DIR: list(config.languages)}
  mine = set(_languages_of(config, index, count))
  where, n = {}, 0
  for name, languages in stores.items():
    if mine & set(languages):
      store = open_store(out / name)
      n = store.n
      where.update((pairs_lib.RepKey(*k), store) for k in store.keys() if k.language in mine)
  return where, n


def _restore(ocp, manager, fresh: dict, where: Path) -> dict:
  """The latest checkpoint; a damaged one is a SweepError naming it and the way out."""
  step = manager.latest_step()
  path = where / str(step)
  redo = f"delete {where} and run again: the pairs are rescored from the stored activations"
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore(fresh))
    restored = {name: np.array(value) for name, value in restored.items()}
  except Exception as e:  # pylint: disable=broad-except
    # orbax and tensorstore raise ValueError, KeyError, JSONDecodeError, ... with the whole
    # tensorstore spec in the message
    reason = " ".join(str(e).split("[tensorstore_spec")[0].split())[:160]
    raise SweepError(f"checkpoint {path} is damaged ({type(e).__name__}: {reason}); "
                     f"{redo}") from None
  done = restored["done"]
  if (any(restored[k].shape != v.shape or restored[k].dtype != v.dtype for k, v in fresh.items())
      or not np.isfinite(restored["score"][done]).all()
      or (restored["rank_a"][done] < 1).any() or (restored["rank_b"][done] < 1).any()):
    raise SweepError(f"checkpoint {path} is damaged (inconsistent contents); {redo}")
  return restored


def degenerate(table) -> int:
  """Representations whose kept rank reaches svcca.RANK_WARNING_FRACTION of the sentences n,
  where CCA inflates scores (few sentences, as in quick runs on the bundled corpus)."""
  from engine import svcca  # pylint: disable=import-outside-toplevel
  ranks = {}
  for side in ("a", "b"):
    cols = [f"{c}_{side}" for c in ("language", "modality", "site", "layer")]
    ranks.update(zip(map(tuple, table[cols].to_numpy()), table[f"rank_{side}"]))
  n = int(table.n.iloc[0]) if len(table) else 0
  return sum(1 for rank in ranks.values() if rank >= svcca.RANK_WARNING_FRACTION * n)


def write_table(table, out: Path) -> None:
  """results.parquet and results.csv, each written to a temporary file then renamed."""
  from engine import analysis  # pylint: disable=import-outside-toplevel
  for name, write in ((analysis.RESULTS_PARQUET, table.to_parquet),
                      (analysis.RESULTS_CSV, table.to_csv)):
    tmp = out / f".{name}.tmp"
    write(tmp, index=False)
    os.replace(tmp, out / name)


def run_sweep(config: SweepConfig, *, overwrite: bool = False,
              log: Callable[[str], None] = print) -> SweepResult:
  """Extracts, plans and scores a sweep in config.output_dir (resuming what is there).

  With several processes every one calls this with the same config; only process 0 logs and
  claims the output directory, and the others follow its state.
  """
  config = normalize(config)
  mesh = _mesh(config.devices)  # before any work: a bad --devices fails at once
  index, _ = _process()
  if index != 0:
    log = lambda _: None  # pylint: disable=unnecessary-lambda-assignment
    config = dataclasses.replace(config, progress=False)
  state = _together(lambda: prepare(config, overwrite=overwrite) if index == 0 else None)[0]
  state, planned = extract_stage(config, state, log)
  return score_stage(config, state, log, planned, mesh)
