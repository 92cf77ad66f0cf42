"""engine.models' registry: one reading of a model name, site maps declared by each family."""
import json

import pytest

from engine import models
from engine.models import base, registry

TINY = ("seamless-tiny", "sonar-tiny", "salmonn-tiny", "qwen2-audio-tiny", "voxtral-tiny",
        "qwen2.5-omni-tiny", "audioflamingo3-tiny", "wav2vec2-tiny", "xlm-r-tiny")


@pytest.mark.parametrize("model,family", [
    ("seamless-tiny", "seamless"), ("seamless-v1-mid", "seamless"),
    ("facebook/seamless-m4t-v2-large", "seamless"), ("sonar-tiny", "sonar"),
    ("/models/SONAR_200_text_encoder", "sonar"), ("salmonn-7b", "salmonn"),
    ("salmonn-tiny", "salmonn")])
def test_names_resolve_to_their_family(model, family):
  assert models.family_of(model) == family


def test_local_directory_by_config_model_type(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "seamless_m4t"}))
  assert models.family_of(str(tmp_path)) == "seamless"
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper"}))
  assert models.family_of(str(tmp_path)) == "speech-encoders"
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match=f"model '{tmp_path}' has model type 'bert', which no "
                                       "adapter takes"):
    models.family_of(str(tmp_path))


def test_unknown_names_are_refused_naming_the_families():
  with pytest.raises(ValueError, match=r"'whisper-large'.*\['audioflamingo3', 'qwen2-audio', "
                                       r"'qwen2.5-omni', 'salmonn', 'seamless', 'sonar', "
                                       r"'speech-encoders', 'text-encoders', 'voxtral'\]"):
    models.site_map_of("whisper-large")


def test_every_family_is_registered_once_with_valid_roles():
  cards = registry.families()
  assert sorted(cards) == sorted(registry.MODULES)
  names = [c.name for c in cards.values()]
  assert len(set(names)) == len(names)
  for card in cards.values():
    assert set(card.site_map) <= set(base.SITE_MAP_ROLES)
    assert {"text", "speech"} <= set(card.site_map)


@pytest.mark.parametrize("model", TINY)
def test_site_map_of_a_name_is_the_adapters_and_names_its_sites(model):
  adapter = models.get_adapter(model)
  assert adapter.site_map == models.site_map_of(model)
  sites = {(s.name, s.modality) for s in adapter.sites()}
  for role, value in adapter.site_map.items():
    modality = "text" if role == "text" else "speech"
    for site in ([value] if isinstance(value, str) else value):
      assert (site, modality) in sites, (role, site)
  assert adapter.describe()["family"] == models.family_of(model)


def test_family_cards_refuse_unknown_roles_and_adapters_without_one():
  with pytest.raises(ValueError, match=r"'txt'"):
    base.Family(name="x", random="x-tiny$", site_map={"txt": "a", "speech": "b"})

  class Bare(base.Adapter):
    def sites(self):
      return []

    def run_text(self, texts, language):
      return {}

    def run_speech(self, audios, sampling_rate, language):
      return {}

  with pytest.raises(ValueError, match="declares no family"):
    _ = Bare().site_map
