"""The language table: the fixed default set, its codes, and how spellings resolve."""
import re

import pytest

from engine.data import languages as L
from engine.data import speech

FLEURS_CONFIGS = (
    "en_us de_de fr_fr es_419 pt_br ru_ru cmn_hans_cn ja_jp ko_kr ar_eg hi_in bn_in tr_tr vi_vn "
    "pl_pl id_id uk_ua fa_ir th_th el_gr sw_ke am_et yo_ng zu_za mn_mn ne_np cy_gb ka_ge ta_in "
    "uz_uz").split()


def test_default_set_is_the_fixed_thirty():
  assert len(L.DEFAULT_LANGUAGES) == 30
  assert [lang.fleurs for lang in L.LANGUAGES] == FLEURS_CONFIGS
  for lang in L.LANGUAGES:
    assert lang.resource == L.RESOURCE_OF_CLASS[lang.joshi_class], lang
  # Spot checks against Joshi et al. 2020's lang2tax.txt.
  joshi = {lang.code: lang.joshi_class for lang in L.LANGUAGES}
  assert [joshi[c] for c in ("eng", "cmn", "arb", "hin", "ben", "swh", "cym", "khk")] == [
      5, 5, 5, 4, 3, 2, 1, 1]
  for code in ("eng", "deu", "fra", "spa", "cmn", "jpn", "arb", "hin", "rus", "swh", "amh"):
    assert code in L.DEFAULT_LANGUAGES


def test_table_columns_and_codes():
  table = L.language_table()
  assert list(table["code"]) == list(L.DEFAULT_LANGUAGES)
  for column in ("name", "fleurs", "nllb", "script", "family", "branch", "joshi_class",
                 "resource", "espeak"):
    assert column in table.columns
  assert table["code"].is_unique and table["nllb"].is_unique and table["fleurs"].is_unique
  for lang in L.LANGUAGES:
    assert re.fullmatch(r"[a-z]{3}_[A-Z][a-z]{3}", lang.nllb), lang
    assert lang.nllb.endswith(lang.script)
  nllb = dict(zip(table["code"], table["nllb"]))
  assert nllb["eng"] == "eng_Latn" and nllb["cmn"] == "zho_Hans" and nllb["arb"] == "arb_Arab"
  assert nllb["pes"] == "pes_Arab" and nllb["khk"] == "khk_Cyrl" and nllb["npi"] == "npi_Deva"
  assert nllb["uzn"] == "uzn_Latn"
  assert table.groupby("resource").size().to_dict() == {"high": 15, "low": 7, "medium": 8}


@pytest.mark.parametrize("given,code", [
    ("eng", "eng"), ("en_us", "eng"), ("EN-us", "eng"), ("eng_Latn", "eng"), ("en", "eng"),
    ("zho", "cmn"), ("cmn", "cmn"), ("cmn_hans_cn", "cmn"), ("zho_Hans", "cmn"),
    ("ara", "arb"), ("ar_eg", "arb"), ("fas", "pes"), ("fa_ir", "pes"), ("swa", "swh"),
    ("sw_ke", "swh"), ("mon", "khk"), ("mn_mn", "khk"), ("nep", "npi"), ("uzb", "uzn"),
    ("es_419", "spa"), ("pt_br", "por"),
])
def test_resolve_language(given, code):
  assert L.resolve_language(given) == code


def test_unknown_language_names_it_and_lists_valid_codes():
  with pytest.raises(ValueError, match=r"'xyz'.*eng, deu"):
    L.resolve_language("xyz")
  with pytest.raises(ValueError, match="'klingon'"):
    L.resolve_languages(["eng", "klingon"])


def test_resolve_languages_order_default_and_duplicates():
  assert L.resolve_languages(None) == list(L.DEFAULT_LANGUAGES)
  assert L.resolve_languages("de_de") == ["deu"]
  assert L.resolve_languages(["sw_ke", "eng"]) == ["swh", "eng"]
  with pytest.raises(ValueError, match="'en_us'.*twice"):
    L.resolve_languages(["eng", "en_us"])
  assert list(L.language_table(["kat", "eng"])["code"]) == ["kat", "eng"]


def test_espeak_voices_exist_and_missing_ones_are_truly_missing():
  files = {identifier.rsplit("/", 1)[-1].lower() for identifier in speech.espeak_info()["voices"]}
  for lang in L.LANGUAGES:
    if lang.espeak is not None:
      assert lang.espeak.lower() in files, lang
      assert speech.espeak_voice(lang.code) == lang.espeak
    else:
      assert not ({lang.code, *lang.aliases} & files), lang
      assert speech.espeak_voice(lang.code) is None
  assert [c for c, v in speech.speech_support(None).items() if v is None] == ["yor", "zul", "khk"]
