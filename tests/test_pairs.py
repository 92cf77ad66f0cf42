"""Comparison plans: which pairs each plan yields, their order, chunks and errors."""
import math

import numpy as np
import pytest

from engine import pairs as P

LANGS = ("eng", "deu", "swh")


def seamless_keys(langs=LANGS, text_layers=4, speech_layers=4):
  keys = []
  for lang in langs:
    keys += [(lang, "text", "text_encoder", l) for l in range(text_layers)]
    keys += [(lang, "speech", "speech_encoder", l) for l in range(speech_layers)]
    keys += [(lang, "speech", "pre_adaptor", 0), (lang, "speech", "post_adaptor", 0)]
  return keys


SITE_MAP = {"text": "text_encoder", "speech": ("speech_encoder", "pre_adaptor", "post_adaptor"),
            "pre_adaptor": "pre_adaptor", "post_adaptor": "post_adaptor"}


def unordered(plan):
  return [frozenset((a, b)) for a, b, _ in plan]


def test_repkey_is_a_plain_tuple():
  key = P.RepKey("eng", "text", "text_encoder", 3)
  assert key == ("eng", "text", "text_encoder", 3)
  assert hash(key) == hash(("eng", "text", "text_encoder", 3))
  assert key.name == "eng.text.text_encoder.3"


@pytest.mark.parametrize("name", P.PLANS)
def test_plans_are_deterministic_without_duplicates(name):
  keys = seamless_keys()
  plan = P.make_plan(name, keys, site_map=SITE_MAP)
  assert plan == P.make_plan(name, list(keys), site_map=dict(SITE_MAP))
  assert plan, name
  assert len(set(unordered(plan))) == len(plan)
  for a, b, family in plan:
    assert isinstance(a, P.RepKey) and isinstance(b, P.RepKey) and a != b
    assert family in P.FAMILIES


def test_cross_modal_pairs_text_with_speech_of_the_same_language():
  plan = P.make_plan("cross_modal", seamless_keys(), site_map=SITE_MAP)
  for a, b, family in plan:
    assert family == "cross_modal"
    assert (a.modality, b.modality) == ("text", "speech") and a.language == b.language
  layered = [(a.layer, b.layer) for a, b, _ in plan if b.site == "speech_encoder"]
  assert sorted(set(layered)) == [(l, l) for l in range(4)]
  # One-layer adaptor sites are outputs: they meet the text encoder's last layer.
  adaptor = {(a.layer, b.site) for a, b, _ in plan if b.site != "speech_encoder"}
  assert adaptor == {(3, "pre_adaptor"), (3, "post_adaptor")}
  assert len(plan) == len(LANGS) * (4 + 2)


def test_cross_modal_relative_depth_when_layer_counts_differ():
  keys = seamless_keys(text_layers=7, speech_layers=4)
  plan = P.make_plan("cross_modal", keys, site_map={"text": "text_encoder",
                                                   "speech": "speech_encoder"})
  assert sorted({(a.layer, b.layer) for a, b, _ in plan}) == [(0, 0), (2, 1), (4, 2), (6, 3)]
  plan = P.make_plan("cross_modal", keys, site_map={"text": "text_encoder",
                                                   "speech": "speech_encoder"}, align="index")
  assert sorted({(a.layer, b.layer) for a, b, _ in plan}) == [(l, l) for l in range(4)]


def test_align_layers():
  assert P.align_layers(range(5), range(5)) == [(l, l) for l in range(5)]
  assert P.align_layers(range(3), range(5)) == [(0, 0), (1, 2), (2, 4)]
  assert P.align_layers(range(5), [0]) == [(4, 0)]
  # Declared layer counts fix depth when only some layers are present.
  assert P.align_layers([0, 1], [0, 1, 2, 3], count_a=2, count_b=4) == [(0, 0), (1, 3)]
  assert P.align_layers([0, 1], [0, 1, 2, 3], count_a=4, count_b=4) == [(0, 0), (1, 1)]
  with pytest.raises(ValueError, match="alignment 'nearest'"):
    P.align_layers([0], [0], align="nearest")


def test_layer_counts_reach_the_plan():
  keys = seamless_keys(text_layers=2, speech_layers=2)
  site_map = {"text": "text_encoder", "speech": "speech_encoder"}
  plan = P.make_plan("cross_modal", keys, site_map=site_map,
                     layer_counts={"text_encoder": 2, "speech_encoder": 9})
  assert {(a.layer, b.layer) for a, b, _ in plan} == {(0, 0), (1, 1)}


def test_cross_lingual_plans_stay_within_a_site_and_layer():
  keys = seamless_keys()
  text = P.make_plan("cross_lingual_text", keys)
  assert len(text) == math.comb(len(LANGS), 2) * 4
  speech = P.make_plan("cross_lingual_speech", keys)
  assert len(speech) == math.comb(len(LANGS), 2) * (4 + 2)
  for plan, modality in ((text, "text"), (speech, "speech")):
    for a, b, family in plan:
      assert family == f"cross_lingual_{modality}"
      assert a.modality == b.modality == modality and a.language != b.language
      assert (a.site, a.layer) == (b.site, b.layer)
      assert LANGS.index(a.language) < LANGS.index(b.language)  # the order keys came in
  # A site map narrows the speech sites.
  only = P.make_plan("cross_lingual_speech", keys, site_map={"speech": "speech_encoder"})
  assert {a.site for a, _, _ in only} == {"speech_encoder"}


def test_pivot_keeps_cross_lingual_pairs_with_the_pivot():
  keys = seamless_keys()
  plan = P.make_plan("cross_lingual_text", keys, pivot="deu")
  assert len(plan) == (len(LANGS) - 1) * 4
  assert all("deu" in (a.language, b.language) for a, b, _ in plan)
  everything = P.make_plan("all", keys, site_map=SITE_MAP, pivot="deu")
  assert all(a.language == b.language or "deu" in (a.language, b.language)
             for a, b, _ in everything)
  assert P.family_counts(everything)["cross_modal"] == len(LANGS) * 6


def test_all_is_every_pair_within_a_layer():
  keys = seamless_keys()
  plan = P.make_plan("all", keys, site_map=SITE_MAP)
  counts = P.family_counts(plan)
  two = 2 * len(LANGS)
  # Layer slots text i + speech i: C(2L, 2) each; the last text layer also meets each adaptor
  # site (its text pairs already counted); the adaptor sites also hold their own pairs.
  expected = 4 * math.comb(two, 2) + 2 * (math.comb(two, 2) - math.comb(len(LANGS), 2))
  assert len(plan) == expected
  assert counts["cross_modal"] == len(LANGS) * 6
  assert counts["cross_modal_lingual"] == len(LANGS) * (len(LANGS) - 1) * 6
  for a, b, family in plan:
    assert family == P.classify(a, b)
    if a.modality != b.modality:
      assert a.modality == "text"
  # Without a site map, 'all' is the pairs within each (site, layer).
  plain = P.make_plan("all", keys)
  assert all((a.site, a.layer) == (b.site, b.layer) for a, b, _ in plain)


def test_shared_site_names_need_no_site_map():
  keys = [(lang, modality, "llm", l) for lang in LANGS for modality in ("text", "speech")
          for l in range(3)] + [(lang, "speech", "qformer", 0) for lang in LANGS]
  plan = P.make_plan("cross_modal", keys)
  assert len(plan) == len(LANGS) * 3
  assert all(a.site == b.site == "llm" and a.layer == b.layer for a, b, _ in plan)
  # 'all' mixes modalities at a shared site by itself.
  assert "cross_modal" in P.family_counts(P.make_plan("all", keys))


def test_adaptor_and_cross_layer():
  keys = seamless_keys()
  plan = P.make_plan("adaptor", keys, site_map=SITE_MAP)
  assert [(a.language, a.site, b.site) for a, b, _ in plan] == [
      (lang, "pre_adaptor", "post_adaptor") for lang in LANGS]
  layers = P.make_plan("cross_layer", keys)
  assert len(layers) == len(LANGS) * 2 * math.comb(4, 2)
  for a, b, family in layers:
    assert family == "cross_layer" and a.layer < b.layer
    assert (a.language, a.modality, a.site) == (b.language, b.modality, b.site)


def test_joined_plans_skip_pairs_already_planned():
  keys = seamless_keys()
  both = P.make_plan("cross_modal+adaptor", keys, site_map=SITE_MAP)
  assert len(both) == len(P.make_plan("cross_modal", keys, site_map=SITE_MAP)) + len(LANGS)
  assert P.make_plan(["cross_modal", "adaptor"], keys, site_map=SITE_MAP) == both
  everything = P.make_plan("all+cross_modal+cross_lingual_text", keys, site_map=SITE_MAP)
  assert everything == P.make_plan("all", keys, site_map=SITE_MAP)


def test_site_maps_are_restricted_to_the_keys():
  keys = seamless_keys()
  assert P.restrict_site_map(SITE_MAP, keys) == SITE_MAP
  no_adaptor = [k for k in keys if "adaptor" not in k[2]]
  assert P.restrict_site_map(SITE_MAP, no_adaptor) == {
      "text": "text_encoder", "speech": ("speech_encoder",)}
  speech_only = [k for k in keys if k[1] == "speech"]
  assert P.restrict_site_map(SITE_MAP, speech_only) == {
      role: sites for role, sites in SITE_MAP.items() if role != "text"}


def test_default_site_map_is_the_family_map():
  from engine.models import site_map_of
  assert P.default_site_map("facebook/seamless-m4t-v2-large") == site_map_of("seamless-tiny")
  no_adaptor = [k for k in seamless_keys() if "adaptor" not in k[2]]
  assert P.default_site_map("seamless-tiny", no_adaptor) == {
      "text": "text_encoder", "speech": ("speech_encoder",)}
  with pytest.raises(ValueError, match="'whisper-large'"):
    P.default_site_map("whisper-large")


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="cross_modal+nonsense"), "unknown comparison plan 'cross_modal\\+nonsense'"),
    (dict(name="cross_modal", site_map={"text": "text_encoder", "speech": "conformer"}),
     "site 'conformer'"),
    (dict(name="cross_modal", site_map={"txt": "text_encoder"}), "'txt'"),
    (dict(name="cross_lingual_text", pivot="fra"), "pivot language 'fra'"),
    (dict(name="cross_modal"), "share no name"),
    (dict(name="adaptor"), "'pre_adaptor'"),
    (dict(name="all", align="depth"), "alignment 'depth'"),
])
def test_plan_errors_name_the_bad_input(kwargs, match):
  kwargs = dict(kwargs)
  with pytest.raises(ValueError, match=match):
    P.make_plan(kwargs.pop("name"), seamless_keys(), **kwargs)


def test_key_errors():
  with pytest.raises(ValueError, match="'eng.text.text_encoder.0' is given twice"):
    P.make_plan("all", [("eng", "text", "text_encoder", 0)] * 2)
  with pytest.raises(ValueError, match="modality 'video'"):
    P.make_plan("all", [("eng", "video", "encoder", 0)])
  with pytest.raises(ValueError, match="not \\(language, modality, site, layer\\)"):
    P.make_plan("all", [("eng", "text", 0)])
  plan = P.make_plan("cross_lingual_text", seamless_keys())
  with pytest.raises(ValueError, match="'swh.text.text_encoder.0'"):
    P.index_pairs(plan, [k for k in seamless_keys() if k[0] != "swh"])


@pytest.mark.parametrize("name,max_pairs", [("all", None), ("all", 7), ("cross_layer", 5),
                                            ("cross_modal+adaptor", None)])
def test_chunks_cover_the_plan_once(name, max_pairs):
  plan = P.make_plan(name, seamless_keys(), site_map=SITE_MAP)
  chunks = P.chunk_plan(plan, max_pairs=max_pairs)
  positions = np.concatenate([c.plan_index for c in chunks])
  assert sorted(positions.tolist()) == list(range(len(plan)))
  for chunk in chunks:
    assert chunk.pairs.dtype == np.int32 and chunk.pairs.shape == (len(chunk.plan_index), 2)
    assert max_pairs is None or len(chunk.plan_index) <= max_pairs
    assert len({(k.site, k.layer) for k in chunk.keys}) <= 2
    for (i, j), p in zip(chunk.pairs, chunk.plan_index):
      assert (chunk.keys[i], chunk.keys[j]) == plan[p][:2]


def test_index_pairs_and_plan_frame():
  keys = seamless_keys()
  plan = P.make_plan("cross_modal", keys, site_map=SITE_MAP)
  idx = P.index_pairs(plan, keys)
  assert idx.shape == (len(plan), 2) and idx.dtype == np.int32
  for (i, j), (a, b, _) in zip(idx, plan):
    assert (keys[i], keys[j]) == (a, b)
  frame = P.plan_frame(plan)
  assert list(frame.columns) == ["site_a", "layer_a", "language_a", "modality_a", "site_b",
                                 "layer_b", "language_b", "modality_b", "family"]
  assert len(frame) == len(plan) and set(frame.family) == {"cross_modal"}
  assert P.plan_keys(plan)[:2] == [plan[0][0], plan[0][1]]
  assert len(P.plan_keys(plan)) == len(LANGS) * (4 + 4 + 2)
