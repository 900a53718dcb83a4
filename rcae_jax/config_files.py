"""Config files: a workdir's saved config as a config file, and the base
config a derived one builds on, loaded by path.

A workdir remembers its config: `run.save_config` writes the resolved
config to <workdir>/config.json. When `--config` is absent, main passes
`--config=<this file>:<workdir>/config.json`; ml_collections' config_flags
then calls `get_config(path)` below, and `--config.X=Y` overrides apply to
the rebuilt config as they would to a config file's. The mode is not
remembered: it is 'train' (resume or finish the run) unless --config.mode
says otherwise.

Derived configs (configs/cpu_real.py builds on real_128.py, which builds on
default.py) load their base with `base(__file__, 'default')`: by path,
beside the file itself, so `--config configs/cpu_real.py` works from any
working directory without touching sys.path.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

# Keys of config.json that are records, not config fields.
RECORD_KEYS = ('resolved_data',)
# The repository's configs/ folder (an editable install or a clone).
CONFIGS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def load(path: str) -> ml_collections.ConfigDict:
  """get_config() of the config file at `path`, loaded by path as --config
  loads it (sys.path untouched)."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'rcae_jax_config_{name}',
                                                path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def base(derived_file: str, name: str) -> ml_collections.ConfigDict:
  """get_config() of configs/<name>.py beside `derived_file`."""
  return load(os.path.join(os.path.dirname(os.path.abspath(derived_file)),
                           f'{name}.py'))


def _tuples(value):
  """JSON arrays back to tuples: every sequence in our configs is one."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def _merge(target: ml_collections.ConfigDict, saved: dict) -> None:
  """Sets `saved`'s values into `target`, keeping the target's field types
  (e.g. data.image_size accepts S or (H, W)); fields only the saved config
  has (those a derived config added, e.g. a stage's `epochs`) are added."""
  for key, value in saved.items():
    if key in target and isinstance(target[key], ml_collections.ConfigDict):
      if isinstance(value, dict):
        _merge(target[key], value)
        continue
    if isinstance(value, dict):
      value = ml_collections.ConfigDict(value)
    target[key] = value


def defaults() -> ml_collections.ConfigDict | None:
  """configs/default.py's config, or None where configs/ is not beside the
  package (a non-editable install)."""
  path = os.path.join(CONFIGS_DIR, 'default.py')
  if not os.path.exists(path):
    return None
  return base(path, 'default')


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """The config a workdir was run with, from its config.json contents.

  Laid over configs/default.py's fields, so a workdir written before a
  field existed gets that field's default (which keeps the old behaviour)
  and the command line can override it."""
  saved = _tuples({k: v for k, v in saved.items() if k not in RECORD_KEYS})
  config = defaults()
  if config is None:
    config = ml_collections.ConfigDict()
  _merge(config, saved)
  # The mode is what to do now, not a setting of the run: --config.mode
  # says it, and without it a rerun resumes (or finishes) the training.
  config.mode = 'train'
  return config


def read_saved(path: str) -> dict:
  """config.json's contents (local or gs:// path)."""
  from rcae_jax.common import fileio  # pylint: disable=g-import-not-at-top
  return fileio.read_json(path)


def get_config(path: str) -> ml_collections.ConfigDict:
  """Entry point for `--config=<this file>:<workdir>/config.json`."""
  return from_saved(read_saved(path))

