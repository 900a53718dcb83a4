"""Data parallelism on 8 fake CPU devices (set in conftest.py)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rcae_jax.evaluation import maps
from rcae_jax.model import inference
from rcae_jax.common import sharding
from rcae_jax.training import train


def fixed_batch(b=4, size=32):
  rng = np.random.default_rng(0)
  return {'image': rng.integers(0, 255, (b, size, size, 3), np.uint8)}


def one_step(config, stage, mesh, batch):
  """One training step as loop.run_stage takes it (a mesh, rng None: the
  key is made inside the program from the step number), so that the
  one-device program is the one the session's trained workdir and
  test_train.py compile (same config, same batch): it loads from the
  compilation cache."""
  nets = inference.build_networks(config.model)
  state, frozen = train.create_state(config, stage, nets, mesh)
  step_fn = train.make_step(config, stage, nets, mesh)
  batch = sharding.to_global(batch, mesh)
  return step_fn(state, frozen, batch, None, 0), batch


@pytest.mark.slow
@pytest.mark.parametrize('stage', [1, 2, 3])
def test_sharded_step_equals_single_device_step(make_config, stage):
  assert jax.device_count() == 8, 'conftest sets 8 fake CPU devices'
  config = make_config()
  (single, m1), _ = one_step(config, stage, sharding.make_mesh(1),
                             fixed_batch())
  # The smoke batch of 4, one image per device.
  mesh = sharding.make_mesh(4)
  (sharded, m4), gbatch = one_step(config, stage, mesh, fixed_batch())
  np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5),
               jax.device_get(single.params), jax.device_get(sharded.params))
  # State replicated on all 4 devices, batch split along its first axis.
  for leaf in jax.tree.leaves(sharded.params):
    assert leaf.sharding.spec == P() and len(leaf.sharding.device_set) == 4
  assert gbatch['image'].sharding.spec == P('data')
  shard_rows = {s.data.shape[0] for s in gbatch['image'].addressable_shards}
  assert shard_rows == {1}


def test_indivisible_batch_is_a_clear_error(make_config):
  mesh = sharding.make_mesh(8)
  with pytest.raises(ValueError, match='not divisible by the 8 devices'):
    sharding.check_batch(12, mesh)


@pytest.mark.slow
def test_scaling_benchmark_reports_each_device_count(tmp_path):
  from rcae_jax.tools import scaling_benchmark  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'scaling.json'
  report = scaling_benchmark.main(
      ['--devices', '1,2', '--steps', '1', '--batch', '4', '--image_size',
       '32', '--width', '4', '--depth', '2', '--json', str(out)])
  assert [r['devices'] for r in report['rows']] == [1, 2]
  assert report['rows'][0]['efficiency'] == 1.0
  assert all(r['images_per_sec'] > 0 for r in report['rows'])
  assert out.exists()


def test_predict_split_over_the_mesh_maps_as_one_device(make_config):
  """Evaluation and predict split each batch over the mesh's devices
  (maps.on_mesh): the same reconstructions, maps and scores as on one
  device, for a batch padded to a multiple of the devices (6 rows on 4,
  the padding dropped), with the batch really split: each device gets
  its rows."""
  rows = 6
  config = make_config(**{'eval.scoring': 'recursion'})
  nets = inference.build_networks(config.model)
  params = jax.device_get(train.initial_params(nets, config))
  images = np.random.default_rng(rows).integers(0, 256, (rows, 32, 32, 3),
                                                np.uint8)
  one = maps.make_predict_fn(config, nets)
  mesh = sharding.make_mesh(4)
  four = maps.make_predict_fn(config, nets, mesh=mesh)
  placed = four.place(params)
  assert all(len(x.sharding.device_set) == 4
             for x in jax.tree.leaves(placed))
  want = one(one.place(params), images)
  got = four(placed, images)
  assert got['recs'].shape == want['recs'].shape == (2, rows, 32, 32, 3)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5)
  assert float(np.std(want['map'])) > 0  # Not a flat map compared.
  short = four.map_score(placed, images)
  assert set(short) == set(maps.MAP_SCORE)
  np.testing.assert_allclose(short['map'], want['map'], rtol=1e-5, atol=1e-5)
  padded = np.zeros((8, 32, 32, 3), np.uint8)
  compiled = four.map_score.program.lower(
      rows, placed, sharding.split_rows(padded, mesh)).compile()
  assert compiled.input_shardings[0][1].spec == P('data')
