"""Flags that choose the corpus, the model and how it is run: one set for cli.sweep and
cli.extract, so the two commands read the same words the same way."""
from absl import flags

flags.DEFINE_string("model", "seamless-tiny",
                    "seamless-tiny | seamless-v1-tiny | seamless-mid | sonar-tiny | "
                    "salmonn-tiny (random, offline), a hub id such as "
                    "facebook/seamless-m4t-v2-large, or a local directory.")
flags.DEFINE_enum("source", "bundled", ["bundled", "fleurs"],
                  "Corpus: the bundled offline corpus (espeak-ng speech) or FLEURS.")
flags.DEFINE_string("fleurs_dir", None, "Local FLEURS copy (see engine.data.fleurs); without it "
                    "FLEURS comes from the Hub.")
flags.DEFINE_string("split", "test", "FLEURS split.")
flags.DEFINE_integer("max_sentences", None, "Keep only the first N sentence ids (quick runs).")
flags.DEFINE_list("languages", None, "Language codes (any accepted alias); default: the 30 "
                  "default languages, all of them bundled.")
flags.DEFINE_list("modalities", ["text", "speech"], "text, speech or both.")
flags.DEFINE_list("sites", None, "Sites to extract (default: every site of the model).")
flags.DEFINE_list("layers", None, "Layer indices for every site, negative from the end "
                  "(default: all).")
flags.DEFINE_enum("pooling", "mean", ["mean", "max", "first", "last"],
                  "Pooling over valid positions.")
flags.DEFINE_string("device", "auto", "Torch device of the model: cpu, cuda, cuda:1, ... or "
                    "auto (cuda when available).")
flags.DEFINE_integer("batch_size", 16, "Most sentences per extraction batch.")
flags.DEFINE_float("max_speech_seconds", None, "Cap on a speech batch's padded duration.")
flags.DEFINE_string("cache_dir", None, "Corpus / speech cache (default $XMODAL_CACHE or "
                    "~/.cache/xmodal-svcca).")
flags.DEFINE_bool("progress", True, "Show progress bars.")
