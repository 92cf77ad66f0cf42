"""The language table: one row per language, so analyses can group by resource, script, family.

The canonical code is the SeamlessM4T 3-letter code ('eng', 'cmn', 'arb', ...). Every other
spelling people type (ISO 639-1/639-3 macro-language codes, FLEURS configs, NLLB codes) is an
alias resolved here, so the rest of the engine only ever sees canonical codes.

`espeak` is the espeak-ng voice that reads the language natively; None where espeak-ng has no
voice for it (speech for those languages is reported missing, never read by another voice).

`joshi_class` is the language's class in Joshi et al. 2020, "The State and Fate of Linguistic
Diversity and Inclusion in the NLP World" (ACL 2020), from the authors' released table
lang2tax.txt (https://microsoft.github.io/linguisticdiversity/assets/lang2tax.txt; 0 = "the
left-behinds" ... 5 = "the winners"), read by language name: Mandarin Chinese is 'mandarin',
Modern Standard Arabic 'arabic', Western Persian 'persian', Halh Mongolian 'mongolian' (the
table also lists 'khalkha' at 0; 'mongolian' is the entry for the standard language),
Northern Uzbek 'uzbek'. `resource` is derived from it, never assigned by hand
(`RESOURCE_OF_CLASS`): classes 4-5 are high, 3 medium, 0-2 low resource, the grouping
commonly used with this taxonomy. In the default thirty that gives 15 high, 8 medium and 7 low.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import pandas as pd

RESOURCE_GROUPS = ("high", "medium", "low")
RESOURCE_OF_CLASS = {5: "high", 4: "high", 3: "medium", 2: "low", 1: "low", 0: "low"}


@dataclasses.dataclass(frozen=True)
class Language:
  """One language: its codes in every system we talk to, and the facts analyses group by."""
  code: str  # SeamlessM4T code, canonical
  name: str
  fleurs: str  # FLEURS config
  nllb: str  # NLLB / SONAR code, language_Script
  script: str  # ISO 15924
  family: str
  branch: str
  joshi_class: int  # Joshi et al. 2020 class, 0-5
  resource: str  # high | medium | low, from joshi_class
  espeak: str | None  # espeak-ng voice name
  aliases: tuple[str, ...] = ()


def _lang(code, name, fleurs, nllb, family, branch, joshi_class, espeak, *aliases):
  return Language(code=code, name=name, fleurs=fleurs, nllb=nllb, script=nllb.split("_")[1],
                  family=family, branch=branch, joshi_class=joshi_class,
                  resource=RESOURCE_OF_CLASS[joshi_class], espeak=espeak, aliases=tuple(aliases))


_IE = "Indo-European"
_AA = "Afro-Asiatic"
_NC = "Niger-Congo"

LANGUAGES: tuple[Language, ...] = (
    _lang("eng", "English", "en_us", "eng_Latn", _IE, "Germanic", 5, "en-us", "en"),
    _lang("deu", "German", "de_de", "deu_Latn", _IE, "Germanic", 5, "de", "de", "ger"),
    _lang("fra", "French", "fr_fr", "fra_Latn", _IE, "Romance", 5, "fr", "fr", "fre"),
    _lang("spa", "Spanish", "es_419", "spa_Latn", _IE, "Romance", 5, "es-419", "es"),
    _lang("por", "Portuguese", "pt_br", "por_Latn", _IE, "Romance", 4, "pt-br", "pt"),
    _lang("rus", "Russian", "ru_ru", "rus_Cyrl", _IE, "Balto-Slavic", 4, "ru", "ru"),
    _lang("cmn", "Mandarin Chinese", "cmn_hans_cn", "zho_Hans", "Sino-Tibetan", "Sinitic", 5,
          "cmn", "zho", "zh", "chi", "zho_Hans", "cmn_Hans"),
    _lang("jpn", "Japanese", "ja_jp", "jpn_Jpan", "Japonic", "Japanese", 5, "ja", "ja"),
    _lang("kor", "Korean", "ko_kr", "kor_Hang", "Koreanic", "Korean", 4, "ko", "ko"),
    _lang("arb", "Modern Standard Arabic", "ar_eg", "arb_Arab", _AA, "Semitic", 5, "ar",
          "ara", "ar"),
    _lang("hin", "Hindi", "hi_in", "hin_Deva", _IE, "Indo-Aryan", 4, "hi", "hi"),
    _lang("ben", "Bengali", "bn_in", "ben_Beng", _IE, "Indo-Aryan", 3, "bn", "bn"),
    _lang("tur", "Turkish", "tr_tr", "tur_Latn", "Turkic", "Oghuz", 4, "tr", "tr"),
    _lang("vie", "Vietnamese", "vi_vn", "vie_Latn", "Austroasiatic", "Vietic", 4, "vi", "vi"),
    _lang("pol", "Polish", "pl_pl", "pol_Latn", _IE, "Balto-Slavic", 4, "pl", "pl"),
    _lang("ind", "Indonesian", "id_id", "ind_Latn", "Austronesian", "Malayo-Polynesian", 3,
          "id", "id"),
    _lang("ukr", "Ukrainian", "uk_ua", "ukr_Cyrl", _IE, "Balto-Slavic", 3, "uk", "uk"),
    _lang("pes", "Western Persian", "fa_ir", "pes_Arab", _IE, "Iranian", 4, "fa", "fas",
          "per", "fa"),
    _lang("tha", "Thai", "th_th", "tha_Thai", "Kra-Dai", "Tai", 3, "th", "th"),
    _lang("ell", "Greek", "el_gr", "ell_Grek", _IE, "Hellenic", 3, "el", "gre", "el"),
    _lang("swh", "Swahili", "sw_ke", "swh_Latn", _NC, "Bantu", 2, "sw", "swa", "sw"),
    _lang("amh", "Amharic", "am_et", "amh_Ethi", _AA, "Semitic", 2, "am", "am"),
    _lang("yor", "Yoruba", "yo_ng", "yor_Latn", _NC, "Volta-Niger", 2, None, "yo"),
    _lang("zul", "Zulu", "zu_za", "zul_Latn", _NC, "Bantu", 2, None, "zu"),
    _lang("khk", "Halh Mongolian", "mn_mn", "khk_Cyrl", "Mongolic", "Mongolian", 1, None,
          "mon", "mn"),
    _lang("npi", "Nepali", "ne_np", "npi_Deva", _IE, "Indo-Aryan", 1, "ne", "nep", "ne"),
    _lang("cym", "Welsh", "cy_gb", "cym_Latn", _IE, "Celtic", 1, "cy", "wel", "cy"),
    _lang("kat", "Georgian", "ka_ge", "kat_Geor", "Kartvelian", "Georgian", 3, "ka", "geo",
          "ka"),
    _lang("tam", "Tamil", "ta_in", "tam_Taml", "Dravidian", "Southern Dravidian", 3, "ta",
          "ta"),
    _lang("uzn", "Northern Uzbek", "uz_uz", "uzn_Latn", "Turkic", "Karluk", 3, "uz", "uzb",
          "uz"),
)

DEFAULT_LANGUAGES: tuple[str, ...] = tuple(lang.code for lang in LANGUAGES)

_BY_CODE = {lang.code: lang for lang in LANGUAGES}


def _build_aliases() -> dict[str, str]:
  table: dict[str, str] = {}
  for lang in LANGUAGES:
    for alias in (lang.code, lang.fleurs, lang.nllb, *lang.aliases):
      key = alias.lower()
      if table.setdefault(key, lang.code) != lang.code:
        raise AssertionError(f"language alias {alias!r} is ambiguous")
  return table


_ALIASES = _build_aliases()


def resolve_language(code: str) -> str:
  """Canonical code for a canonical code, ISO 639 alias, FLEURS config or NLLB code."""
  if not isinstance(code, str):
    raise ValueError(f"language must be a string code, got {code!r}")
  key = code.strip().lower().replace("-", "_")
  if key in _ALIASES:
    return _ALIASES[key]
  raise ValueError(
      f"unknown language {code!r}; valid codes are {', '.join(DEFAULT_LANGUAGES)} "
      "(also accepted: their ISO 639-1/639-3 aliases, FLEURS configs such as 'en_us', "
      "NLLB codes such as 'eng_Latn')")


def resolve_languages(languages: str | Iterable[str] | None) -> list[str]:
  """Canonical codes in the given order; None means DEFAULT_LANGUAGES. Duplicates are an error."""
  if languages is None:
    return list(DEFAULT_LANGUAGES)
  if isinstance(languages, str):
    languages = [languages]
  codes = [resolve_language(code) for code in languages]
  seen: set[str] = set()
  for given, code in zip(languages, codes):
    if code in seen:
      raise ValueError(f"language {given!r} ({code}) is requested twice")
    seen.add(code)
  if not codes:
    raise ValueError("no languages requested")
  return codes


def get_language(code: str) -> Language:
  """The table row of a language, under any accepted spelling."""
  return _BY_CODE[resolve_language(code)]


def language_table(languages: Sequence[str] | None = None) -> pd.DataFrame:
  """The table as a DataFrame (one row per language, in request order) for grouping results."""
  rows = [dataclasses.asdict(_BY_CODE[code]) for code in resolve_languages(languages)]
  frame = pd.DataFrame(rows)
  frame["aliases"] = frame["aliases"].map(lambda a: ",".join(a))
  return frame
