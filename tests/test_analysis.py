"""Analyses from the results table, on synthetic activations whose answer is designed in.

Every representation is a random rotation of blocks of independent latent columns:
  semantic  S[:, :s]  shared by all languages and modalities; s grows with depth,
  modal     M_m[:, :m]  shared by all languages of one modality (text shares more than speech),
  private   noise of its own, filling the width to D.
So, with SVCCA ~ (shared columns) / D: cross-modal similarity rises with depth, languages of
one modality are closer than modalities of one language (modality gap > language gap), speech
differs more across languages than text, and the adaptor adds semantic columns to speech,
more for high-resource languages.
"""
import functools
import json

import numpy as np
import pandas as pd
import pytest

from engine import analysis as A
from engine import findings as F
from engine import table as T
from engine import pairs as P
from engine.keys import Key

N, D, LAYERS = 240, 24, 5
LANGS = ("eng", "deu", "swh", "amh")
LANGUAGES = pd.DataFrame({"code": ["eng", "deu", "swh", "amh"],
                          "name": ["English", "German", "Swahili", "Amharic"],
                          "resource": ["high", "high", "low", "low"]})
MODAL = {"text": 8, "speech": 4}
PRE_SEMANTIC, POST_SEMANTIC = 4, {"high": 10, "low": 6}
SITE_MAP = {"text": "text_encoder", "speech": ("speech_encoder", "pre_adaptor", "post_adaptor"),
            "pre_adaptor": "pre_adaptor", "post_adaptor": "post_adaptor"}


def semantic(layer: int) -> int:
  return 2 + 2 * layer


def numpy_svcca(x: np.ndarray, y: np.ndarray, threshold: float = 0.99) -> float:
  """Float64 SVCCA: truncate each side to its top singular directions, then CCA by QR + SVD."""
  def reduce(a):
    a = np.asarray(a, np.float64)
    u, s, _ = np.linalg.svd(a - a.mean(0), full_matrices=False)
    k = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), threshold) + 1)
    return u[:, :k]
  ux, uy = reduce(x), reduce(y)
  rho = np.linalg.svd(ux.T @ uy, compute_uv=False)
  return float(np.mean(rho[:min(ux.shape[1], uy.shape[1])]))


def synthetic_representations(seed=0):
  rng = np.random.default_rng(seed)
  sem = rng.standard_normal((N, D))
  modal = {m: rng.standard_normal((N, D)) for m in MODAL}
  resource = dict(zip(LANGUAGES.code, LANGUAGES.resource))

  def rep(n_sem, modality):
    private = rng.standard_normal((N, D - n_sem - MODAL[modality]))
    x = np.concatenate([sem[:, :n_sem], modal[modality][:, :MODAL[modality]], private], 1)
    q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    return (x @ q).astype(np.float32)

  reps = {}
  for lang in LANGS:
    for layer in range(LAYERS):
      reps[(lang, "text", "text_encoder", layer)] = rep(semantic(layer), "text")
      reps[(lang, "speech", "speech_encoder", layer)] = rep(semantic(layer), "speech")
    reps[(lang, "speech", "pre_adaptor", 0)] = rep(PRE_SEMANTIC, "speech")
    reps[(lang, "speech", "post_adaptor", 0)] = rep(POST_SEMANTIC[resource[lang]], "speech")
  return reps


def score(reps, plan):
  """Scores with the JAX kernel when it is there, else with the NumPy SVCCA above."""
  keys = list(reps)
  idx = P.index_pairs(plan, keys)
  try:
    from engine.svcca import pairwise
  except ImportError:
    return np.array([numpy_svcca(reps[keys[i]], reps[keys[j]]) for i, j in idx]), None
  return pairwise([reps[k] for k in keys], metric="svcca", threshold=0.99, pairs=idx), idx


@functools.lru_cache(maxsize=1)
def synthetic_table() -> pd.DataFrame:
  reps = synthetic_representations()
  plan = P.make_plan("all+adaptor", list(reps), site_map=SITE_MAP)
  scores, _ = score(reps, plan)
  ranks = np.full(len(plan), D)
  return T.results_table(plan, scores, ranks, ranks, model="synthetic", metric="svcca", n=N)


def test_results_table_columns():
  table = synthetic_table()
  assert tuple(table.columns) == T.COLUMNS
  assert (table.n == N).all() and (table.rank_a == D).all()
  assert table.layer_a.dtype == np.int64 and table.score.dtype == np.float64
  with pytest.raises(ValueError, match=r"score has shape \(2,\), the plan has 3 pairs"):
    T.results_table([(Key("eng", "text", "t", i), Key("deu", "text", "t", i),
                      "cross_lingual_text") for i in range(3)], [0.1, 0.2], model="m",
                    metric="svcca")


def test_kernel_scores_match_the_numpy_reference():
  reps = synthetic_representations()
  plan = P.make_plan("cross_modal", list(reps), site_map=SITE_MAP)[::5]
  scores, _ = score(reps, plan)
  expected = [numpy_svcca(reps[a], reps[b]) for a, b, _ in plan]
  np.testing.assert_allclose(scores, expected, atol=2e-4)


def test_cross_modal_similarity_rises_with_depth():
  by_layer = A.similarity_by_layer(synthetic_table(), main_only=True)
  cm = by_layer[by_layer.family == "cross_modal"]
  assert cm.layer.tolist() == list(range(LAYERS))
  assert set(cm.site_b) == {"speech_encoder"}
  assert np.all(np.diff(cm["mean"]) > 0.03), cm
  assert (cm["count"] == len(LANGS)).all()
  assert (cm["min"] <= cm["mean"]).all() and (cm["mean"] <= cm["max"]).all()
  assert (cm["std"] < 0.05).all()  # languages are built alike
  text = by_layer[by_layer.family == "cross_lingual_text"]
  assert (text["count"] == len(LANGS) * (len(LANGS) - 1) // 2).all()
  # The adaptor sites are separate one-point series, not part of the main figure.
  every = A.similarity_by_layer(synthetic_table())
  assert {"pre_adaptor", "post_adaptor"} <= set(every[every.family == "cross_modal"].site_b)


def test_modality_gap_exceeds_language_gap_and_speech_differs_more():
  gaps = A.gaps_by_layer(synthetic_table())
  assert gaps.layer.tolist() == list(range(LAYERS))
  assert (gaps.layer_speech == gaps.layer).all()
  assert (gaps.modality_gap > gaps.language_gap_speech + 0.05).all(), gaps
  assert (gaps.language_gap_speech > gaps.language_gap_text + 0.05).all(), gaps
  np.testing.assert_allclose(gaps.language_gap,
                             (gaps.language_gap_text + gaps.language_gap_speech) / 2)
  np.testing.assert_allclose(gaps.excess, gaps.modality_gap - gaps.language_gap)
  assert np.all(np.diff(gaps.modality_gap) < 0)
  # By definition: 1 - the mean cross-modal score of the layer.
  table = synthetic_table()
  cm = table[(table.family == "cross_modal") & (table.site_b == "speech_encoder") &
             (table.layer_a == 2)]
  assert gaps.modality_gap[2] == pytest.approx(1 - cm.score.mean())


def test_adaptor_effect_is_larger_for_high_resource_languages():
  effect = A.adaptor_effect(synthetic_table(), languages=LANGUAGES)
  assert effect.language.tolist() == list(LANGS)
  assert effect.resource.tolist() == ["high", "high", "low", "low"]
  assert effect.name.tolist() == ["English", "German", "Swahili", "Amharic"]
  assert set(effect.layer_text) == {LAYERS - 1}
  assert (effect.pre_site == "pre_adaptor").all() and (effect.post_site == "post_adaptor").all()
  np.testing.assert_allclose(effect.effect, effect.score_post - effect.score_pre)
  assert (effect.effect > 0).all()
  groups = A.adaptor_effect_by_resource(effect).set_index("resource")
  assert groups.loc["high", "mean"] > groups.loc["low", "mean"] + 0.05
  assert groups["count"].tolist() == [2, 2]
  # Languages the table does not know are grouped as 'unknown'.
  partial = A.adaptor_effect(synthetic_table(), languages=LANGUAGES.iloc[:2])
  assert partial.resource.tolist() == ["high", "high", "unknown", "unknown"]


def test_language_matrices():
  mats = A.language_matrices(synthetic_table())
  kinds = [(m.kind, m.layer_a) for m in mats]
  assert sorted(kinds) == sorted([(k, l) for k in ("text", "speech", "text_vs_speech")
                                  for l in range(LAYERS)])
  table = synthetic_table()
  for m in mats:
    frame = m.frame
    assert list(frame.index) == list(LANGS) and list(frame.columns) == list(LANGS)
    values = frame.to_numpy()
    if m.kind == "text_vs_speech":
      assert not np.isnan(values).any()
      cm = table[(table.family == "cross_modal") & (table.site_b == "speech_encoder") &
                 (table.layer_a == m.layer_a)].set_index("language_a").score
      np.testing.assert_allclose(np.diag(values), cm[list(LANGS)])
    else:
      assert np.isnan(np.diag(values)).all()
      np.testing.assert_allclose(values, values.T)


def test_summary_is_json_and_states_the_findings(tmp_path):
  data = F.write_summary(synthetic_table(), tmp_path / "summary.json", languages=LANGUAGES)
  assert json.loads((tmp_path / "summary.json").read_text()) == data
  found = {(f["finding"], f["where"].get("layer"), f["where"].get("group")): f
           for f in data["findings"]}
  assert all(f["basis"] == "raw (no null)" and f["beyond_chance"] is None
             for f in found.values())  # the synthetic table has no null
  trend = found[("cross_modal_trend", None, None)]
  assert trend["rises_with_depth"] is True and trend["estimate"] > 0 and trend["ci_low"] > 0
  assert trend["nonzero"] is True and trend["n_languages"] == len(LANGS)
  assert trend["text"].startswith("cross-modal similarity rises with depth")
  for layer in range(LAYERS):  # languages of one modality are closer than modalities
    gap = found[("modality_vs_language_gap", layer, None)]
    assert gap["estimate"] > 0 and gap["ci_low"] > 0, gap
  speech_text = found[("speech_vs_text_cross_lingual", None, None)]
  assert speech_text["estimate"] < 0 and speech_text["where"]["matched_layers"] == [
      [l, l] for l in range(LAYERS)]
  advantage = found[("same_language_advantage", None, None)]  # the plan has text-of-A vs
  assert advantage["n_languages"] == len(LANGS)  # speech-of-B pairs: same language is no closer
  high, low = (found[("adaptor_effect", None, g)] for g in ("high", "low"))
  assert high["estimate"] > low["estimate"] and high["n_languages"] == 2
  assert high["ci_low"] is None  # two languages: too few for an interval
  assert "too few languages" in high["text"]
  assert data["null"] == {"present": False, "permutations": [0], "chance_corrected": None}
  assert data["main_sites"] == {"synthetic": {"text": "text_encoder", "speech": "speech_encoder"}}
  assert data["families"]["cross_modal"] == len(LANGS) * (LAYERS + 2)
  assert len(data["similarity_by_layer"]) == 4 * LAYERS


def test_hand_made_table_statistics():
  rows = []
  for layer, scores in ((0, (0.2, 0.4)), (1, (0.5, 0.7))):
    for lang, s in zip(("eng", "deu"), scores):
      rows.append(dict(model="m", site_a="t", layer_a=layer, language_a=lang, modality_a="text",
                       site_b="s", layer_b=layer, language_b=lang, modality_b="speech",
                       family="cross_modal", metric="cka", score=s))
  rows.append(dict(rows[0], language_b="deu", family="cross_modal_lingual", score=0.1))
  table = T.validate_table(pd.DataFrame(rows))
  by_layer = A.similarity_by_layer(table)
  cm = by_layer[by_layer.family == "cross_modal"]
  np.testing.assert_allclose(cm["mean"], [0.3, 0.6])
  np.testing.assert_allclose(cm["std"], [0.1, 0.1])
  (cml,) = by_layer[by_layer.family == "cross_modal_lingual"].itertuples()
  assert cml.mean == pytest.approx(0.1) and cml.main
  assert by_layer.null_mean.isna().all() and by_layer.corrected_mean.isna().all()
  gaps = A.gaps_by_layer(table)
  np.testing.assert_allclose(gaps.modality_gap, [0.7, 0.4])
  assert gaps.language_gap.isna().all()  # no cross-lingual rows: no language gap
  assert A.adaptor_effect(table, languages=LANGUAGES).empty
  (m,) = [m for m in A.language_matrices(table) if m.layer_a == 0]
  assert m.frame.loc["eng", "deu"] == pytest.approx(0.1) and np.isnan(m.frame.loc["deu", "eng"])
  json.dumps(F.summary(table, languages=LANGUAGES), allow_nan=False)


def test_table_errors_name_the_file_and_columns(tmp_path):
  table = synthetic_table()
  table.to_parquet(tmp_path / T.RESULTS_PARQUET)
  pd.testing.assert_frame_equal(T.load_table(tmp_path), T.validate_table(table))
  table.to_csv(tmp_path / "other.csv", index=False)
  assert len(T.load_table(tmp_path / "other.csv")) == len(table)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"no results table in .*results.parquet and results.csv"):
    T.load_table(tmp_path / "empty")
  with pytest.raises(ValueError, match=r"results table .*missing.csv does not exist"):
    T.load_table(tmp_path / "missing.csv")
  table.drop(columns=["family", "score"]).to_csv(tmp_path / "bad.csv", index=False)
  with pytest.raises(ValueError, match=r"bad.csv lacks column\(s\) family, score"):
    T.load_table(tmp_path / "bad.csv")
  (tmp_path / "junk.parquet").write_bytes(b"not parquet")
  with pytest.raises(ValueError, match="junk.parquet is unreadable"):
    T.load_table(tmp_path / "junk.parquet")
  with pytest.raises(ValueError, match="column score holds non-numbers"):
    T.validate_table(table.assign(score="high"))
