"""Parallel text and speech corpora in one record format (see engine.data.corpus).

load_bundled: the offline default, 64 sentences in 30 languages with espeak-ng speech.
load_fleurs: FLEURS (google/fleurs) through `datasets`, from the Hub or a local copy.
load_corpus: either, as a run's settings name it.
"""
from engine.data.bundled import bundled_languages, load_bundled
from engine.data.corpus import COLUMNS, FEATURES, SAMPLING_RATE, corpus_info, first_sentences
from engine.data.fleurs import load_fleurs
from engine.data.languages import (DEFAULT_LANGUAGES, LANGUAGES, Language, get_language,
                                   language_table, resolve_language, resolve_languages)
from engine.data.sources import SOURCES, load_corpus
from engine.data.speech import speech_support, synthesize
