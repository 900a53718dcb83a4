"""A good-only category (train/good, no test/): trains, sets thresholds,
skips the test metrics with one notice, and `predict` works on it."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from conftest import write_image
from rcae_jax import run as run_lib
from rcae_jax.data import folder, synthetic


SQUARE = (slice(10, 20), slice(12, 22))  # A defect's place in a 32 px image.


def _texture(rng, size=32):
  return (synthetic.texture(rng, size) * 255).astype(np.uint8)


def _good_only_root(tmp_path, n=10):
  """<root>/line/train/good/*.png and nothing else."""
  good = tmp_path / 'data' / 'line' / 'train' / 'good'
  rng = np.random.default_rng(0)
  for i in range(n):
    write_image(good / f'{i:03d}.png', _texture(rng))
  return str(tmp_path / 'data')


def test_discover_accepts_a_category_without_test(tmp_path):
  files = folder.discover(_good_only_root(tmp_path, n=3), 'line')
  assert len(files.train) == 3 and files.test == () and not files.has_masks
  assert folder.good_only(files)


def test_empty_test_folder_is_still_refused(tmp_path):
  root = _good_only_root(tmp_path, n=3)
  os.makedirs(os.path.join(root, 'line', 'test'))
  with pytest.raises(folder.DataError, match='holds no test images'):
    folder.discover(root, 'line')


def test_good_only_trains_sets_thresholds_and_predicts(make_config, tmp_path,
                                                       caplog):
  root = _good_only_root(tmp_path)
  workdir = str(tmp_path / 'wd')
  # Stage 1 only: what a good-only folder changes is the data, thresholds,
  # metrics and predict, the same for every scoring.
  config = make_config(**{'data.root': root, 'data.category': 'line',
                          'data.val_fraction': 0.2, 'eval.every_steps': 2,
                          'train.stage2.steps': 0, 'train.stage3.steps': 0,
                          'eval.scoring': 'recursion'})
  with caplog.at_level(logging.WARNING):
    report = run_lib.run(config, workdir)
  notices = [r.getMessage() for r in caplog.records
             if 'good-only' in r.getMessage()]
  assert len(notices) == 1, notices
  assert 'test metrics' in notices[0] and 'skipped' in notices[0]
  assert report['line']['num_test_images'] == 0
  assert not any(isinstance(v, float) for v in report['line'].values())
  with open(os.path.join(workdir, 'metrics.json')) as f:
    assert json.load(f) == json.loads(json.dumps(report))
  with open(os.path.join(workdir, 'thresholds.json')) as f:
    thresholds = json.load(f)
  assert thresholds['num_images'] == 2  # 20% of 10 held out.
  assert thresholds['source'] == 'held-out good training images'
  assert np.isfinite([thresholds['image'], thresholds['pixel']]).all()
  assert not os.path.exists(os.path.join(workdir, 'anomaly_maps'))

  # Predict on images the model has not seen: new good ones, and one with
  # a defect (a bright square). A constant or noise map does not put the
  # defect's map where the square is, nor score it above the good ones.
  inputs = tmp_path / 'in'
  rng = np.random.default_rng(1)
  for i in range(3):
    write_image(inputs / f'good{i}.png', _texture(rng))
  defect = _texture(rng)
  defect[SQUARE] = 255
  write_image(inputs / 'defect.png', defect)
  predict = config.copy_and_resolve_references()
  predict.mode = 'predict'
  predict.predict.inputs = str(inputs)
  predict.predict.output = str(tmp_path / 'out')
  rows = run_lib.run(predict, workdir)['predictions']
  assert [os.path.basename(r['file']) for r in rows] == [
      'defect.png', 'good0.png', 'good1.png', 'good2.png']
  assert all(r['threshold'] == thresholds['image'] for r in rows)
  for row in rows:
    assert row['decision'] == ('DEFECT' if row['score'] >= thresholds['image']
                               else 'OK')
  assert rows[0]['score'] > max(r['score'] for r in rows[1:])
  amap = np.asarray(Image.open(rows[0]['map']))
  inside = np.zeros(amap.shape, bool)
  inside[SQUARE] = True
  assert amap[inside].mean() > 2 * amap[~inside].mean()
