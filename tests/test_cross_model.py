"""Sweeps over several models on the same sentences: the cross-model plans, a table naming each
side's model, scores equal to the kernel on the models' own stores, stores reused when a model
is added, and the refusals."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import cross_model, planning, rundir, settings, svcca
from engine import table as table_mod
from engine import sweep as S
from engine.keys import Key, model_site, model_slug, split_site
from engine.store import open_store
from tests import reference

LANGS = ("eng", "deu", "swh")
MODELS = ("seamless-tiny", "sonar-tiny")
THRESHOLD = 0.9  # few sentences: ranks stay well below n


def config(out, models, **changes):
  return settings.of(**{"model": ",".join(models), "plan": "cross_model", "languages": LANGS,
                        "modalities": ("text",), "max_sentences": 12, "threshold": THRESHOLD,
                        "output_dir": str(out), "progress": False, **changes})


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  """A text-only cross-model sweep of seamless-tiny and sonar-tiny, and what it logged."""
  cache = tmp_path_factory.mktemp("cache")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("XMODAL_CACHE", str(cache))
    out = tmp_path_factory.mktemp("xm")
    lines = []
    result = S.run_sweep(config(out, MODELS), log=lines.append)
  return out, result, lines, cache


def store_of(out: Path, model: str):
  return open_store(out / rundir.store_name(slug=model_slug(model)))


def test_rows_pair_the_two_models_on_the_same_sentences(swept):
  out, result, _, _ = swept
  table = table_mod.load_table(out)
  assert len(table) == len(result.plan) > 0
  assert set(table.family) == {"cross_model"}
  assert set(table.model_a) == {"seamless-tiny"} and set(table.model_b) == {"sonar-tiny"}
  assert set(table.model) == {"seamless-tiny~sonar-tiny"}
  assert (table.language_a == table.language_b).all() and set(table.language_a) == set(LANGS)
  assert (table.modality_a == table.modality_b).all()
  # The plain sites, each model's own: every text site of each side, all layers matched by
  # relative depth (4-layer encoders layer for layer, sonar's one-layer embedding to the last).
  assert not any("/" in s for s in set(table.site_a) | set(table.site_b))
  got = set(zip(table.site_a, table.layer_a, table.site_b, table.layer_b))
  assert got == ({("text_encoder", i, "text_encoder", i) for i in range(4)}
                 | {("text_encoder", 3, "sentence_embedding", 0)})


def test_scores_equal_the_kernel_on_the_two_stores(swept):
  out, _, _, _ = swept
  table = table_mod.load_table(out)
  stores = {m: store_of(out, m) for m in MODELS}
  sides = [list(zip(table[f"model_{s}"], table[f"language_{s}"], table[f"modality_{s}"],
                    table[f"site_{s}"], table[f"layer_{s}"])) for s in "ab"]
  keys = list(dict.fromkeys(sides[0] + sides[1]))
  position = {k: i for i, k in enumerate(keys)}
  reps = [np.asarray(stores[k[0]].load(Key(*k[1:]))) for k in keys]
  index = np.array([[position[a], position[b]] for a, b in zip(*sides)])
  expected = svcca.pairwise_svcca(reps, pairs=index, threshold=THRESHOLD)
  np.testing.assert_allclose(table.score, expected, atol=1e-5, rtol=0)
  row = table.iloc[-1]  # and one pair against the float64 NumPy reference
  a = stores[row.model_a].load((row.language_a, row.modality_a, row.site_a, row.layer_a))
  b = stores[row.model_b].load((row.language_b, row.modality_b, row.site_b, row.layer_b))
  assert row.score == pytest.approx(
      reference.svcca(np.float64(a), np.float64(b), threshold=THRESHOLD), abs=1e-4)


def test_another_model_reuses_the_stores_and_rescores(swept, monkeypatch):
  out, first, _, cache = swept
  monkeypatch.setenv("XMODAL_CACHE", str(cache))
  manifests = {m: (out / rundir.store_name(slug=m) / "manifest.json") for m in MODELS}
  stamps = {m: p.stat().st_mtime_ns for m, p in manifests.items()}
  lines = []
  models = (*MODELS, "seamless-v1-tiny")
  result = S.run_sweep(config(out, models), log=lines.append)
  assert {m: p.stat().st_mtime_ns for m, p in manifests.items()} == stamps
  for m in MODELS:
    assert any(line.startswith(f"{m}: reusing its store") for line in lines), lines
  assert any(line.startswith("seamless-v1-tiny: extracting") for line in lines), lines
  table = table_mod.load_table(out)
  assert len(table) == len(result.plan)
  pairs_of_models = set(zip(table.model_a, table.model_b))
  assert pairs_of_models == {("seamless-tiny", "sonar-tiny"), ("seamless-tiny", "seamless-v1-tiny"),
                             ("sonar-tiny", "seamless-v1-tiny")}
  # The two models' rows are the first run's, scored again from the same stores.
  before = first.table.set_index(["model_a", "model_b", "language_a", "site_a", "layer_a",
                                  "site_b", "layer_b"]).score
  after = table.set_index(list(before.index.names)).score
  np.testing.assert_allclose(after.loc[before.index], before, atol=1e-6)
  state = json.loads((out / rundir.STATE_JSON).read_text())
  assert state["identity"]["model"] == ",".join(models)


def test_an_unknown_model_in_the_list_is_named(tmp_path):
  with pytest.raises(settings.SweepError) as e:
    S.run_sweep(config(tmp_path / "x", ("seamless-tiny", "nosuch-model")), log=lambda _: None)
  message = str(e.value)
  assert "\n" not in message and "'nosuch-model'" in message and "--model=" in message
  assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("plan", ["cross_model", "cross_modal+cross_model_modal"])
def test_cross_model_plans_with_one_model_are_refused(tmp_path, plan):
  with pytest.raises(settings.SweepError,
                     match=rf"^--plan={re.escape(plan)} compares models, but "
                           "--model=seamless-tiny names one; give several"):
    S.run_sweep(config(tmp_path / "x", ("seamless-tiny",), plan=plan), log=lambda _: None)
  assert not (tmp_path / "x").exists()


def test_a_model_named_twice_is_refused():
  with pytest.raises(settings.SweepError, match=r"names sonar-tiny twice"):
    settings.check(settings.of(model="sonar-tiny, sonar-tiny"))


# ----------------------------------------------------------------------------- plans


def _keys():
  """Two models: A (text 4 layers, speech 2), B (text 3, speech 3), two languages."""
  keys = []
  for language in ("eng", "deu"):
    for model, text, speech in (("a", 4, 2), ("b", 3, 3)):
      keys += [Key(language, "text", model_site(model, "t"), i) for i in range(text)]
      keys += [Key(language, "speech", model_site(model, "s"), i) for i in range(speech)]
  site_map = {"text": [model_site("a", "t"), model_site("b", "t")],
              "speech": [model_site("a", "s"), model_site("b", "s")]}
  return keys, site_map


def _nearest(layer, count, other):
  """The independent relative-depth rule: the nearest-depth layer of `other` layers."""
  depth = np.arange(other) / (other - 1)
  return int(np.argmin(np.abs(depth - layer / (count - 1))))


def test_cross_model_pairs_same_language_and_modality_at_matched_depth():
  keys, site_map = _keys()
  plan = planning.make("cross_model", keys, site_map=site_map, layer_counts={})
  expected = set()
  for language in ("eng", "deu"):
    for modality, (ca, cb) in (("text", (4, 3)), ("speech", (2, 3))):
      short, long_ = (cb, ca) if cb < ca else (ca, cb)
      for l in range(short):
        la, lb = ((_nearest(l, short, long_), l) if cb < ca else (l, _nearest(l, short, long_)))
        site = "t" if modality == "text" else "s"
        expected.add((Key(language, modality, model_site("a", site), la),
                      Key(language, modality, model_site("b", site), lb)))
  assert {(a, b) for a, b, _ in plan} == expected and len(plan) == len(expected)
  assert {f for *_, f in plan} == {"cross_model"}


def test_cross_model_modal_pairs_each_models_text_with_the_others_speech():
  keys, site_map = _keys()
  plan = planning.make("cross_model_modal+cross_modal", keys, site_map=site_map,
                       layer_counts={})
  by_family = {}
  for a, b, family in plan:
    by_family.setdefault(family, []).append((a, b))
  for a, b in by_family["cross_model_modal"]:
    assert (a.modality, b.modality) == ("text", "speech") and a.language == b.language
    assert split_site(a.site)[0] != split_site(b.site)[0]
  assert {(split_site(a.site)[0], split_site(b.site)[0])
          for a, b in by_family["cross_model_modal"]} == {("a", "b"), ("b", "a")}
  # A text (4 layers) vs B speech (3): B's 3 layers each matched once; B text (3) vs A speech (2).
  assert len(by_family["cross_model_modal"]) == 2 * (3 + 2)
  for a, b in by_family["cross_modal"]:  # cross_modal stays within each model
    assert split_site(a.site)[0] == split_site(b.site)[0]
  assert len(by_family["cross_modal"]) == 2 * (2 + 3)


def test_single_model_plans_are_those_of_engine_pairs():
  from engine import pairs  # pylint: disable=import-outside-toplevel
  keys = [Key(language, m, site, i) for language in ("eng", "deu")
          for m, site in (("text", "t"), ("speech", "s")) for i in range(3)]
  site_map = {"text": "t", "speech": "s"}
  assert cross_model.make_plan("cross_modal+cross_lingual_text", keys, site_map=site_map) == \
      pairs.make_plan("cross_modal+cross_lingual_text", keys, site_map=site_map)
  with pytest.raises(ValueError, match="compares models, but the representations are of one"):
    cross_model.make_plan("cross_model", keys, site_map=site_map)


@pytest.mark.parametrize("models, plan, named", [
    ("seamless-tiny,nosuch-model", "cross_model", "'nosuch-model'"),
    ("sonar-tiny", "cross_model_modal", "--model=sonar-tiny names one"),
])
def test_cli_refuses_in_one_line(tmp_path, models, plan, named):
  root = Path(__file__).resolve().parents[1]
  done = subprocess.run(
      [sys.executable, "-m", "cli.sweep", f"--model={models}", f"--plan={plan}",
       f"--output_dir={tmp_path / 'x'}"], cwd=root, capture_output=True, text=True, timeout=120,
      env={**os.environ, "PYTHONPATH": str(root)})
  assert done.returncode == 1
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("sweep: error: ") and named in lines[0], lines
  assert not (tmp_path / "x").exists()


def test_single_model_tables_name_the_model_on_both_sides():
  keys = [Key(language, "text", "t", 0) for language in ("eng", "deu")]
  plan = [(keys[0], keys[1], "cross_lingual_text")]
  table = table_mod.results_table(plan, [0.5], model="seamless-tiny", metric="svcca")
  assert list(table.columns) == list(table_mod.COLUMNS)
  assert (table.model == "seamless-tiny").all() and (table.model_a == table.model).all()
  assert (table.model_b == table.model).all() and list(table.site_a) == ["t"]
  old = table.drop(columns=["model_a", "model_b"])  # a table written before models were compared
  assert table_mod.validate_table(old)[["model_a", "model_b"]].equals(table[["model_a", "model_b"]])


def test_sites_named_by_their_model():
  assert model_slug("facebook/seamless-m4t-v2-large") == "facebook--seamless-m4t-v2-large"
  assert model_slug("/data/models/my.sonar/") == "models--my_sonar"
  key = Key("eng", "text", model_site("sonar-tiny", "text_encoder"), 2)
  assert Key.parse(key.name) == key and split_site(key.site) == ("sonar-tiny", "text_encoder")
  assert split_site("text_encoder") == (None, "text_encoder")
  from engine.keys import as_key  # pylint: disable=import-outside-toplevel
  assert as_key(key) == key
  with pytest.raises(ValueError, match="must be letters"):
    as_key(("eng", "text", "a/b/c", 0))
  with pytest.raises(ValueError, match="must be letters"):
    as_key(("eng/x", "text", "t", 0))
