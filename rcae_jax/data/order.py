"""The order examples are served in, a pure function of (seed, step).

A run resumed at step s sees the batches an uninterrupted run would have
seen, and every loader and process count agrees on it: training indices
epoch after epoch (`batch_indices`), each host's contiguous share of a
global batch (`host_slice`), test indices padded to whole batches
(`padded_test_order`) and where tiled training cuts its random tiles
(`tile_draws`)."""

from __future__ import annotations

import numpy as np


def batch_indices(step: int, batch_size: int, num_examples: int,
                  seed: int) -> np.ndarray:
  """Training example indices of global batch `step`.

  The example stream is epoch after epoch, each a permutation drawn from
  (seed, epoch); batch s is stream[s*B:(s+1)*B], so batches may straddle
  epochs and no image is ever dropped or duplicated within an epoch.
  """
  start = step * batch_size
  out = np.empty(batch_size, np.int64)
  filled = 0
  while filled < batch_size:
    epoch, offset = divmod(start + filled, num_examples)
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    take = min(batch_size - filled, num_examples - offset)
    out[filled:filled + take] = perm[offset:offset + take]
    filled += take
  return out


def host_slice(indices: np.ndarray, process_index: int,
               process_count: int) -> np.ndarray:
  """This host's contiguous share of a global batch."""
  if len(indices) % process_count:
    raise ValueError(f'global batch {len(indices)} is not divisible by the '
                     f'process count {process_count}')
  local = len(indices) // process_count
  return indices[process_index * local:(process_index + 1) * local]


def padded_test_order(num_examples: int, batch_size: int) -> np.ndarray:
  """Test indices padded (with index 0) to whole batches; -1 never used."""
  n = -(-num_examples // batch_size) * batch_size
  order = np.arange(n)
  order[num_examples:] = 0
  return order


def tile_draws(step: int, seed: int, local: int, process_index: int = 0,
               process_count: int = 1) -> np.ndarray:
  """float64 [local, 2] in [0, 1): where this host's examples of training
  batch `step` take their random tile (tiling.random_origin). Drawn for
  the whole global batch from (seed, step) and sliced by host, like
  `augment.augment_batch`, so both loaders, any process count and a resumed run
  cut the same tiles."""
  draws = np.random.default_rng([seed, 13, step]).random(
      (local * process_count, 2))
  return draws[process_index * local:(process_index + 1) * local]
