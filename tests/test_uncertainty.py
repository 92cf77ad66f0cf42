"""Findings with intervals: chance correction removes a designed confound, keeps a designed
effect, and the intervals cover the designed value at their nominal rate.

Tables are simulated directly (no activations): every score is
  true similarity + null level of its family + language effects + pair noise,
with null_mean given, as the sweep's permutation null would give it. Families differ in null
level the way kept ranks make them differ on the default run (cross-modal ~0.56, cross-lingual
~0.52, the adaptor's output +0.06 above its input).
"""
import itertools
import json

import numpy as np
import pandas as pd
import pytest

from engine import findings as F
from engine import table as T
from engine import uncertainty as U
from engine.data.languages import DEFAULT_LANGUAGES, language_table
from engine.keys import Key

LANGS = list(DEFAULT_LANGUAGES)  # 30, with the Joshi et al. resource groups
NULL = {"cross_modal": 0.56, "cross_lingual_text": 0.52, "cross_lingual_speech": 0.52,
        "pre_adaptor": 0.55, "post_adaptor": 0.61}
ROW = dict(model="sim", metric="svcca", null_sd=0.015, permutations=200, n=64)


def simulate(rng, *, layers=3, true_cm=0.10, true_cl=0.10, slope=0.0, adaptor=0.0,
             language_sd=0.02, noise_sd=0.01, cross_lingual=True, adaptor_rows=True,
             modalities=("text", "speech"), cross_lingual_layers=None):
  """A results table whose chance-corrected values are designed; see the module docstring."""
  n = len(LANGS)
  rows = []

  def add(family, la, lb, ma, mb, site_a, site_b, layer_a, layer_b, true, null):
    rows.append((family, la, lb, ma, mb, site_a, site_b, layer_a, layer_b, true, null))

  lang_effect = rng.normal(0, language_sd, (3, n))  # cross-modal, text, speech
  for layer in range(layers):
    for i, lang in enumerate(LANGS):
      add("cross_modal", lang, lang, "text", "speech", "text_encoder", "speech_encoder", layer,
          layer, true_cm + slope * layer + lang_effect[0, i], NULL["cross_modal"])
    if cross_lingual and (cross_lingual_layers is None or layer in cross_lingual_layers):
      for (i, a), (j, b) in itertools.combinations(enumerate(LANGS), 2):
        for k, modality in ((1, "text"), (2, "speech")):
          if modality not in modalities:
            continue
          add(f"cross_lingual_{modality}", a, b, modality, modality, f"{modality}_encoder",
              f"{modality}_encoder", layer, layer,
              true_cl + (lang_effect[k, i] + lang_effect[k, j]) / 2,
              NULL[f"cross_lingual_{modality}"])
  if adaptor_rows:
    for i, lang in enumerate(LANGS):
      for site, extra in (("pre_adaptor", 0.0), ("post_adaptor", adaptor)):
        add("cross_modal", lang, lang, "text", "speech", "text_encoder", site, layers - 1, 0,
            true_cm + extra + lang_effect[0, i], NULL[site])
  frame = pd.DataFrame(rows, columns=["family", "language_a", "language_b", "modality_a",
                                      "modality_b", "site_a", "site_b", "layer_a", "layer_b",
                                      "true", "null_mean"])
  frame["score"] = frame.true + frame.null_mean + rng.normal(0, noise_sd, len(frame))
  frame["z"] = (frame.score - frame.null_mean) / ROW["null_sd"]
  frame["p_value"] = np.where(frame.z > 3, 0.005, 0.5)
  return T.validate_table(frame.drop(columns="true").assign(**ROW))


def by_name(found):
  return {(f["finding"], f["where"].get("layer"), f["where"].get("group")): f for f in found}


def test_chance_correction_removes_a_null_level_confound():
  """Same true similarity for modalities and languages, different null levels (kept ranks):
  the raw gap is clearly non-zero, the chance-corrected one covers 0; same for an adaptor
  that only moves the chance level."""
  table = simulate(np.random.default_rng(1))
  found = by_name(F.findings(table, languages=language_table()))
  gap = found[("modality_vs_language_gap_mean", None, None)]
  assert gap["basis"] == "chance-corrected"
  assert gap["raw"] == pytest.approx(NULL["cross_lingual_text"] - NULL["cross_modal"], abs=0.01)
  assert gap["nonzero"] is True and gap["raw_ci_high"] < -0.02  # raw: clearly non-zero
  assert gap["ci_low"] < 0 < gap["ci_high"] and gap["beyond_chance"] is False
  assert "not distinguishable from chance" in gap["text"]
  effect = found[("adaptor_effect", None, "high")]
  assert effect["raw_ci_low"] > 0.04 and effect["nonzero"] is True
  assert effect["ci_low"] < 0 < effect["ci_high"] and effect["beyond_chance"] is False
  assert effect["n_languages"] == 15


def test_a_designed_real_effect_is_detected():
  table = simulate(np.random.default_rng(2), true_cm=0.07, slope=0.01, adaptor=0.03)
  found = by_name(F.findings(table, languages=language_table()))
  gap = found[("modality_vs_language_gap_mean", None, None)]  # 0.10 - 0.07 - 0.01 (mean slope)
  assert gap["ci_low"] > 0 and gap["beyond_chance"] is True
  assert gap["estimate"] == pytest.approx(0.02, abs=0.01)
  trend = found[("cross_modal_trend", None, None)]
  assert trend["ci_low"] > 0 and trend["rises_with_depth"] is True
  assert trend["estimate"] == pytest.approx(0.01, abs=0.004)
  assert trend["text"].startswith("cross-modal similarity rises with depth")
  assert "distinguishable from chance" in trend["text"] and "[95% CI +" in trend["text"]
  effect = found[("adaptor_effect", None, "high")]
  assert effect["ci_low"] > 0 and effect["estimate"] == pytest.approx(0.03, abs=0.01)


def test_without_a_null_findings_are_raw_and_say_so(tmp_path):
  table = simulate(np.random.default_rng(3), cross_lingual=False)
  table[list(T.NULL_COLUMNS)] = np.nan
  table["permutations"] = 0
  found = F.findings(table, languages=language_table())
  assert {f["basis"] for f in found} == {"raw (no null)"}
  for f in found:
    assert f["estimate"] == f["raw"] and f["beyond_chance"] is None
    assert "raw (no null)" in f["text"] and "chance level unknown" in f["text"]
  # Old tables, written before the null, read with NaN there.
  old = table.drop(columns=[*T.NULL_COLUMNS, "permutations"])
  old.to_csv(tmp_path / "old.csv", index=False)
  back = T.load_table(tmp_path / "old.csv")
  assert back.null_mean.isna().all() and (back.permutations == 0).all()
  assert set(T.COLUMNS) - {"rank_a", "rank_b"} <= set(back.columns)


def test_intervals_cover_the_designed_value_at_their_nominal_rate():
  """300 tables of 30 languages: the 95% intervals of the cross-modal trend and of the
  modality - language gap cover the designed value in 93-97% of them."""
  rng = np.random.default_rng(20260)
  tables = 300
  covered = {"trend": 0, "gap": 0}
  for _ in range(tables):
    table = simulate(rng, layers=2, true_cm=0.08, slope=0.01, adaptor_rows=False,
                     language_sd=0.03, noise_sd=0.01, modalities=("text",),
                     cross_lingual_layers=(0,))
    found = by_name(F.findings(table, languages=language_table(),
                               only=("cross_modal_trend", "modality_vs_language_gap")))
    trend = found[("cross_modal_trend", None, None)]
    covered["trend"] += trend["ci_low"] <= 0.01 <= trend["ci_high"]
    gap = found[("modality_vs_language_gap", 0, None)]
    covered["gap"] += gap["ci_low"] <= 0.02 <= gap["ci_high"]
  for name, hits in covered.items():
    assert 0.93 <= hits / tables <= 0.97, (name, hits / tables)


def test_language_interval_matches_the_percentile_of_resampled_means():
  """On a plain mean the index bootstrap is scipy's bootstrap of the values themselves."""
  import scipy.stats
  values = np.random.default_rng(4).normal(size=25)
  for method in ("percentile", "BCa", "expanded percentile"):
    ours = U.language_interval(lambda idx: U.vector_mean(values, idx), len(values),
                               method=method, seed=7)
    expanded = method == "expanded percentile"
    theirs = scipy.stats.bootstrap(
        (values,), np.mean, method="percentile" if expanded else method, n_resamples=999,
        confidence_level=U.expanded_level(0.95, 25) if expanded else 0.95,
        random_state=np.random.default_rng(7)).confidence_interval
    np.testing.assert_allclose(ours, tuple(theirs), rtol=1e-10)
  # Expanded: as wide as the t interval for normal data, so wider than the 95% percentile.
  assert 0.96 < U.expanded_level(0.95, 25) < 0.97
  assert U.expanded_level(0.95, 10**6) == pytest.approx(0.95, abs=1e-4)
  assert np.isnan(U.language_interval(lambda idx: U.vector_mean(values, idx), 2)).all()


def test_pair_mean_leaves_out_a_language_drawn_twice():
  m = np.arange(16, dtype=float).reshape(4, 4)
  m = (m + m.T) / 2
  np.fill_diagonal(m, np.nan)
  idx = np.array([0, 0, 2])
  expected = np.mean([m[0, 2], m[0, 2], m[2, 0], m[2, 0]])
  assert U.pair_mean(m, idx) == pytest.approx(expected)
  assert U.pair_mean(m, np.arange(4)) == pytest.approx(np.nanmean(m))
  assert np.isnan(U.pair_mean(m, np.array([1, 1, 1])))
  np.testing.assert_allclose(U.slope(np.arange(3), np.array([[1.0, 2.0, 3.0], [0, np.nan, 2]])),
                             [1.0, 1.0])


def test_sentence_bootstrap_rescoring_recomputes_the_findings():
  """A rescorer that rescales scores by the share of distinct sentences drawn moves every
  finding; the interval brackets the findings of the replicates, and bad input is one line."""
  table = simulate(np.random.default_rng(5), cross_lingual=False)
  base = table.score.to_numpy()

  def rescore(rows):
    return base * (0.9 + 0.2 * len(np.unique(rows)) / 64)

  out = F.sentence_bootstrap(table, rescore, replicates=6, seed=3,
                             languages=language_table())
  ids = {r["id"] for r in out}
  assert ids == set(F.point_findings(table, languages=language_table()))
  for r in out:
    assert r["replicates"] == 6 and r["sentence_ci_low"] < r["sentence_ci_high"]
  with pytest.raises(ValueError, match="--bootstrap needs at least 2 replicates"):
    F.sentence_bootstrap(table, rescore, replicates=1)
  two = table[table.language_a.isin(["eng", "deu"]) & table.language_b.isin(["eng", "deu"])]
  with pytest.raises(ValueError, match="--bootstrap needs at least 3 languages, the table has 2"):
    F.sentence_bootstrap(two, rescore, replicates=2)
  with pytest.raises(ValueError, match=r"rescore returned shape \(3,\)"):
    F.sentence_bootstrap(table, lambda rows: np.zeros(3), replicates=2)
  data = F.summary(table, languages=language_table(), sentence=out)
  json.dumps(F.jsonable(data), allow_nan=False)
  assert all("over sentences [" in f["text"] for f in data["findings"])


def test_plan_rescorer_scores_duplicated_rows_like_the_kernel():
  """The sentence rescorer is the kernel on the chosen rows, duplicates included."""
  from engine import pairs as P
  from tests.test_analysis import numpy_svcca
  rng = np.random.default_rng(6)
  keys = [Key(lang, modality, f"{modality}_encoder", 0)
          for lang in ("eng", "deu", "swh") for modality in ("text", "speech")]
  reps = {k: rng.normal(size=(40, 12)).astype(np.float32) for k in keys}
  plan = P.make_plan("all", keys, site_map={"text": "text_encoder", "speech": "speech_encoder"})
  rescore = U.plan_rescorer(reps.__getitem__, plan, metric="svcca", threshold=0.99)
  rows = rng.integers(0, 40, 40)
  expected = [numpy_svcca(reps[a][rows], reps[b][rows]) for a, b, _ in plan]
  np.testing.assert_allclose(rescore(rows), expected, atol=2e-5)
