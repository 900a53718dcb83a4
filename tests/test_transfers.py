"""Evaluation reads back only maps and scores per batch; the per-depth
reconstructions of the few pictured images come from one extra full
predict on just those images, and equal what the full predict gives."""

import jax
import numpy as np

from rcae_jax.evaluation import loops
from rcae_jax.evaluation import maps as maps_lib
from rcae_jax.tools import benchmark

BATCH = 4


class _Loader:
  """Three padded batches of random images (the last with 2 real rows)."""
  tiling = None

  def __init__(self, size):
    rng = np.random.default_rng(0)
    self.images = rng.integers(0, 256, (10, size, size, 3), np.uint8)
    self.size = size

  def test_batches(self, batch_size, split='test'):
    del split
    for start in range(0, len(self.images), batch_size):
      part = self.images[start:start + batch_size]
      pad = batch_size - len(part)
      yield {'image': np.concatenate([part, np.zeros((pad, *part.shape[1:]),
                                                     np.uint8)]),
             'valid': np.arange(batch_size) < len(part),
             'label': np.zeros(batch_size, np.int32),
             'mask': np.zeros((batch_size, self.size, self.size), np.uint8),
             'extent': np.full((batch_size, 2), self.size, np.int32)}


class _Counting:
  """A make_predict_fn result that counts its full and map-only calls."""

  def __init__(self, fn):
    self.fn, self.full_calls, self.map_calls = fn, 0, 0

  def __call__(self, *args):
    self.full_calls += 1
    return self.fn(*args)

  def map_score(self, *args):
    self.map_calls += 1
    return self.fn.map_score(*args)


def test_pictures_come_from_one_extra_call_with_the_full_outputs(make_config):
  config = make_config(**{'eval.scoring': 'recursion',
                          'eval.batch_size': BATCH})
  size = int(config.data.image_size)
  params = benchmark.random_params(config)
  loader = _Loader(size)
  fn = _Counting(maps_lib.make_predict_fn(config))
  keep = {1, 5, 9}
  maps, scores, _, _, kept = loops.run_predictions(
      params, loader, config, 'test', fn, keep=keep)
  assert fn.map_calls == 3 and fn.full_calls == 1  # 3 pictures, batch 4.
  full = maps_lib.make_predict_fn(config)(params, loader.images)
  np.testing.assert_allclose(maps, full['map'], atol=1e-5)
  np.testing.assert_allclose(scores, full['score'], atol=1e-5)
  assert set(kept) == keep
  for i in keep:
    recs, dets, box = kept[i]
    # Another batch shape: XLA may order the sums differently.
    np.testing.assert_allclose(recs, np.asarray(full['recs'])[:, i],
                               atol=1e-5)
    np.testing.assert_allclose(dets, np.asarray(full['details'])[:, i],
                               atol=1e-5)
    assert box == (0, 0, size, size)


def test_map_score_program_returns_map_and_score_only(make_config):
  config = make_config(**{'eval.scoring': 'recursion'})
  params = benchmark.random_params(config)
  fn = maps_lib.make_predict_fn(config)
  images = _Loader(int(config.data.image_size)).images[:BATCH]
  out = fn.map_score(params, images)
  assert set(out) == set(maps_lib.MAP_SCORE)
  np.testing.assert_array_equal(out['map'], fn(params, images)['map'])
  # The outputs stay on the device until the loop reads them back.
  assert all(isinstance(v, jax.Array) for v in out.values())
