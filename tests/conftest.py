"""Test set-up: fake CPU devices, a private data cache, tiny configs."""

import os
import sys

# Before JAX starts: 8 fake CPU devices for the sharding tests, quiet TF.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'configs'))

import pytest  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope='session', autouse=True)
def _private_cache(tmp_path_factory):
  """The built-in category goes to a temp folder, never ~/.cache."""
  os.environ['RCAE_JAX_CACHE'] = str(tmp_path_factory.mktemp('cache'))


def tiny_config(**overrides):
  """The default config shrunk to seconds on one CPU core."""
  import default  # configs/default.py  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.data.synthetic_train = 8
  config.data.synthetic_test_good = 4
  config.data.synthetic_test_per_defect = 2
  config.data.synthetic_size = 32
  config.data.image_size = 32
  config.data.loader = 'memory'
  config.model.depth = 2
  config.model.width = 4
  config.model.num_res_blocks = 1
  config.model.dpn_width = 4
  config.model.crd_width = 2
  config.train.batch_size = 4
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  config.train.stage1.steps = 3
  config.train.stage2.steps = 2
  config.train.stage3.steps = 2
  config.eval.batch_size = 8
  config.eval.smoothing_size = 3
  for key, value in overrides.items():
    target = config
    *path, last = key.split('.')
    for p in path:
      target = target[p]
    target[last] = value
  return config


@pytest.fixture
def make_config():
  return tiny_config
