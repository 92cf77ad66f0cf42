"""cli.sweep end to end: outputs, scores against the kernel on the stored activations, kill and
resume, refused settings, and the three model families."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine import model_checks, null, pairs, rundir, scoring, settings, svcca
from engine import sweep as S
from engine import table as T
from engine.keys import Key
from engine.store import open_store
from tests import reference
from tests.test_plots import check_png

ROOT = Path(__file__).resolve().parents[1]
LANGS = ("eng", "deu", "swh")
SENTENCES = 16
# Few sentences, so a lower variance threshold keeps ranks well below n (CCA is not degenerate).
THRESHOLD = 0.9
FLAGS = [f"--languages={','.join(LANGS)}", f"--max_sentences={SENTENCES}",
         f"--threshold={THRESHOLD}", "--noprogress"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


def sweep_cli(cache, *args, env=None, timeout=400):
  """`python -m cli.sweep` sharing one corpus cache and one JAX compilation cache (the runs
  compile the same chunk shapes)."""
  env = {**os.environ, "XMODAL_CACHE": str(cache), "PYTHONPATH": str(ROOT),
         "JAX_COMPILATION_CACHE_DIR": str(cache / "jax"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **(env or {})}
  return subprocess.run([sys.executable, "-m", "cli.sweep", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def full(cache, tmp_path_factory):
  """An uninterrupted default-plan sweep of seamless-tiny over three languages."""
  out = tmp_path_factory.mktemp("full")
  done = sweep_cli(cache, *FLAGS, f"--output_dir={out}")
  assert done.returncode == 0, done.stderr[-3000:]
  return out, done.stdout


def test_default_plan_end_to_end(full):
  out, stdout = full
  assert "plan: seamless-tiny on bundled (3 languages" in stdout
  assert "pairs in 7 chunks" in stdout and "cross_lingual_speech" in stdout
  table = pd.read_parquet(out / "results.parquet")
  csv = pd.read_csv(out / "results.csv")
  assert list(table.columns) == list(T.COLUMNS) == list(csv.columns)
  pd.testing.assert_frame_equal(T.validate_table(csv), T.validate_table(table))
  assert set(table.family) == {"cross_modal", "cross_lingual_text", "cross_lingual_speech",
                               "adaptor"}
  assert (table.model == "seamless-tiny").all() and (table.metric == "svcca").all()
  assert (table.n == SENTENCES).all() and table.score.between(0, 1 + 1e-6).all()
  assert ((table.rank_a >= 1) & (table.rank_b >= 1)).all()
  # Every language appears, text and speech, at every layer of the main sites.
  cm = table[(table.family == "cross_modal") & (table.site_b == "speech_encoder")]
  assert sorted(zip(cm.language_a, cm.layer_a)) == sorted(
      (lang, layer) for lang in LANGS for layer in range(4))
  assert (table.language_a.unique() == list(LANGS)).all()  # the requested order
  summary = json.loads((out / "summary.json").read_text())
  assert summary["rows"] == len(table) and summary["languages"] == list(LANGS)
  assert summary["families"]["adaptor"] == len(LANGS)
  for name in ("similarity_by_layer", "gaps_by_layer", "adaptor_effect", "languages_layer03"):
    check_png(out / "plots" / f"{name}.png")
  assert f"{len(table)} pairs; summary:" in stdout


def _keys_and_pairs(rows: pd.DataFrame) -> tuple[list[Key], np.ndarray]:
  """The representations of table rows (first-use order) and each row's [2] indices into them."""
  sides = [[f"{c}_{side}" for c in ("language", "modality", "site", "layer")] for side in "ab"]
  keys = list(dict.fromkeys(Key(*r) for cols in sides for r in rows[cols].itertuples(index=False)))
  position = {k: i for i, k in enumerate(keys)}
  index = np.array([[position[Key(*r[:4])], position[Key(*r[4:])]]
                    for r in rows[sides[0] + sides[1]].itertuples(index=False)])
  return keys, index


def test_scores_equal_the_kernel_on_stored_activations(full):
  out, _ = full
  table = pd.read_parquet(out / "results.parquet")
  store = open_store(out / rundir.STORE_DIR)
  keys, index = _keys_and_pairs(table)
  reps = [np.asarray(store.load(k)) for k in keys]
  expected = svcca.pairwise_svcca(reps, pairs=index, threshold=THRESHOLD)
  np.testing.assert_allclose(table.score, expected, atol=1e-5, rtol=0)
  # And one pair of each family against the NumPy reference (float64, per pair).
  for _, row in table.groupby("family").head(1).iterrows():
    a = store.load((row.language_a, row.modality_a, row.site_a, row.layer_a))
    b = store.load((row.language_b, row.modality_b, row.site_b, row.layer_b))
    assert row.score == pytest.approx(
        reference.svcca(np.float64(a), np.float64(b), threshold=THRESHOLD), abs=1e-4)


def test_killed_sweep_resumes_to_an_identical_table(full, cache, tmp_path):
  """SIGKILLed after two chunks (its activations are the full run's, so it starts at the pair
  stage), then restarted with the same flags: the same table, to the bit."""
  out = tmp_path / "killed"
  out.mkdir()
  shutil.copytree(full[0] / rundir.STORE_DIR, out / rundir.STORE_DIR)
  shutil.copy(full[0] / rundir.STATE_JSON, out / rundir.STATE_JSON)
  killed = sweep_cli(cache, *FLAGS, f"--output_dir={out}", "--noreport",
                     env={scoring.KILL_AFTER_ENV: "2"})
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert not (out / "results.parquet").exists() and (out / rundir.CHECKPOINT_DIR).is_dir()
  again = sweep_cli(cache, *FLAGS, f"--output_dir={out}", "--noreport")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "pairs already scored" in again.stdout and "(5 of 7 chunks in this run)" in again.stdout
  resumed = pd.read_parquet(out / "results.parquet")
  pd.testing.assert_frame_equal(resumed, pd.read_parquet(full[0] / "results.parquet"),
                                check_exact=True)
  assert np.isfinite(resumed[["null_mean", "null_sd", "z", "p_value"]].to_numpy()).all()


def test_other_settings_on_an_existing_sweep_are_refused(full, cache):
  out, _ = full
  done = sweep_cli(cache, *FLAGS, f"--output_dir={out}", "--metric=cka")
  assert done.returncode == 1 and done.stdout == ""
  err = done.stderr.strip()
  assert err.count("\n") == 0 and "Traceback" not in err
  assert err.startswith(f"sweep: error: {out} holds a sweep with other settings "
                        "(--metric=svcca there, --metric=cka now)")
  assert "new --output_dir, or --overwrite" in err
  # The library says the same, naming every differing setting.
  config = settings.check(settings.of(languages=("en", "de", "sw"), max_sentences=SENTENCES,
                                      output_dir=str(out), threshold=0.8, pivot="eng"))
  with pytest.raises(settings.SweepError, match=r"--threshold=0.9 there, --threshold=0.8 now; "
                                                r"--pivot=\(unset\) there, --pivot=eng now"):
    rundir.prepare(out, settings.identity(config))


@pytest.mark.parametrize("changes, message", [
    (dict(languages=("xx",)), "unknown language 'xx'"),
    (dict(plan="cross_modal+diagonal"), "--plan=cross_modal+diagonal: unknown plan 'diagonal'"),
    (dict(metric="cosine"), "--metric=cosine is not one of svcca, pwcca, cka"),
    (dict(threshold=1.5), "--threshold=1.5 is not in (0, 1]"),
    (dict(devices="many"), "--devices=many is not 'auto', 'all' or a device count"),
    (dict(pivot="fra"), "--pivot=fra is not among the sweep's languages"),
    (dict(model="mystery"), "cannot tell which model family 'mystery' is"),
    (dict(chunk_pairs=0), "--chunk_pairs=0 must be at least 1"),
    (dict(max_sentences=1), "--max_sentences=1 must be at least 2"),
    (dict(layers=("1", "x")), "--layers=1,x: layers must be integers"),
    (dict(pooling="median"), "--pooling=median is not one of mean, max, first, last"),
    (dict(kernel_dtype="float16"), "--kernel_dtype=float16 is not one of float32, float64"),
    (dict(permutations=-1), "--permutations=-1 must be 0 (no null) or at least 2"),
    (dict(null_seed=-3), "--null_seed=-3 must be at least 0"),
    (dict(svd_dims=0), "--svd_dims=0 must be at least 1"),
    (dict(svd_dims=8, metric="cka"), "--svd_dims=8 applies to svcca and pwcca"),
    (dict(svd_dims=8, max_sentences=8), "--svd_dims=8 must be below the number of sentences n=8"),
])
def test_bad_settings_are_named(changes, message):
  with pytest.raises(ValueError) as e:
    checked = settings.check(settings.of(**{"languages": LANGS, **changes}))
    model_checks.check_model(checked.model)
  assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("model, families", [
    ("sonar-tiny", {"cross_modal", "cross_lingual_text", "cross_lingual_speech"}),
    ("salmonn-tiny", {"cross_modal", "cross_lingual_text", "cross_lingual_speech", "adaptor"}),
])
def test_other_models_sweep_end_to_end(model, families, cache, tmp_path, monkeypatch):
  monkeypatch.setenv("XMODAL_CACHE", str(cache))
  config = settings.of(model=model, languages=("eng", "deu"), max_sentences=12, layers=(-1,),
                       threshold=THRESHOLD, output_dir=str(tmp_path), progress=False,
                       permutations=0)
  result = S.run_sweep(config, log=lambda line: None)
  table = T.load_table(tmp_path)
  assert set(table.family) == families and len(table) == len(result.plan)
  assert {"text", "speech"} <= set(table.modality_a) | set(table.modality_b)
  assert np.isfinite(table.score).all() and table.score.between(0, 1 + 1e-6).all()
  # --permutations=0: no null, NaN columns, and the sweep says so.
  assert table[["null_mean", "null_sd", "z", "p_value"]].isna().all().all()
  assert (table.permutations == 0).all()
  assert json.loads((tmp_path / rundir.STATE_JSON).read_text())["null"]["permutations"] == 0
  store = open_store(tmp_path / rundir.STORE_DIR)
  row = table[table.family == "cross_modal"].iloc[-1]
  a = store.load((row.language_a, row.modality_a, row.site_a, row.layer_a))
  b = store.load((row.language_b, row.modality_b, row.site_b, row.layer_b))
  expected = svcca.pairwise_svcca([a, b], pairs=[[0, 1]], threshold=THRESHOLD)[0]
  assert row.score == pytest.approx(float(expected), abs=1e-5)
  if model == "salmonn-tiny":
    adaptor = table[table.family == "adaptor"]
    assert set(zip(adaptor.site_a, adaptor.site_b)) == {("whisper", "qformer")}
  if model == "sonar-tiny":
    assert "sentence_embedding" in set(table.site_b)


def test_more_devices_than_there_are_fails_before_any_work(tmp_path):
  out = tmp_path / "sweep"
  with pytest.raises(settings.SweepError, match=r"--devices=99: only \d+ \w+ device\(s\) are available"):
    S.run_sweep(settings.of(languages=LANGS, devices="99", output_dir=str(out)),
                log=lambda line: None)
  assert not out.exists()


def test_identity_is_the_corpus_model_and_scoring_groups():
  """Every setting of those groups is in the identity, by flag name; none of the Run group."""
  ident = settings.identity(settings.check(settings.of(languages=LANGS)))
  groups = (settings.Corpus, settings.Model, settings.Scoring)
  assert list(ident) == [name for g in groups for name, _, _ in settings.flag_fields(g)]
  run = {name for name, _, _ in settings.flag_fields(settings.Run)}
  assert not run & set(ident) and {"output_dir", "devices", "chunk_pairs"} <= run
  assert ident["languages"] == list(LANGS) and ident["kernel_dtype"] == "float32"


@pytest.mark.parametrize("flags, message", [
    (["--max_sentences=1"], "--max_sentences=1 must be at least 2"),
    (["--layers=a"], "--layers=a: layers must be integers"),
    (["--permutations=-5"], "--permutations=-5 must be 0 (no null) or at least 2"),
    (["--max_sentences=12", "--svd_dims=20"],
     "--svd_dims=20 must be below the number of sentences n=12 (centred data has rank at most "
     "n - 1)"),
    (["--bootstrap=-1"], "--bootstrap=-1 must be 0 (off) or at least 2 replicates"),
    (["--bootstrap=1"], "--bootstrap=1 must be 0 (off) or at least 2 replicates"),
    (["--languages=eng,deu", "--bootstrap=3"],
     "--bootstrap=3 needs at least 3 languages in --languages for its intervals, got 2"),
    (["--bootstrap=3", "--noreport"],
     "--bootstrap=3 writes its intervals into summary.json; drop --noreport or --bootstrap"),
    (["--bootstrap=3", "--bootstrap_seed=-2"], "--bootstrap_seed=-2 must be at least 0"),
])
def test_bad_flags_are_refused_before_any_work(cache, tmp_path, flags, message):
  out = tmp_path / "sweep"
  done = sweep_cli(cache, "--languages=eng,deu,swh", f"--output_dir={out}", *flags,
                   timeout=120)
  assert done.returncode == 1 and done.stderr.strip() == f"sweep: error: {message}"
  assert not out.exists()


def _plan_of(table: pd.DataFrame) -> list:
  sides = [[f"{c}_{side}" for c in ("language", "modality", "site", "layer")] for side in "ab"]
  return [(Key(*r[:4]), Key(*r[4:8]), r[8]) for r in
          table[sides[0] + sides[1] + ["family"]].itertuples(index=False)]


def test_bootstrap_rescorer_reproduces_the_table_and_the_reference(full):
  """The sentence bootstrap's rescorer, under the sweep's settings: on the sentences as drawn it
  is the table; on a resample, each family's first pair is the float64 reference's on the
  resampled rows."""
  from engine import uncertainty  # pylint: disable=import-outside-toplevel
  out, _ = full
  table = pd.read_parquet(out / "results.parquet")
  store = open_store(out / rundir.STORE_DIR)
  rescore = uncertainty.plan_rescorer(store.load, _plan_of(table), metric="svcca",
                                      threshold=THRESHOLD, dtype="float32")
  np.testing.assert_allclose(rescore(np.arange(SENTENCES)), table.score, atol=1e-5, rtol=0)
  rows = np.random.default_rng(5).integers(0, SENTENCES, SENTENCES)
  resampled = rescore(rows)
  for i, row in table.groupby("family").head(1).iterrows():
    a = np.float64(store.load((row.language_a, row.modality_a, row.site_a, row.layer_a)))[rows]
    b = np.float64(store.load((row.language_b, row.modality_b, row.site_b, row.layer_b)))[rows]
    assert resampled[table.index.get_loc(i)] == pytest.approx(
        reference.svcca(a, b, threshold=THRESHOLD), abs=1e-4)


def test_bootstrap_on_a_finished_sweep_adds_sentence_intervals(full, cache, tmp_path):
  """--bootstrap is not part of the identity: a finished sweep resumes with it, the table stays
  as it was, and summary.json and the closing lines gain intervals over sentences; another B
  and seed rewrite them."""
  out = tmp_path / "sweep"
  shutil.copytree(full[0], out)
  before = pd.read_parquet(out / "results.parquet")
  for replicates, seed in ((3, 0), (4, 1)):
    done = sweep_cli(cache, *FLAGS, f"--output_dir={out}", f"--bootstrap={replicates}",
                     f"--bootstrap_seed={seed}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"sentence bootstrap: {replicates} replicates in " in done.stdout
    assert "s per replicate)" in done.stdout
    assert f"over sentences [" in done.stdout and f"({replicates} replicates" in done.stdout
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), before)
    found = json.loads((out / T.SUMMARY_JSON).read_text())["findings"]
    assert found and all(f["sentence_replicates"] == replicates for f in found)
    bounded = [f for f in found if f["sentence_ci_low"] is not None]
    assert bounded and all(f["sentence_ci_low"] <= f["sentence_ci_high"] for f in bounded)
    assert all(f["text"] in done.stdout for f in found)
  ident = settings.identity(settings.check(settings.of(languages=LANGS, bootstrap=3)))
  assert not {"bootstrap", "bootstrap_seed"} & set(ident)


def test_svd_dims_above_the_corpus_is_refused_before_the_model_runs(cache, tmp_path):
  """n is the corpus' (64 bundled sentences): known once it is loaded, before any extraction."""
  out = tmp_path / "sweep"
  done = sweep_cli(cache, "--languages=eng", "--modalities=text", f"--output_dir={out}",
                   "--svd_dims=64", timeout=200)
  assert done.returncode == 1
  assert done.stderr.strip() == ("sweep: error: --svd_dims=64 must be below the number of "
                                 "sentences n=64 (centred data has rank at most n - 1)")
  assert not list(out.glob(f"{rundir.STORE_DIR}*"))


class _Held:
  """A store's `load` for one array (what PlaceBases reads)."""

  def __init__(self, x):
    self.x = x

  def load(self, key):
    del key
    return self.x


def test_svd_dims_above_a_representations_rank_names_it_and_the_flag():
  rng = np.random.default_rng(0)
  full = rng.standard_normal((20, 12))
  low = rng.standard_normal((20, 3)) @ rng.standard_normal((3, 12))  # rank 3
  a, b = Key("eng", "text", "t", 0), Key("deu", "text", "t", 0)
  plan = [(a, b, "cross_lingual_text")]
  chunks = pairs.chunk_plan(plan)
  places = scoring.PlaceBases({a: _Held(full), b: _Held(low)}, 20, [a, b], chunks,
                              metric="svcca", threshold=0.99, dtype="float32", dims=5)
  with pytest.raises(settings.SweepError) as e:
    places.bases(chunks[0])
  assert str(e.value).startswith("--svd_dims=5: deu.text.t.0: numerical rank 3 is below")
  assert "\n" not in str(e.value)


def test_null_columns_equal_the_null_kernel_on_stored_activations(full):
  """null_mean, null_sd, z and p_value are engine.null's for the stored representations, with
  the run's one seeded set of permutations (recorded in sweep.json)."""
  out, _ = full
  table = pd.read_parquet(out / "results.parquet")
  state = json.loads((out / rundir.STATE_JSON).read_text())
  assert state["null"] == {"permutations": 200, "seed": 0, "n": SENTENCES}
  assert (table.permutations == 200).all()
  store = open_store(out / rundir.STORE_DIR)
  rows = table.groupby("family").head(4)
  keys, index = _keys_and_pairs(rows)
  bases = svcca.compute_bases([np.asarray(store.load(k)) for k in keys], threshold=THRESHOLD,
                              warn=False)
  expected = null.finish(null.pair_null(bases, index, null.permutations(SENTENCES, 200, 0),
                                        metric="svcca"), 200)
  for column in ("score", "null_mean", "null_sd"):
    np.testing.assert_allclose(rows[column], expected[column], rtol=0, atol=1e-5)
  np.testing.assert_allclose(rows.z, (rows.score - rows.null_mean) / rows.null_sd, rtol=1e-9)
  np.testing.assert_allclose(rows.p_value, expected["p_value"], rtol=0, atol=1.01 / 201)
  assert (rows.p_value.to_numpy() == expected["p_value"]).mean() > 0.9


def test_refused_output_dir_is_reported_without_loading_torch(full, tmp_path):
  """Claiming a directory needs no model code: another sweep's settings are refused first."""
  out, _ = full
  code = ("import sys; from engine import settings, sweep\n"
          "try:\n"
          f"  sweep.run_sweep(settings.of(languages={LANGS!r}, output_dir={str(out)!r}))\n"
          "except settings.SweepError as e:\n"
          "  print('torch' in sys.modules, e)\n")
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
  assert done.stdout.startswith("False ") and "other settings" in done.stdout, done.stderr


def test_dtype_flag_is_an_alias_of_kernel_dtype(full, cache):
  """--dtype (the flag's old name) sets --kernel_dtype: here it differs from the stored sweep."""
  out, _ = full
  done = sweep_cli(cache, *FLAGS, f"--output_dir={out}", "--dtype=float64", timeout=120)
  assert done.returncode == 1
  assert "(--kernel_dtype=float32 there, --kernel_dtype=float64 now)" in done.stderr
