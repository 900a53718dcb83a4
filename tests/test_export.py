"""Tests for rcae_jax.export (StableHLO artefact with a symbolic batch)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import load_config
from rcae_jax import benchmark
from rcae_jax import evaluate
from rcae_jax import export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32


def tiny_config():
  config = load_config('default')
  m = config.model
  m.depth, m.width, m.num_res_blocks = 2, 4, 1
  m.dpn_width, m.crd_width = 4, 4
  config.data.image_size = SIZE
  return config


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  config = tiny_config()
  # Random heads too (init_params zero-initialises them), so the map
  # depends on the whole network and a wrong wiring would show.
  params = benchmark.random_params(config, seed=1)
  path = str(tmp_path_factory.mktemp('export') / 'predict.stablehlo')
  exp = export.export_predict(params, config, path)
  return config, params, path, exp


def _images(batch, seed=0):
  return np.random.default_rng(seed).integers(
      0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)


def test_export_signature(exported):
  _, _, path, exp = exported
  assert os.path.getsize(path) > 0
  assert not [p for p in os.listdir(os.path.dirname(path)) if '.tmp' in p]
  (aval,) = exp.in_avals
  assert str(aval.shape[0]) == 'b' and aval.shape[1:] == (SIZE, SIZE, 3)
  assert aval.dtype == np.uint8
  assert sorted(exp.out_tree.unflatten([0, 0])) == ['map', 'score']
  assert str(export.load_exported(path).in_avals) == str(exp.in_avals)


def test_round_trip_matches_predict_without_model_code(exported, tmp_path):
  """Batch sizes 1 and 3 through the one symbolic-batch artefact, loaded in
  a process where Flax and the rcae_jax model code cannot be imported, give
  the maps and scores of the jitted `evaluate.predict`."""
  config, params, path, _ = exported
  predict = evaluate.make_predict_fn(config)
  arrays = {}
  for batch in (1, 3):
    images = _images(batch, seed=batch)
    want = predict(params, images)
    arrays.update({f'images{batch}': images,
                   f'map{batch}': np.asarray(want['map']),
                   f'score{batch}': np.asarray(want['score'])})
    assert float(np.ptp(arrays[f'map{batch}'])) > 0
  np.savez(tmp_path / 'io.npz', **arrays)
  code = f'''
import sys
class _Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('flax', 'tensorflow', 'clu', 'optax',
                              'ml_collections') or name in (
        'rcae_jax.models', 'rcae_jax.train', 'rcae_jax.evaluate'):
      raise ModuleNotFoundError('blocked for this test: ' + name)
sys.meta_path.insert(0, _Block())
import numpy as np
from rcae_jax import export
io = np.load({str(tmp_path / 'io.npz')!r})
predict = export.load_predict({path!r})
for b in (1, 3):
  out = predict(io[f'images{{b}}'])
  assert sorted(out) == ['map', 'score'], sorted(out)
  assert out['map'].shape == (b, {SIZE}, {SIZE}) and out['score'].shape == (b,)
  # Same computation, separately compiled: equal up to float reassociation.
  np.testing.assert_allclose(np.asarray(out['map']), io[f'map{{b}}'],
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out['score']), io[f'score{{b}}'],
                             rtol=1e-6, atol=1e-6)
  print(b, float(np.abs(np.asarray(out['map']) - io[f'map{{b}}']).max()))
try:
  predict(np.zeros((1, {2 * SIZE}, {2 * SIZE}, 3), np.uint8))
except Exception:  # pylint: disable=broad-except
  print('WRONG_SIZE_REJECTED')
assert not [n for n in sys.modules if n.split('.')[0] == 'flax']
print('OK')
'''
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and 'OK' in proc.stdout, proc.stderr[-3000:]
  assert 'WRONG_SIZE_REJECTED' in proc.stdout
