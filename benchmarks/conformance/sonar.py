r"""Conformance of the SONAR adapter against SONAR's own code: the project's side.

  benchmarks/conformance/sonar.sh [VENV_DIR]     # the whole check (builds SONAR's environment)

Stage `prepare` writes WORK/inputs.npz: sentences tokenized by the offline NLLB tokenizer, moved
to fairseq2's vocabulary order (<pad>, <unk>, <s>, </s> first), and seeded 16 kHz waveforms
(odd and even frame counts, so both ends of w2v-BERT's frame stacking are seen). Stage
`compare` loads the fairseq2 checkpoints that benchmarks/conformance/sonar_reference.py built
with SONAR's own factories, converts them with engine.models.convert_sonar, runs the adapter on
the same inputs and compares every site with SONAR's outputs over the valid positions
(max |difference|). It writes --out (JSON) and a markdown table next to it.
"""
from __future__ import annotations

import json
import os
import platform

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("work", "/tmp/xmodal-conformance/work", "Directory shared with SONAR's side.")
flags.DEFINE_enum("stage", "compare", ["prepare", "compare"], "Which half to run.")
flags.DEFINE_string("out", "benchmarks/results/conformance.json", "Results (JSON).")
flags.DEFINE_float("tolerance", 1e-4, "Largest |difference| a check may show.")

# Attention heads are not recoverable from checkpoint shapes: the converter assumes SONAR's 16,
# and the reference is built with them, so the defaults are what is checked.
HEADS = 16
# fairseq2's NLLB vocabulary starts (<pad>, <unk>, <s>, </s>): it inserts <pad> at 0 before
# SentencePiece's (<unk>, <s>, </s>) (fairseq2.models.nllb.tokenizer); transformers' starts
# (<s>, <pad>, </s>, <unk>). Written out here, apart from the converter's own table.
TO_FAIRSEQ2 = {0: 2, 1: 0, 2: 3, 3: 1}
TEXTS = {
    "eng": ["The cat sat on the mat.", "A much longer sentence, so that the batch is padded "
            "at its end and the mask matters.", "Yes."],
    "deu": ["Die Katze sitzt auf der Matte.", "Guten Morgen!"],
}
WAVE_SECONDS = (1.0, 0.7716, 1.3, 0.52)  # 98, 75, 128, 50 fbank frames


# How SONAR's environment was had (benchmarks/conformance/sonar.sh).
ENVIRONMENT = {
    "install": "python3 -m venv VENV; VENV/bin/pip install torch==2.8.0 torchaudio==2.8.0 "
               "fairseq2==0.5.2 fairseq2n==0.5.2 sonar-space==0.5.0 (PyPI)",
    "pins": "sonar-space 0.5.0: fairseq2>=0.5.2, torch, torchaudio (extra 'cpu': "
            "torch==2.6.0+cpu); fairseq2 0.5.2: fairseq2n==0.5.2; fairseq2n 0.5.2 (PyPI "
            "cp311 wheel): torch==2.8.0",
    "torch_build": "PyPI's torch 2.8.0 is the CUDA 12.8 build (its nvidia-* wheels, ~6.7 GB "
                   "in the venv), run on the CPU; the CPU build 2.6.0+cpu named by "
                   "sonar-space's 'cpu' extra is served only by download.pytorch.org, which "
                   "this machine cannot resolve ('curl: (6) Could not resolve host: "
                   "download.pytorch.org'), and PyPI's fairseq2n 0.5.2 needs torch 2.8.0 anyway",
    "system": "fairseq2n loads libsndfile at import ('OSError: fairseq2 requires libsndfile'): "
              "Debian's libsndfile1",
}


def _tree_bytes(root: str) -> int | None:
  if not os.path.exists(os.path.join(root, "bin", "python")):
    return None
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs
             if not os.path.islink(os.path.join(d, f)))


def waves(seed: int = 0) -> list[np.ndarray]:
  """Tones in noise, one per entry of WAVE_SECONDS."""
  rng = np.random.default_rng(seed)
  out = []
  for i, seconds in enumerate(WAVE_SECONDS):
    t = np.arange(int(round(seconds * 16000))) / 16000
    tone = 0.3 * np.sin(2 * np.pi * (180 + 70 * i) * t) * np.hanning(t.size)
    out.append((tone + 0.05 * rng.standard_normal(t.size)).astype(np.float32))
  return out


def prepare(work: str) -> None:
  from engine.models import sonar
  os.makedirs(work, exist_ok=True)
  tokenizer = sonar.tiny_nllb_tokenizer()
  arrays = {"vocab_size": np.array(sonar.TINY_VOCAB)}
  for language, texts in TEXTS.items():
    tokenizer.src_lang = sonar.nllb_code(language)
    batch = tokenizer(texts, padding=True, return_tensors="np")
    ids = np.vectorize(lambda i: TO_FAIRSEQ2.get(int(i), int(i)))(batch["input_ids"])
    arrays[f"text_ids_{language}"] = ids.astype(np.int64)
    arrays[f"text_lens_{language}"] = batch["attention_mask"].sum(1).astype(np.int64)
  audio = waves()
  padded = np.zeros((len(audio), max(a.size for a in audio)), np.float32)
  for i, a in enumerate(audio):
    padded[i, : a.size] = a
  arrays["waves"], arrays["wave_lens"] = padded, np.array([a.size for a in audio])
  np.savez(os.path.join(work, "inputs.npz"), **arrays)


def _diff(ours, mask, theirs) -> tuple[float, float]:
  """(max |ours - theirs|, max |theirs|) over valid positions ([B, T, D] with a [B, T] mask,
  or [B, D])."""
  ours = np.asarray(ours, np.float64)
  theirs = np.asarray(theirs, np.float64)
  if ours.shape[0] != theirs.shape[0] or ours.shape[-1] != theirs.shape[-1]:
    raise ValueError(f"shapes differ: ours {ours.shape}, SONAR's {theirs.shape}")
  if mask is None:
    return float(np.abs(ours - theirs).max()), float(np.abs(theirs).max())
  mask = np.asarray(mask, bool)
  t = min(ours.shape[1], theirs.shape[1])
  if mask[:, t:].any():
    raise ValueError(f"valid positions beyond the reference's {t} frames")
  valid = mask[:, :t]
  return (float(np.abs(ours[:, :t] - theirs[:, :t])[valid].max()),
          float(np.abs(theirs[:, :t])[valid].max()))


def compare(work: str, tolerance: float) -> dict:
  import torch
  from engine.models import convert_sonar, sonar
  from engine.models.common import stacked_fbanks
  torch.set_num_threads(1)
  ref = np.load(os.path.join(work, "reference.npz"))
  inputs = np.load(os.path.join(work, "inputs.npz"))
  with open(os.path.join(work, "reference.json"), encoding="utf-8") as f:
    reference = json.load(f)
  diffs: dict[str, float] = {}
  scales: dict[str, float] = {}
  notes: dict[str, str] = {}

  def record(name: str, value: tuple[float, float | None], note: str) -> None:
    diffs[name] = max(diffs.get(name, 0.0), value[0])
    scales[name] = None if value[1] is None else max(scales.get(name) or 0.0, value[1])
    notes[name] = note

  text_path = os.path.join(work, "sonar_text_encoder.pt")
  if reference["config"]["heads"] != HEADS:
    raise ValueError(f"the reference has {reference['config']['heads']} attention heads; "
                     f"build it with SONAR's {HEADS}, which the converter assumes")
  text = convert_sonar.load_text_encoder(text_path)
  speech_path = os.path.join(work, "speech", "spenc.eng.pt")
  fs1_path = os.path.join(work, "speech_fairseq1", "spenc.v3ap.eng.pt")
  for path in (speech_path, fs1_path):
    if sonar.checkpoint_language(path) != "eng":
      raise ValueError(f"{path}: language read as {sonar.checkpoint_language(path)!r}, not 'eng'")
  speech = convert_sonar.load_speech_encoder(speech_path)
  speech_fs1 = convert_sonar.load_speech_encoder(fs1_path)
  adapter = sonar.SonarAdapter(name="sonar-conformance", tokenizer=sonar.tiny_nllb_tokenizer(),
                               text_encoder=text, speech_encoders={"eng": speech})

  # Text: the adapter's own tokenization, layers and pooling.
  for language, texts in TEXTS.items():
    out = adapter.run_text(texts, language)
    mask = out[("text_encoder", 0)].mask.numpy()
    ids = adapter.tokenizer(texts, padding=True, return_tensors="np")["input_ids"]
    ids = np.vectorize(lambda i: TO_FAIRSEQ2.get(int(i), int(i)))(ids)
    if not np.array_equal(ids, inputs[f"text_ids_{language}"]):
      raise ValueError(f"{language}: the adapter's token ids differ from the prepared inputs")
    layers = len([k for k in ref if k.startswith(f"text_{language}_layer")])
    for l in range(layers):
      record(f"text.layer{l}", _diff(out[("text_encoder", l)].hidden.numpy(), mask,
                                     ref[f"text_{language}_layer{l}"]),
             "0: scaled embeddings + positions; 1..L-1: block outputs; L: final LayerNorm")
    record("text.sentence_embedding", _diff(out[("sentence_embedding", 0)].hidden[:, 0].numpy(),
                                            None, ref[f"text_{language}_embedding"]),
           "masked mean over [lang] tokens </s> (SONAR's Pooling.MEAN)")

  # Speech, model only: the converted encoder on SONAR's own fbanks.
  frames = ref["speech_frames"]
  fbank = torch.from_numpy(ref["speech_fbank"])
  b, t, c = fbank.shape
  stacked = fbank[:, : t - t % 2].reshape(b, t // 2, 2 * c)
  mask = torch.arange(t // 2)[None, :] < torch.from_numpy(frames // 2)[:, None]
  for tag, encoder, what in (("speech_model", speech, "fairseq2 layout"),
                             ("speech_model_fairseq1", speech_fs1, "fairseq1 layout")):
    with torch.inference_mode():
      hidden, embedding = encoder(stacked, mask)
    for l, h in enumerate(hidden):
      record(f"{tag}.layer{l}", _diff(h.numpy(), mask.numpy(), ref[f"speech_layer{l}"]),
             f"converted checkpoint ({what}) on SONAR's fbanks")
    record(f"{tag}.sentence_embedding", _diff(embedding.numpy(), None, ref["speech_embedding"]),
           f"converted checkpoint ({what}) on SONAR's fbanks; attention pooler")

  # Speech, end to end: the adapter's fbanks (transformers' SeamlessM4TFeatureExtractor)
  # against SONAR's (fairseq2n's WaveformToFbankConverter, standardized).
  audio = [inputs["waves"][i, :n] for i, n in enumerate(inputs["wave_lens"])]
  ours, our_mask = stacked_fbanks(adapter.features, audio, 16000, model="SONAR",
                                  device=torch.device("cpu"), dtype=torch.float32)
  if not np.array_equal(our_mask.sum(1).numpy(), frames // 2):
    raise ValueError(f"speech frames: adapter {our_mask.sum(1).tolist()}, "
                     f"SONAR {(frames // 2).tolist()}")
  record("speech.fbank", _diff(ours.numpy(), our_mask.numpy(), stacked.numpy()),
         "stacked 160-dim standardized fbanks, adapter vs SONAR's pipeline")
  out = adapter.run_speech(audio, 16000, "eng")
  for l in range(len(hidden)):
    capture = out[("speech_encoder", l)]
    record(f"speech.layer{l}", _diff(capture.hidden.numpy(), capture.mask.numpy(),
                                     ref[f"speech_layer{l}"]),
           "adapter from waveforms vs SONAR from waveforms")
  ours_embedding = out[("sentence_embedding", 0)].hidden[:, 0].numpy()
  record("speech.sentence_embedding", _diff(ours_embedding, None, ref["speech_embedding"]),
         "adapter from waveforms vs SONAR's model on its fbanks")
  record("speech.sentence_embedding_vs_sonar_pipeline",
         _diff(ours_embedding, None, ref["speech_pipeline_embedding"]),
         "adapter from waveforms vs SONAR's SpeechToEmbeddingModelPipeline.predict")

  for name, value in reference["checks"].items():
    record(f"sonar.{name}", (value, None),
           "within SONAR's environment: its own checkpoint converters read the saved files")

  # SONAR's tokenizer appends its language tokens after the SentencePiece pieces in the order
  # of its card; transformers' NllbTokenizer in FAIRSEQ_LANGUAGE_CODES order, after the same
  # pieces and the same four control tokens: equal orders give equal ids (index differences).
  from transformers.models.nllb import tokenization_nllb  # pylint: disable=import-outside-toplevel
  theirs, ours_codes = reference["nllb_langs"], list(tokenization_nllb.FAIRSEQ_LANGUAGE_CODES)
  if sorted(theirs) != sorted(ours_codes):
    raise ValueError(f"language sets differ: {sorted(set(theirs) ^ set(ours_codes))[:5]}")
  record("text.language_token_index", (float(max(abs(theirs.index(c) - ours_codes.index(c))
                                                 for c in theirs)), None),
         "SONAR's text_sonar_basic_encoder card vs transformers' NLLB codes (index units)")

  # Controls: the same comparison with one deliberate mistake must fail, so the checks above
  # can tell a wrong model from a right one.
  controls = {}
  wrong_text = convert_sonar.load_text_encoder(text_path, num_heads=HEADS // 2)
  wrong = sonar.SonarAdapter(name="control", tokenizer=adapter.tokenizer, text_encoder=wrong_text,
                             speech_encoders={})
  controls["text.sentence_embedding, 8 heads for 16"] = _diff(
      wrong.run_text(TEXTS["eng"], "eng")[("sentence_embedding", 0)].hidden[:, 0].numpy(), None,
      ref["text_eng_embedding"])[0]
  wrong_speech = convert_sonar.load_speech_encoder(speech_path, pooler_heads=HEADS // 2)
  with torch.inference_mode():
    controls["speech_model.sentence_embedding, pooler 8 heads for 16"] = _diff(
        wrong_speech(stacked, mask)[1].numpy(), None, ref["speech_embedding"])[0]
    shifted = torch.cat([stacked[:, 1:], stacked[:, :1]], dim=1)  # frames one step out of line
    controls["speech_model.sentence_embedding, frames shifted by one"] = _diff(
        speech(shifted, mask)[1].numpy(), None, ref["speech_embedding"])[0]
  results = {
      "what": "SONAR adapter (engine.models.convert_sonar + engine.models.sonar) vs SONAR's own "
              "code on tiny random encoders built by SONAR's factories",
      "tolerance": tolerance,
      "checks": {k: {"max_abs_diff": v, "ok": bool(v <= tolerance), "tolerance": tolerance,
                     "max_abs_reference": scales[k], "what": notes[k]}
                 for k, v in diffs.items()},
      "controls": {k: {"max_abs_diff": v, "ok": bool(v > tolerance),
                       "what": "a deliberate mistake; ok when it exceeds the tolerance"}
                   for k, v in controls.items()},
      "reference": reference,
      "environment": {**ENVIRONMENT,
                      "venv_bytes": _tree_bytes(os.path.dirname(os.path.abspath(work)))},
      "project": {"python": platform.python_version(), "torch": torch.__version__,
                  "transformers": __import__("transformers").__version__},
  }
  results["ok"] = all(c["ok"] for part in ("checks", "controls") for c in results[part].values())
  return results


def markdown(results: dict) -> str:
  ref = results["reference"]
  lines = ["# SONAR conformance", "",
           "The adapter against SONAR's own code (" +
           ", ".join(f"{k} {v}" for k, v in ref["versions"].items()) +
           f"), tiny random encoders ({ref['config']}); tolerance {results['tolerance']:g}.", "",
           "| check | max abs diff | max abs SONAR value | ok | what |", "|---|---|---|---|---|"]
  for name, c in results["checks"].items():
    scale = "-" if c["max_abs_reference"] is None else f"{c['max_abs_reference']:.3g}"
    lines.append(f"| {name} | {c['max_abs_diff']:.3g} | {scale} | "
                 f"{'yes' if c['ok'] else 'NO'} | {c['what']} |")
  lines += ["", "Controls (a deliberate mistake each; must exceed the tolerance):", "",
            "| control | max abs diff | ok |", "|---|---|---|"]
  for name, c in results["controls"].items():
    lines.append(f"| {name} | {c['max_abs_diff']:.3g} | {'yes' if c['ok'] else 'NO'} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if FLAGS.stage == "prepare":
    prepare(FLAGS.work)
    return
  results = compare(FLAGS.work, FLAGS.tolerance)
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  with open(os.path.splitext(FLAGS.out)[0] + ".md", "w", encoding="utf-8") as f:
    f.write(markdown(results))
  print(markdown(results))
  if not results["ok"]:
    raise SystemExit(f"SONAR conformance failed; see {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
