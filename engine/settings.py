"""What a sweep is asked to do, as typed data: five groups of settings, each field one flag.

  Corpus   which sentences, in which languages and modalities
  Model    which model, which of its sites and layers, pooled how, in which dtype, and the
           options of its family's adapter (SALMONN's weights and prompt, SONAR's speech
           encoders, whether special tokens are pooled)
  Scoring  which measure, which pairs, in which kernel precision
  Run      how the work is done: where, on which devices, in which batches
  Report   what summary.json adds to the table: the sentence bootstrap

The first three decide the numbers, so together they are the sweep's identity (recorded in
sweep.json: a directory holding another identity is refused); Run and Report may change
between a run and its resumption (Report changes summary.json, never the table). Each field
carries its flag's name, help and choices, from which the command-line flags are generated
(cli.corpus_flags, cli.sweep), so a setting is defined once.
`check` validates and spells everything canonically once, at the edge, before any work; it
needs no model code (torch), so a refused output directory is reported at once.
engine.model_checks checks the rest (the model family, the pooling, which adapter options
that family takes) when a new sweep starts.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

from engine import cross_model, data, pairs, svcca
from engine.keys import MODALITIES, model_slug
from engine.models import salmonn_options
from engine.uncertainty import MIN_LANGUAGES

PAPER_PLAN = "paper"
PLANS = pairs.PLANS + cross_model.PLANS
MODEL_DTYPES = ("float32", "bfloat16", "float16")
KERNEL_DTYPES = ("float32", "float64")
# The fewest sentences SVCCA can compare: centring one sentence leaves nothing.
MIN_SENTENCES = 2
MIN_PERMUTATIONS = 2  # a null's spread needs two draws
MIN_REPLICATES = 2  # a sentence interval needs two replicates
# The debiased HSIC estimator divides by n - 3.
MIN_SENTENCES_DEBIASED = 4


class SweepError(ValueError):
  """A sweep that cannot run as asked; the message is one line naming the bad value."""


def setting(default, help: str, *, flag: str | None = None, choices=None,
            aliases: tuple[str, ...] = (), families: tuple[str, ...] = (), kwarg: str = "",
            weights: bool = False):  # pylint: disable=redefined-builtin
  """A settings field: its default, and the flag that sets it (named like the field unless
  `flag` says otherwise). An adapter option names the model `families` whose `load` takes it,
  as keyword `kwarg`; `weights`: it locates real weights, which a random config has none of."""
  return dataclasses.field(default=default, metadata={
      "help": help, "flag": flag, "choices": choices, "aliases": aliases,
      "families": families, "kwarg": kwarg, "weights": weights})


def adapter_option(default, help: str, families: tuple[str, ...], kwarg: str, *,
                   choices=None, weights: bool = False):  # pylint: disable=redefined-builtin
  return setting(default, help, choices=choices, families=families, kwarg=kwarg,
                 weights=weights)


@dataclasses.dataclass(frozen=True)
class Corpus:
  source: str = setting("bundled", "Corpus: the bundled offline corpus (espeak-ng speech) or "
                        "FLEURS.", choices=data.SOURCES)
  split: str = setting("test", "FLEURS split.")
  languages: tuple[str, ...] | None = setting(
      None, "Language codes (any accepted alias); default: the 30 default languages, all of "
      "them bundled.")
  modalities: tuple[str, ...] = setting(("text", "speech"), "text, speech or both.")
  max_sentences: int | None = setting(None, "Keep only the first N sentence ids (quick runs; "
                                      f"at least {MIN_SENTENCES}).")


@dataclasses.dataclass(frozen=True)
class Model:
  name: str = setting("seamless-tiny", "seamless-tiny | seamless-v1-tiny | seamless-mid | "
                      "sonar-tiny | salmonn-tiny (random, offline), a hub id such as "
                      "facebook/seamless-m4t-v2-large, or a local directory; several, "
                      "comma-separated, compare models on the same sentences (plans "
                      "cross_model, cross_model_modal), each extracted into its own store.",
                      flag="model")
  sites: tuple[str, ...] | None = setting(None, "Sites to extract (default: every site of the "
                                          "model).")
  layers: tuple[int, ...] | None = setting(None, "Layer indices for every site, negative from "
                                           "the end (default: all).")
  pooling: str = setting("mean", "Pooling over valid positions: mean, max, first or last.")
  dtype: str = setting("float32", "Dtype the model runs in.", flag="model_dtype",
                       choices=MODEL_DTYPES)
  # Adapter options: each taken by the families it names (see engine.model_checks.adapter_options).
  pool_special_tokens: bool = adapter_option(
      True, "SONAR and SeamlessM4T text: pool the language token and </s> with the sentence's "
      "tokens (--nopool_special_tokens: the sentence's own tokens only).",
      ("sonar", "seamless"), "pool_special_tokens")
  salmonn_text_prompt: str = adapter_option(
      "template", "SALMONN text: inside the prompt template, in place of the speech "
      "(template), or BOS and the sentence alone (plain).", ("salmonn",), "text_prompt",
      choices=salmonn_options.TEXT_PROMPTS)
  salmonn_mask_scope: str = adapter_option(
      "sentence", "SALMONN: pool the sentence's own positions (sentence: its frames, windows and "
      "tokens) or every computed one (all: template, BOS, Whisper's padding too).",
      ("salmonn",), "mask_scope", choices=salmonn_options.MASK_SCOPES)
  salmonn_instruction: str = adapter_option(
      salmonn_options.DEFAULT_INSTRUCTION, "SALMONN: the instruction in its prompt template.",
      ("salmonn",), "instruction")
  salmonn_without_beats: bool = adapter_option(
      False, "SALMONN without BEATs: its Q-Former channels are fed zeros (marked in every "
      "output); salmonn-tiny then has no BEATs.", ("salmonn",), "without_beats")
  salmonn_beats: str | None = adapter_option(
      None, "SALMONN real weights: the BEATs checkpoint (BEATs_iter3_plus_AS2M_finetuned_on_"
      "AS2M_cpt2.pt; default: BEATs_*.pt in --model's directory).", ("salmonn",), "beats",
      weights=True)
  salmonn_whisper: str | None = adapter_option(
      None, "SALMONN real weights: Whisper's hub id or directory (default: the recipe's, or "
      "whisper/ in --model's directory).", ("salmonn",), "whisper", weights=True)
  salmonn_llm: str | None = adapter_option(
      None, "SALMONN real weights: the Vicuna LLM's hub id or directory (default: the recipe's, "
      "or vicuna/ in --model's directory).", ("salmonn",), "llm", weights=True)
  salmonn_checkpoint: str | None = adapter_option(
      None, "SALMONN real weights: the released checkpoint (.pth: Q-Former, projection, LoRA; "
      "default: the .pth in --model's directory).", ("salmonn",), "checkpoint", weights=True)
  sonar_speech_encoders: str | None = adapter_option(
      None, "SONAR real weights: directory of speech encoder checkpoints named as released "
      "(spenc.v3ap.deu.pt, spenc.eng.pt) or <lang>.pt (default: speech/ in --model's "
      "directory).", ("sonar",), "speech_encoders", weights=True)


@dataclasses.dataclass(frozen=True)
class Scoring:
  metric: str = setting("svcca", "Similarity measure.", choices=svcca.METRICS)
  threshold: float = setting(0.99, "Variance kept by the SVD step (svcca, pwcca).")
  plan: str = setting(PAPER_PLAN, "Comparison plan: 'paper' (cross-modal, cross-lingual text "
                      "and speech, and the adaptor where the model has one), or "
                      f"{', '.join(PLANS)}, joined with '+' (cross_model and cross_model_modal "
                      "compare the models of a several-model --model).")
  pivot: str | None = setting(None, "Cross-lingual pairs only against this language (e.g. "
                              "eng).")
  dtype: str = setting("float32", "Dtype of the SVD and pair kernel.", flag="kernel_dtype",
                       choices=KERNEL_DTYPES, aliases=("dtype",))
  permutations: int = setting(200, "Sentence permutations of each pair's null (engine.null): "
                              "null_mean, null_sd, z and p_value in the table; 0 turns it off.")
  null_seed: int = setting(0, "Seed of the permutations (one set shared by every pair).")
  svd_dims: int | None = setting(None, "Keep exactly K SVD directions of every representation "
                                 "(fixed-dimension SVCCA/PWCCA) instead of --threshold's.")


@dataclasses.dataclass(frozen=True)
class Run:
  output_dir: str = setting("runs/default", "Sweep directory (created, or resumed).")
  fleurs_dir: str | None = setting(None, "Local FLEURS copy (see engine.data.fleurs); without "
                                   "it FLEURS comes from the Hub.")
  cache_dir: str | None = setting(None, "Corpus / speech cache (default $XMODAL_CACHE or "
                                  "~/.cache/xmodal-svcca).")
  device: str = setting("auto", "Torch device of the model: cpu, cuda, cuda:1, ... or auto "
                        "(cuda when available).")
  batch_size: int = setting(16, "Most sentences per extraction batch.")
  max_speech_seconds: float | None = setting(None, "Cap on a speech batch's padded duration.")
  devices: str = setting("auto", "Devices of the pair mesh: a count, 'all', or 'auto' (every "
                         "accelerator; one CPU device per process). With several processes "
                         "the mesh spans them all, and a count is taken evenly from each.")
  chunk_pairs: int | None = setting(None, "Most pairs per checkpointed chunk (default: one "
                                    "chunk per pair of (site, layer) places).")
  checkpoint_seconds: float = setting(15.0, "Least seconds between pair-stage checkpoints (the "
                                      "first and last chunks are always saved; 0: after every "
                                      "chunk); a killed sweep redoes at most this much work.")
  progress: bool = setting(True, "Show progress bars.")


@dataclasses.dataclass(frozen=True)
class Report:
  bootstrap: int = setting(0, "Sentence-bootstrap replicates after the table is written: every "
                           "pair re-scored from the stored activations on resampled sentences, "
                           "bases recomputed per replicate, for intervals over sentences in "
                           f"summary.json; 0 turns it off, else at least {MIN_REPLICATES}.")
  bootstrap_seed: int = setting(0, "Seed of the sentence resamples of --bootstrap.")


@dataclasses.dataclass(frozen=True)
class Settings:
  corpus: Corpus = dataclasses.field(default_factory=Corpus)
  model: Model = dataclasses.field(default_factory=Model)
  scoring: Scoring = dataclasses.field(default_factory=Scoring)
  run: Run = dataclasses.field(default_factory=Run)
  report: Report = dataclasses.field(default_factory=Report)

  def replace(self, **values) -> "Settings":
    """These settings with some changed, by flag name: `s.replace(output_dir='/tmp/x')`."""
    groups = {g.name: getattr(self, g.name) for g in dataclasses.fields(self)}
    for name, value in values.items():
      group, field = _field_of(name)
      groups[group] = dataclasses.replace(groups[group], **{field: value})
    return Settings(**groups)


IDENTITY_GROUPS = ("corpus", "model", "scoring")


def flag_name(field: dataclasses.Field) -> str:
  return field.metadata.get("flag") or field.name


def flag_fields(group: type) -> list[tuple[str, dataclasses.Field, Any]]:
  """(flag name, field, its type) of a settings group, in definition order."""
  hints = typing.get_type_hints(group)
  return [(flag_name(f), f, hints[f.name]) for f in dataclasses.fields(group)]


_GROUPS = typing.get_type_hints(Settings)  # group name -> its dataclass
_FIELD_OF = {flag: (group, f.name) for group, cls in _GROUPS.items()
             for flag, f, _ in flag_fields(cls)}


def _field_of(flag: str) -> tuple[str, str]:
  if flag not in _FIELD_OF:
    raise SweepError(f"no setting named {flag!r}; settings: {', '.join(_FIELD_OF)}")
  return _FIELD_OF[flag]


def of(**values) -> Settings:
  """Settings from flag-named values (`of(languages=('eng',), metric='cka')`), others default."""
  return Settings().replace(**values)


def flag_values(settings: Settings) -> dict[str, Any]:
  """Every setting by its flag name."""
  return {flag: getattr(getattr(settings, group), field)
          for flag, (group, field) in _FIELD_OF.items()}


def identity(settings: Settings) -> dict:
  """The settings that decide the numbers (the Corpus, Model and Scoring groups), by flag name,
  as JSON values."""
  return {flag: _plain(getattr(getattr(settings, group), field))
          for flag, (group, field) in _FIELD_OF.items() if group in IDENTITY_GROUPS}


def _plain(value):
  return list(value) if isinstance(value, tuple) else value


# ----------------------------------------------------------------------------- checks


def one_of(name: str, value, choices) -> None:
  if value not in choices:
    raise SweepError(f"--{name}={value} is not one of {', '.join(map(str, choices))}")


def _at_least(name: str, value, least: int) -> None:
  if value is not None and value < least:
    raise SweepError(f"--{name}={value} must be at least {least}")


def parse_devices(value: str) -> int | str:
  """'auto' (every accelerator, one CPU device), 'all', or a positive count."""
  if value in ("auto", "all"):
    return value
  try:
    count = int(value)
  except (TypeError, ValueError):
    raise SweepError(f"--devices={value} is not 'auto', 'all' or a device count") from None
  _at_least("devices", count, 1)
  return count


def parse_layers(values) -> tuple[int, ...] | None:
  """Layer indices from the flag's strings (or ints), in order, without repeats."""
  if not values:
    return None
  try:
    return tuple(int(v) for v in dict.fromkeys(values))
  except (TypeError, ValueError):
    raise SweepError(f"--layers={','.join(map(str, values))}: layers must be integers"
                     ) from None


def check(settings: Settings) -> Settings:
  """The settings checked and spelled canonically (so 'en,de' and 'eng,deu' are one sweep)."""
  corpus = _check_corpus(settings.corpus)
  model = _check_model_fields(settings.model)
  scoring = _check_scoring(settings.scoring, corpus.languages)
  if corpus.max_sentences is not None:
    check_sentences(corpus.max_sentences, scoring)
  across = [n for n in scoring.plan.split("+") if n in cross_model.PLANS]
  if across and len(model_names(model)) < 2:
    raise SweepError(f"--plan={scoring.plan} compares models, but --model={model.name} names one; "
                     "give several, comma-separated (e.g. --model=seamless-tiny,sonar-tiny)")
  return Settings(corpus=corpus, model=model, scoring=scoring, run=_check_run(settings.run),
                  report=_check_report(settings.report, corpus.languages))


def _check_corpus(c: Corpus) -> Corpus:
  one_of("source", c.source, data.SOURCES)
  languages = c.languages
  if languages is None and c.source == "bundled":
    languages = data.bundled_languages()
  modalities = tuple(dict.fromkeys(c.modalities))
  if not modalities:
    raise SweepError("--modalities is empty; choose text, speech or both")
  for m in modalities:
    one_of("modalities", m, MODALITIES)
  _at_least("max_sentences", c.max_sentences, MIN_SENTENCES)
  try:
    languages = tuple(data.resolve_languages(languages))
  except ValueError as e:
    raise SweepError(f"--languages: {e}") from None
  return dataclasses.replace(c, languages=languages, modalities=modalities)


def model_names(model: Model) -> tuple[str, ...]:
  """The models a sweep compares: --model split at commas (one for a single-model sweep)."""
  return tuple(name.strip() for name in model.name.split(","))


def _check_model_fields(m: Model) -> Model:
  one_of("model_dtype", m.dtype, MODEL_DTYPES)
  for name, field, _ in flag_fields(Model):
    if field.metadata["choices"]:
      one_of(name, getattr(m, field.name), field.metadata["choices"])
  names = model_names(m)
  if "" in names:
    raise SweepError(f"--model={m.name} has an empty name; give models separated by single commas")
  slugs = [model_slug(n) for n in names]
  for i, slug in enumerate(slugs):
    if slug in slugs[:i]:
      raise SweepError(f"--model={m.name} names {names[i]} twice (or two models with one file "
                       f"name, {slug}); give each model once")
  return dataclasses.replace(m, name=",".join(names),
                             sites=tuple(dict.fromkeys(m.sites)) if m.sites else None,
                             layers=parse_layers(m.layers))


def _check_scoring(s: Scoring, languages: tuple[str, ...]) -> Scoring:
  one_of("metric", s.metric, svcca.METRICS)
  one_of("kernel_dtype", s.dtype, KERNEL_DTYPES)
  if not 0.0 < s.threshold <= 1.0:
    raise SweepError(f"--threshold={s.threshold} is not in (0, 1]")
  if s.plan != PAPER_PLAN:
    bad = [n for n in s.plan.split("+") if n not in PLANS]
    if bad:
      raise SweepError(f"--plan={s.plan}: unknown plan {bad[0]!r}; choose {PAPER_PLAN} or one of "
                       f"{', '.join(PLANS)} (join several with '+')")
  pivot = None
  if s.pivot:
    try:
      pivot = data.resolve_language(s.pivot)
    except ValueError as e:
      raise SweepError(f"--pivot: {e}") from None
    if pivot not in languages:
      raise SweepError(f"--pivot={s.pivot} is not among the sweep's languages")
  if s.permutations < 0 or s.permutations == 1:
    raise SweepError(f"--permutations={s.permutations} must be 0 (no null) or at least "
                     f"{MIN_PERMUTATIONS}")
  _at_least("null_seed", s.null_seed, 0)
  _at_least("svd_dims", s.svd_dims, 1)
  if s.svd_dims is not None and s.metric in svcca.FULL_RANK_METRICS:
    raise SweepError(f"--svd_dims={s.svd_dims} applies to svcca and pwcca; --metric={s.metric} "
                     "compares full representations")
  return dataclasses.replace(s, pivot=pivot, threshold=float(s.threshold))


def check_sentences(n: int, scoring: Scoring) -> None:
  """What the number of sentences n bounds (known from --max_sentences, or once the corpus is
  loaded, before the model runs): the fixed dimension, and the debiased CKA's n."""
  if scoring.svd_dims is not None and scoring.svd_dims >= n:
    raise SweepError(f"--svd_dims={scoring.svd_dims} must be below the number of sentences "
                     f"n={n} (centred data has rank at most n - 1)")
  if scoring.metric == "cka_debiased" and n < MIN_SENTENCES_DEBIASED:
    raise SweepError(f"--metric=cka_debiased needs at least {MIN_SENTENCES_DEBIASED} sentences, "
                     f"the corpus has n={n}")


def _check_run(r: Run) -> Run:
  _at_least("batch_size", r.batch_size, 1)
  _at_least("chunk_pairs", r.chunk_pairs, 1)
  if not r.checkpoint_seconds >= 0:
    raise SweepError(f"--checkpoint_seconds={r.checkpoint_seconds} must be 0 or more")
  if r.max_speech_seconds is not None and not r.max_speech_seconds > 0:
    raise SweepError(f"--max_speech_seconds={r.max_speech_seconds} must be positive")
  parse_devices(r.devices)
  return r


def _check_report(r: Report, languages: tuple[str, ...]) -> Report:
  if r.bootstrap < 0 or r.bootstrap == 1:
    raise SweepError(f"--bootstrap={r.bootstrap} must be 0 (off) or at least {MIN_REPLICATES} "
                     "replicates")
  if r.bootstrap and len(languages) < MIN_LANGUAGES:
    raise SweepError(f"--bootstrap={r.bootstrap} needs at least {MIN_LANGUAGES} languages in "
                     f"--languages for its intervals, got {len(languages)}")
  _at_least("bootstrap_seed", r.bootstrap_seed, 0)
  return r


def describe(settings: Settings, corpus_rows: int | None = None) -> str:
  """The sweep in one line, heading its plan."""
  c, s, r = settings.corpus, settings.scoring, settings.report
  kept = f"{s.svd_dims} dims" if s.svd_dims else f"threshold {s.threshold}"
  chance = (f"null of {s.permutations} permutations (seed {s.null_seed})" if s.permutations
            else "no null")
  return (f"{settings.model.name} on {c.source} ({len(c.languages)} languages"
          + (f", {corpus_rows} corpus rows" if corpus_rows is not None else "")
          + f"; {'+'.join(c.modalities)}), {s.metric} at {kept}, plan {s.plan}, {chance}"
          + (f", sentence bootstrap of {r.bootstrap} replicates (seed {r.bootstrap_seed})"
             if r.bootstrap else ""))


def from_flags(values: Mapping[str, Any]) -> Settings:
  """Settings from parsed flag values (flag name -> value; names that are not settings are
  ignored), lists as tuples."""
  chosen = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()
            if k in _FIELD_OF}
  return of(**chosen)
