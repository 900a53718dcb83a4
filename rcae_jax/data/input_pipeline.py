"""Batches for training and evaluation: picks the loader a config names.

Every loader serves exactly the same examples in the same order:
- the order is a pure function of (seed, step) (order.py), so a run
  resumed at step s sees the batches an uninterrupted run would have seen;
- all decode with the same Pillow code (decode.py, geometry.py);
- augmentation (augment.py) and tile draws are drawn from (seed, step,
  position in the global batch) and applied on the host in numpy.

Which images (sources.py), their order (order.py), augmentation
(augment.py), the loader interface and the in-memory loader (loader.py),
the tf.data loader (tfdata_loader.py, the only module that imports
TensorFlow, and only when it is used).
"""

from __future__ import annotations

import logging

from rcae_jax.data import augment as augment_lib
from rcae_jax.data import folder
from rcae_jax.data import loader as loader_lib
from rcae_jax.data import tfdata_loader
from rcae_jax.data import tiling as tiling_lib


def make_loader(data_cfg, files: folder.CategoryFiles, val=()
                ) -> loader_lib.Loader:
  """Picks the loader named by `data_cfg.loader` ('auto' prefers tf.data).
  `val`: held-out good training images (see sources.split_validation)."""
  choice = data_cfg.loader
  augment = data_cfg.augment
  augment_lib.parse_augment(augment)  # Before TensorFlow is imported.
  tiling = tiling_lib.from_config(data_cfg)
  if choice == 'auto':
    choice = 'tfdata' if tfdata_loader.tensorflow_available() else 'memory'
    logging.info('data.loader=auto: using the %s loader%s', choice,
                 '' if choice == 'tfdata' else ' (TensorFlow not importable)')
  loaders = {'tfdata': tfdata_loader.TFDataLoader,
             'memory': loader_lib.MemoryLoader}
  if choice not in loaders:
    raise ValueError(f"data.loader must be 'auto', 'tfdata' or 'memory', got "
                     f'{choice!r}')
  return loaders[choice](files, data_cfg.image_size, data_cfg.num_workers,
                         val, augment, data_cfg.resize, tiling)
