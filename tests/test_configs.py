"""Every config file in configs/ loads and passes validation: a typo in a
field name or a bad choice would otherwise surface only when a user runs it."""

import importlib.util
import os

import pytest

from rcae_jax import validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(f for f in os.listdir(os.path.join(REPO, 'configs'))
                 if f.endswith('.py'))


def load(name):
  path = os.path.join(REPO, 'configs', name)
  spec = importlib.util.spec_from_file_location(f'configs_{name[:-3]}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize('name', CONFIGS)
def test_config_loads_and_validates(name):
  config = load(name)
  validate.validate(config)
  # Every config states its command and expected result (DESIGN.md).
  text = open(os.path.join(REPO, 'configs', name)).read()
  assert '--config configs/' in text, f'{name} does not state its command'


def test_real_128_only_changes_size_and_crd():
  base, real = load('default.py'), load('real_128.py')
  assert (real.data.image_size, real.model.crd_width,
          real.train.stage3.steps) == (128, 8, 600)
  real.data.image_size = base.data.image_size
  real.model.crd_width = base.model.crd_width
  real.train.stage3.steps = base.train.stage3.steps
  assert real.to_dict() == base.to_dict()
