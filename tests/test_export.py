"""Tests for rcae_jax.serving.export (StableHLO artefact with a symbolic batch)."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import BLOCKING_RUNNER
from conftest import REPO
from conftest import subprocess_env
from conftest import tiny_model_config
from conftest import write_image
from rcae_jax.evaluation import maps as maps_lib
from rcae_jax.serving import export
from rcae_jax.tools import benchmark

SIZE = 32


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  config = tiny_model_config(size=SIZE)
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
  the maps and scores of the jitted `maps_lib.predict`."""
  config, params, path, _ = exported
  predict = maps_lib.make_predict_fn(config)
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
        'rcae_jax.model.models', 'rcae_jax.training.train', 'rcae_jax.evaluation.evaluate'):
      raise ModuleNotFoundError('blocked for this test: ' + name)
sys.meta_path.insert(0, _Block())
import numpy as np
from rcae_jax.serving import export
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


# ------------------------------------- export mode and the standalone script

SERVE = os.path.join(REPO, 'rcae_jax', 'serving', 'serve_export.py')
# Runs a script with everything but jax, numpy and Pillow (and the standard
# library) unimportable, as on a production machine with only the export.
SERVE_RUNNER = '''
import runpy, sys
class _Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('rcae_jax', 'flax', 'optax', 'orbax',
                              'tensorflow', 'ml_collections', 'clu', 'absl',
                              'etils'):
      raise ModuleNotFoundError('not on the production machine: ' + name)
sys.meta_path.insert(0, _Block())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def test_serve_script_imports_only_jax_numpy_pillow():
  import ast  # pylint: disable=g-import-not-at-top
  tree = ast.parse(open(SERVE).read())
  names = {a.name.split('.')[0] for n in ast.walk(tree)
           if isinstance(n, ast.Import) for a in n.names}
  names |= {n.module.split('.')[0] for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom)}
  assert names - sys.stdlib_module_names == {'jax', 'numpy', 'PIL'}


def test_export_command_and_serve_script_match_predict(trained, tmp_path):
  """`--config.mode=export` writes the folder; its serve_export.py, run
  where rcae_jax cannot be imported, gives predict's maps, scores and
  decisions on the same images (grey, 16-bit, RGBA, odd sizes, equal
  stems in two folders, one unreadable)."""
  import csv  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from rcae_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  config, workdir = trained
  rng = np.random.default_rng(3)
  images = tmp_path / 'in'
  write_image(str(images / 'a' / '1.png'), rng.integers(0, 256, (40, 24, 3),
              np.uint8))
  write_image(str(images / 'b' / '1.png'), rng.integers(0, 256, (32, 32, 4),
              np.uint8))
  write_image(str(images / 'grey.bmp'),
              rng.integers(0, 256, (50, 70), np.uint8))
  write_image(str(images / 'deep.png'), rng.integers(0, 65536, (33, 45),
              np.uint16))
  (images / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
  predict_config = config.copy_and_resolve_references()
  predict_config.mode = 'predict'
  predict_config.predict.inputs = str(images)
  predict_config.predict.output = str(tmp_path / 'predicted')
  want = {r['name']: r for r in
          run_lib.run(predict_config, workdir)['predictions']}

  env = subprocess_env()
  # Export needs no TensorFlow: run it as where none is installed.
  proc = subprocess.run(
      [sys.executable, '-c', BLOCKING_RUNNER,
       '--config', os.path.join(REPO, 'configs', 'smoke.py'),
       '--workdir', workdir, '--config.mode=export'],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = os.path.join(workdir, 'export')
  assert sorted(os.listdir(out)) == ['model.json', 'predict.stablehlo',
                                     'serve_export.py']
  meta = json.load(open(os.path.join(out, 'model.json')))
  thresholds = json.load(open(os.path.join(workdir, 'thresholds.json')))
  assert meta['input'] | {'meaning': ''} == {
      'shape': ['b', 32, 32, 3], 'dtype': 'uint8', 'meaning': ''}
  assert meta['image_size'] == 32 and meta['input_dtype'] == 'uint8'
  assert meta['outputs'] == {'map': {'shape': ['b', 32, 32],
                                     'dtype': 'float32'},
                             'score': {'shape': ['b'], 'dtype': 'float32'}}
  assert meta['thresholds']['image'] == thresholds['image']
  assert meta['thresholds']['pixel'] == thresholds['pixel']
  assert meta['platforms'] == ['cpu']
  assert meta['jax_version'] == jax.__version__

  # The folder alone, elsewhere, with a batch size of its own.
  shipped = tmp_path / 'shipped'
  shutil.copytree(out, shipped)
  env.pop('PYTHONPATH')
  proc = subprocess.run(
      [sys.executable, '-c', SERVE_RUNNER, str(shipped / 'serve_export.py'),
       str(shipped), str(images), '--output', str(tmp_path / 'served'),
       '--batch-size', '3'],
      capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
  assert proc.returncode == 3, proc.stderr[-3000:]  # broken.png
  with open(tmp_path / 'served' / 'scores.csv') as f:
    got = {r['name']: r for r in csv.DictReader(f)}
  assert sorted(got) == sorted(want) == [
      'a/1.png', 'b/1.png', 'broken.png', 'deep.png', 'grey.bmp']
  for name, row in want.items():
    assert got[name]['decision'] == row['decision'], name
    if row['decision'] == 'ERROR':
      continue
    # Same computation, separately compiled: equal up to float reassociation.
    np.testing.assert_allclose(float(got[name]['score']), row['score'],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(Image.open(tmp_path / 'served' / f'{name}.tiff')),
        np.asarray(Image.open(row['map'])), rtol=1e-5, atol=1e-6)


def test_export_config_is_validated():
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from rcae_jax import validate  # pylint: disable=g-import-not-at-top
  validate.validate(tiny_config(**{'mode': 'export',
                                   'export.platforms': ('cpu', 'cuda')}))
  with pytest.raises(validate.ConfigError, match='export.platforms'):
    validate.validate(tiny_config(**{'mode': 'export',
                                     'export.platforms': ('gpu',)}))


def test_shared_fixture_tests_reach_one_xdist_group(exported, request):
  """Under `--dist loadgroup` (setup.cfg) xdist suffixes a grouped test's
  node id with its group; without the suffix every worker builds the
  shared fixtures itself (as under pytest 9.2). Run without xdist, there
  is nothing to group."""
  del exported  # Only its name matters: conftest.SHARED_FIXTURES.
  if getattr(request.config.option, 'loadgroup', False):
    assert request.node.nodeid.endswith('@export'), request.node.nodeid
