"""The sweep's extraction stage: the corpus through the model into activation stores, and the
stored representations read back for scoring.

With several processes each extracts a contiguous block of the languages into its own store
(`languages_of`), so its keys form one block of every (site, layer) place; the keys, the
model's layer counts and site map and the skipped speech are exchanged, so every process makes
the same plan. Extraction is resumable by the store itself (complete representations and
written batches are skipped). engine.extract and engine.models load torch, so they are imported
inside `extract_stage` alone: claiming (or refusing) an output directory never loads it.

A sweep over several models extracts them one after the other, each into its own stores
(engine.rundir.store_name), and records their facts merged, every site named by its model
(`merged_models`), so the plan and the scoring stage see one set of keys telling the models apart.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import jax

from engine import data, distributed, model_checks, planning, rundir, settings
from engine.data import fleurs
from engine.keys import Key, model_site, model_slug, split_site
from engine.settings import SweepError
from engine.store import open_store


def process() -> tuple[int, int]:
  return jax.process_index(), jax.process_count()


def languages_of(languages: Sequence[str], index: int, count: int) -> tuple[str, ...]:
  """A process's languages: a contiguous block of the requested ones, in their order."""
  return tuple(distributed.share(languages, index, count))


def expected_keys(adapter, corpus, languages: Sequence[str], model: settings.Model,
                  modalities: Sequence[str]) -> list[Key]:
  """The representations extraction will produce (speech only where the corpus has audio)."""
  from engine.extract import select_sites  # pylint: disable=import-outside-toplevel  (torch)
  selection = select_sites(adapter, modalities, model.sites, model.layers)
  no_speech = data.corpus_info(corpus).get("no_speech") or {}
  keys = []
  for language in languages:
    for modality, places in selection.items():
      if modality == "speech" and (language in no_speech or
                                   not adapter.supports_language(language, "speech")):
        continue
      keys += [Key(language, modality, site, layer) for site, layer in places]
  return keys


def _common_fleurs_ids(corpus: settings.Corpus, fleurs_dir, mine: Sequence[str]) -> list[int]:
  """The FLEURS sentences every process's languages have (the first --max_sentences): what one
  process loading all the languages would keep."""
  found = distributed.together(lambda: fleurs.eligible_ids(list(mine), corpus.split,
                                                           local_dir=fleurs_dir) if mine else None)
  ids = sorted(set.intersection(*(set(f) for f in found if f is not None)))
  return ids[:corpus.max_sentences] if corpus.max_sentences is not None else ids


def extract_stage(out: Path, state: dict, s: settings.Settings, log: Callable[[str], None]
                  ) -> tuple[dict, str | None]:
  """Extracts into the store unless a previous run finished that.

  One model: prints the plan first (from the representations extraction is to produce) and
  returns the state and that plan's digest (None when extraction was already done). Several
  models: each into its own store, one after the other, a model extracted before reused; the
  plan is printed when scoring starts (digest None).
  """
  names = settings.model_names(s.model)
  index = process()[0]
  if len(names) == 1:
    if state.get("extracted"):
      return state, None
    facts, planned = _extract_model(out, s, rundir.store_name, log, plan=True)
    state = {**state, "extracted": facts}
    if index == 0:
      rundir.write_state(out, state)
    return state, planned
  done = dict((state.get("extracted") or {}).get("models") or {})
  for name in names:
    slug = model_slug(name)
    if name in done:
      log(f"{name}: reusing its store {', '.join(done[name]['stores'])} (extracted before)")
      continue
    log(f"{name}: extracting into {rundir.store_name(slug=slug)}")
    done[name], _ = _extract_model(out, s.replace(model=name),
                                   lambda i, c, slug=slug: rundir.store_name(i, c, slug), log,
                                   plan=False)
    state = {**state, "extracted": merged_models(names, done)}
    if index == 0:  # a model finished is kept should the next one fail
      rundir.write_state(out, state)
  if (state.get("extracted") or {}).get("order") != list(names):
    state = {**state, "extracted": merged_models(names, done)}
    if index == 0:
      rundir.write_state(out, state)
  return state, None


def merged_models(names: Sequence[str], facts: dict) -> dict:
  """The extraction facts of several models as one model's, each site named by its model
  (engine.keys.model_site), so planning and scoring read them as they read one model's; the
  stores' `namespace` says which model each store holds. `models` keeps each model's own."""
  layer_counts, site_map, stores, namespace, skipped = {}, {}, {}, {}, {}
  names = [name for name in names if name in facts]
  for name in names:
    slug, f = model_slug(name), facts[name]
    layer_counts.update((model_site(slug, site), c) for site, c in f["layer_counts"].items())
    for role, sites in f["site_map"].items():
      site_map.setdefault(role, []).extend(
          model_site(slug, site) for site in ([sites] if isinstance(sites, str) else sites))
    stores.update(f["stores"])
    namespace.update((store, slug) for store in f["stores"])
    skipped.update((f"{name}: {key}", reason) for key, reason in f["skipped"].items())
  return {"layer_counts": layer_counts, "sites": list(layer_counts), "site_map": site_map,
          "skipped": skipped, "stores": stores, "namespace": namespace, "order": list(names),
          "models": {name: facts[name] for name in names}}


def _extract_model(out: Path, s: settings.Settings, store_name: Callable[[int, int], str],
                   log: Callable[[str], None], *, plan: bool) -> tuple[dict, str | None]:
  """One model through the corpus into its stores (one per process): the extraction facts
  (layer counts, site map, skipped speech, stores) and the digest of the plan printed first."""
  from engine.extract import extract  # pylint: disable=import-outside-toplevel  (torch)
  from engine.models import get_adapter  # pylint: disable=import-outside-toplevel
  from engine.models.common import resolve_device  # pylint: disable=import-outside-toplevel
  corpus, model, run = s.corpus, s.model, s.run
  index, count = process()
  mine = languages_of(corpus.languages, index, count)
  among = (_common_fleurs_ids(corpus, run.fleurs_dir, mine)
           if corpus.source == "fleurs" and count > 1 else None)
  work = {}

  def begin():
    if not mine:  # more processes than languages
      return None
    work["corpus"] = loaded = data.load_corpus(
        corpus.source, mine, with_audio="speech" in corpus.modalities, split=corpus.split,
        max_sentences=corpus.max_sentences, fleurs_dir=run.fleurs_dir, cache_dir=run.cache_dir,
        among=among)
    ids = loaded.select_columns(["id"]).to_pandas()["id"].unique()
    settings.check_sentences(len(ids), s.scoring)  # before the model runs
    work["adapter"] = adapter = get_adapter(
        model.name, device=str(resolve_device(run.device)), dtype=model.dtype,
        **model_checks.adapter_options(model))
    return {"keys": [list(k) for k in expected_keys(adapter, loaded, mine, model,
                                                     corpus.modalities)],
            "layer_counts": {site.name: site.layers for site in adapter.sites()},
            "site_map": adapter.site_map,
            "rows": len(loaded), "ids": sorted(int(i) for i in ids)}

  shares = [share for share in distributed.together(begin) if share is not None]
  if any(share["ids"] != shares[0]["ids"] for share in shares):
    raise SweepError("the processes loaded corpora with different sentence ids; do all hosts "
                     "run the same code on the same data?")
  layer_counts, site_map = shares[0]["layer_counts"], shares[0]["site_map"]
  planned = None
  if plan:
    keys = planning.ordered([k for share in shares for k in share["keys"]], corpus.languages,
                            corpus.modalities, list(layer_counts))
    planned = planning.make(s.scoring.plan, keys, site_map=site_map, layer_counts=layer_counts,
                            pivot=s.scoring.pivot)
    log(planning.describe(planned, settings.describe(s, sum(share["rows"] for share in shares)),
                          chunk_pairs=run.chunk_pairs))

  def run_extraction():
    if not mine:
      return {}
    report = extract(work["adapter"], work["corpus"], out / store_name(index, count),
                     modalities=corpus.modalities, sites=model.sites, layers=model.layers,
                     pooling=model.pooling, batch_size=run.batch_size,
                     max_speech_seconds=run.max_speech_seconds, progress=run.progress)
    return report.skipped

  skipped = {k: v for share in distributed.together(run_extraction) for k, v in share.items()}
  work.clear()  # the model's memory, before the next model loads
  for key, reason in skipped.items():
    log(f"no {key.split('.')[1]} for {key.split('.')[0]}: {reason}")
  stores = {store_name(i, count): list(languages_of(corpus.languages, i, count))
            for i in range(count)}
  return ({"layer_counts": layer_counts, "sites": list(layer_counts), "site_map": site_map,
           "skipped": skipped, "stores": {k: v for k, v in stores.items() if v}},
          planned if planned is None else planning.digest(planned))


def stored(out: Path, state: dict, languages: Sequence[str], modalities: Sequence[str]
           ) -> tuple[dict, list[Key], int]:
  """This process's complete representations ({key: store}), every process's keys in plan
  order, and the stores' sentence count n.

  A process's keys are those of its block of the languages, read from whichever stores hold
  them (the processes that extracted them, with the same process count, this process itself).
  """
  index, count = process()
  mine = set(languages_of(languages, index, count))
  own = {}

  namespace = state["extracted"].get("namespace") or {}

  def read():
    where, n = {}, 0
    for name, held in (state["extracted"].get("stores") or
                       {rundir.STORE_DIR: list(languages)}).items():
      if mine & set(held):
        store = open_store(out / name)
        if name in namespace:
          store = ModelStore(store, namespace[name])
        n = store.n
        where.update((k, store) for k in store.keys() if k.language in mine)
    own.update(where=where, n=n)

  distributed.together(read)
  held = distributed.allgather_json([[*k, own["n"]] for k in own["where"]])
  ns = {k[-1] for share in held for k in share}
  if len(ns) > 1:
    raise SweepError(f"the stores hold different numbers of sentences ({sorted(ns)}); use "
                     "--overwrite to extract again")
  keys = planning.ordered([k[:-1] for share in held for k in share], languages, modalities,
                          state["extracted"]["sites"])
  return own["where"], keys, ns.pop() if ns else own["n"]


class ModelStore:
  """One model's store read under keys whose sites are named by the model (a several-model
  sweep's keys, engine.keys.model_site), as the scoring stage reads a store."""

  def __init__(self, store, slug: str):
    self.store, self.slug, self.n = store, slug, store.n

  def keys(self) -> list[Key]:
    return [k._replace(site=model_site(self.slug, k.site)) for k in self.store.keys()]

  def load(self, key: Key):
    return self.store.load(key._replace(site=split_site(key.site)[1]))
