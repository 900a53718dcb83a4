"""Smoke-test config: the whole pipeline (3 stages, evaluation) in seconds.

    python -m rcae_jax.main --config configs/smoke.py --workdir /tmp/smoke

32 px images, depth 2, a few channels, a handful of steps: checks that
everything runs end to end (install, data, training, checkpoints, metrics),
not that it detects anything. Used by the tests. Expected: about 30-60 s
on 2 CPU cores, mostly compilation; metrics are near chance.
"""

from rcae_jax import config_files


def get_config():
  # The base config, loaded by path from beside this file.
  config = config_files.base(__file__, 'default')
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
  config.train.stage2.batch_size = 4
  config.train.stage3.batch_size = 4
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  config.train.stage1.steps = 3
  config.train.stage2.steps = 2
  config.train.stage3.steps = 2
  config.eval.batch_size = 8
  config.eval.smoothing_size = 3
  return config
