"""The name of one representation: (language, modality, site, layer), shared by the store, the
plans and the sweep. Plain Python, so anything may import it (no NumPy, JAX or torch).

A sweep over several models names each model's sites by the model ('sonar-tiny/text_encoder',
`model_site`), so the plans, the chunks and the kernel tell the models apart with no other
field; a store holds one model's plain sites.
"""
from __future__ import annotations

import re
from typing import Iterable, NamedTuple

MODALITIES = ("text", "speech")
_PART = re.compile(r"^[A-Za-z0-9_\-]+$")
_SITE = re.compile(r"^(?:[A-Za-z0-9_\-]+/)?[A-Za-z0-9_\-]+$")
MODEL_SEP = "/"


class Key(NamedTuple):
  """Names one representation. Equal to (and hashes like) any 4-tuple with the same fields."""
  language: str
  modality: str
  site: str
  layer: int

  @property
  def name(self) -> str:
    return f"{self.language}.{self.modality}.{self.site}.{self.layer}"

  @classmethod
  def parse(cls, name: str) -> "Key":
    """'eng.text.text_encoder.3' -> Key('eng', 'text', 'text_encoder', 3)."""
    parts = name.split(".")
    if len(parts) != 4 or not parts[3].lstrip("-").isdigit():
      raise ValueError(f"representation name {name!r} is not 'language.modality.site.layer'")
    return cls(parts[0], parts[1], parts[2], int(parts[3]))


def as_key(key: Key | tuple | str) -> Key:
  """A Key from a Key, a 4-tuple or a 'language.modality.site.layer' name, checked once here:
  four parts, a known modality, file-name-safe parts, an integer layer."""
  if isinstance(key, str):
    key = Key.parse(key)
  try:
    language, modality, site, layer = key
  except (TypeError, ValueError):
    raise ValueError(f"representation key {key!r} is not (language, modality, site, layer)"
                     ) from None
  for part, form in ((language, _PART), (modality, _PART), (site, _SITE)):
    if not isinstance(part, str) or not form.match(part):
      raise ValueError(f"representation key {tuple(key)!r}: {part!r} must be letters, digits, "
                       "'_' or '-'")
  if modality not in MODALITIES:
    raise ValueError(f"representation key {tuple(key)!r}: modality {modality!r} is not one of "
                     f"{MODALITIES}")
  return Key(language, modality, site, int(layer))


def as_keys(keys: Iterable) -> list[Key]:
  """Keys (as_key) from an iterable; none may repeat, and there must be some."""
  out, seen = [], set()
  for key in keys:
    key = as_key(key)
    if key in seen:
      raise ValueError(f"representation key {key.name!r} is given twice")
    seen.add(key)
    out.append(key)
  if not out:
    raise ValueError("no representation keys given")
  return out


def model_slug(model: str) -> str:
  """A model name as a file- and site-name-safe word: 'facebook/seamless-m4t-v2-large' ->
  'facebook--seamless-m4t-v2-large', a local directory by its last two path parts."""
  parts = [p for p in model.replace("\\", "/").split("/") if p not in ("", ".")][-2:]
  return "--".join(re.sub(r"[^A-Za-z0-9_\-]+", "_", p) for p in parts) or "model"


def model_site(slug: str, site: str) -> str:
  """A site named by its model: ('sonar-tiny', 'text_encoder') -> 'sonar-tiny/text_encoder'."""
  return f"{slug}{MODEL_SEP}{site}"


def split_site(site: str) -> tuple[str | None, str]:
  """(model slug or None, plain site) of a site name."""
  slug, sep, plain = site.rpartition(MODEL_SEP)
  return (slug, plain) if sep else (None, site)


def model_of(key: Key) -> str | None:
  """The model slug of a key of a several-model sweep; None for a plain site."""
  return split_site(key.site)[0]
