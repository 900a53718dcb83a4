"""The input-pipeline benchmark on a tiny built-in category."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from rcae_jax.data import synthetic
from rcae_jax.tools import pipeline_benchmark

TINY = ['--synthetic_train', '6', '--synthetic_size', '32']


def _check(result, loaders, sizes, batch=4, steps=2):
  rows = result['rows']
  assert [(r['loader'], r['size']) for r in rows] == [
      (l, s) for s in sizes for l in loaders]
  for r in rows:
    assert r['batch'] == batch and r['steps'] == steps
    assert r['images_per_s'] > 0 and r['first_batch_s'] >= 0
    assert r['batch_shape'] == [batch, r['size'], r['size'], 3]
    if r['loader'] == 'memory':
      assert r['decode_once_s'] > 0 and r['decode_images_per_s'] > 0
      assert r['memory_bytes'] == r['num_train'] * r['size'] ** 2 * 3
  for key in ('command', 'date', 'machine', 'load_average_before',
              'load_average_after', 'num_train', 'source_image_hw'):
    assert key in result, key
  assert result['machine']['cpu_count'] >= 1


@pytest.mark.slow
def test_both_loaders_print_and_write_json(tmp_path):
  out = tmp_path / 'bench.json'
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run(
      [sys.executable, '-m', 'rcae_jax.tools.pipeline_benchmark', '--sizes', '32',
       '--batch', '4', '--steps', '2', '--loader', 'both',
       '--augment', 'hflip,rot90', '--json', str(out)] + TINY,
      capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert any(l.strip().startswith('tfdata  size   32') and
             'sustained' in l and 'images/s' in l for l in lines), proc.stdout
  assert any(l.strip().startswith('memory  size   32') and
             'decode once' in l and 'serving' in l for l in lines), proc.stdout
  result = json.loads(out.read_text())
  _check(result, ('tfdata', 'memory'), [32])
  assert result['num_train'] == 6 and result['category'] == 'synthetic'
  assert result['augment'] == ['hflip', 'rot90']
  assert result['tensorflow_import_s'] >= 0


def test_real_folder_layout_memory_only(capsys):
  root = synthetic.ensure(seed=0, size=32, n_train=6, n_test_good=1,
                          n_per_defect=1)
  result = pipeline_benchmark.main(
      ['--root', root, '--category', synthetic.CATEGORY, '--sizes', '16,24',
       '--batch', '4', '--steps', '2', '--loader', 'memory'])
  _check(result, ('memory',), [16, 24])
  assert 'tensorflow_import_s' not in result
  assert capsys.readouterr().out.count('serving') == 2


def test_bad_arguments():
  with pytest.raises(SystemExit):
    pipeline_benchmark.parse_args(['--root', '/x'])  # No --category.
  with pytest.raises(SystemExit):
    pipeline_benchmark.parse_args(['--augment', 'shear'])
  with pytest.raises(SystemExit):
    pipeline_benchmark.parse_args(['--sizes', 'big'])
