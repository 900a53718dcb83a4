"""Defaults live in configs/default.py only: no `.get('<field>', default)`
on a config section in the package (a second copy of a default that
drifts), and an old workdir's config.json gets today's defaults from
config_files.from_saved instead."""

import pathlib
import re

from rcae_jax import config_files

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'rcae_jax'


def _fields(tree, out):
  for key, value in tree.items():
    out.add(key)
    if isinstance(value, dict):
      _fields(value, out)
  return out


def test_no_config_field_has_a_second_default_in_the_package():
  fields = _fields(config_files.defaults().to_dict(), set())
  pattern = re.compile(r"\.get\(\s*'(\w+)'\s*,")
  found = sorted(f'{path.relative_to(PACKAGE)}:{n + 1}: {m.group(0)}'
                 for path in PACKAGE.rglob('*.py')
                 for n, line in enumerate(path.read_text().splitlines())
                 for m in pattern.finditer(line) if m.group(1) in fields)
  assert not found, found


def test_an_old_config_json_gets_todays_defaults():
  # A workdir saved before crd_head, stage3.loss and the DPN guide existed.
  saved = config_files.defaults().to_dict()
  del saved['model']['crd_head'], saved['model']['dpn_guide']
  del saved['train']['stage3']['loss']
  saved['model']['crd_width'] = 8
  config = config_files.from_saved(saved)
  assert config.model.crd_head == 'groupnorm'
  assert config.model.dpn_guide == 'signed_diff'
  assert config.train.stage3.loss == 'l2'
  assert config.model.crd_width == 8
