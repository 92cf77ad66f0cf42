"""Flags generated from the settings dataclasses (engine.settings), one flag per field, and the
set cli.sweep and cli.extract share: the corpus, the model and how it is run, so the two
commands read the same words the same way."""
from __future__ import annotations

import typing

from absl import flags

from engine import settings


def _kind(hint) -> type:
  """The flag kind of a field's type: str, int, float, bool, or tuple (a comma list)."""
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  hint = args[0] if args and typing.get_origin(hint) is not tuple else hint
  return tuple if typing.get_origin(hint) is tuple else hint


def define(group: type, only: typing.Collection[str] | None = None,
           skip: typing.Collection[str] = ()) -> None:
  """Defines a flag for each field of a settings group (by flag name; `only`/`skip` choose)."""
  for name, field, hint in settings.flag_fields(group):
    if (only is not None and name not in only) or name in skip:
      continue
    meta, default = field.metadata, field.default
    kind = _kind(hint)
    if meta["choices"]:
      flags.DEFINE_enum(name, default, list(meta["choices"]), meta["help"])
    elif kind is tuple:
      flags.DEFINE_list(name, None if default is None else [str(v) for v in default], meta["help"])
    else:
      define_flag = {str: flags.DEFINE_string, int: flags.DEFINE_integer,
                     float: flags.DEFINE_float, bool: flags.DEFINE_bool}[kind]
      define_flag(name, default, meta["help"])
    for alias in meta["aliases"]:
      flags.DEFINE_alias(alias, name)


# The model's dtype is cli.sweep's and cli.extract's own flag.
define(settings.Corpus)
define(settings.Model, skip=("model_dtype",))
EXTRACTION_RUN = ("fleurs_dir", "cache_dir", "device", "batch_size", "max_speech_seconds",
                  "progress")
define(settings.Run, only=EXTRACTION_RUN)


def values(flag_values: flags.FlagValues = flags.FLAGS) -> dict:
  """Every parsed flag by name."""
  return {name: flag_values[name].value for name in flag_values}
