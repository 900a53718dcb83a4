"""Every config file in configs/ loads and passes validation: a typo in a
field name or a bad choice would otherwise surface only when a user runs it."""

import os

import pytest

from conftest import load_config
from conftest import REPO
from rcae_jax import validate

CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, 'configs'))
                 if f.endswith('.py'))


@pytest.mark.parametrize('name', CONFIGS)
def test_config_loads_and_validates(name):
  validate.validate(load_config(name))
  # Every config states its command and expected result (CONTRIBUTING.md).
  text = open(os.path.join(REPO, 'configs', f'{name}.py')).read()
  assert '--config configs/' in text, f'{name} does not state its command'


def test_real_128_only_changes_size_and_crd():
  base, real = load_config('default'), load_config('real_128')
  assert (real.data.image_size, real.model.crd_width,
          real.train.stage3.steps) == (128, 8, 600)
  real.data.image_size = base.data.image_size
  real.model.crd_width = base.model.crd_width
  real.train.stage3.steps = base.train.stage3.steps
  assert real.to_dict() == base.to_dict()


@pytest.mark.parametrize('field,value,message', [
    ('bottleneck_channels', 4, 'share_weights=False'),
    ('skip_channels', 9, 'identity path'),
    ('skip_channels', 0, 'skip_channels=0'),
])
def test_model_shapes_that_cannot_work_are_refused(field, value, message):
  """A shared encoder reads the image and the previous code, so both need 3
  channels (otherwise Flax fails at init with a bare shape error); a skip
  as wide as 3x the code could carry the previous level losslessly."""
  config = load_config('default')
  config.model[field] = value
  with pytest.raises(validate.ConfigError, match=message):
    validate.validate(config)
