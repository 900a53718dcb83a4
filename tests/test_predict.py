"""Predict on a tiny trained workdir: maps at each input's own size."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from rcae_jax import run as run_lib
from rcae_jax.datasets import folder


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  import conftest  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('wd'))
  config = conftest.tiny_config()
  run_lib.run(config, workdir)
  return config, workdir


def test_predict_writes_maps_of_each_inputs_size(trained, tmp_path):
  config, workdir = trained
  inputs = tmp_path / 'in'
  inputs.mkdir()
  rng = np.random.default_rng(0)
  sizes = {'a.png': (40, 56), 'b.JPG': (33, 33), 'c.bmp': (70, 20)}
  for name, (h, w) in sizes.items():
    Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(
        inputs / name)
  (inputs / 'notes.txt').write_text('not an image')
  config = config.copy_and_resolve_references()
  config.mode = 'predict'
  config.predict.inputs = str(inputs)
  config.predict.output = str(tmp_path / 'out')
  rows = run_lib.run(config, workdir)['predictions']
  assert [os.path.basename(r['file']) for r in rows] == sorted(sizes)
  thresholds = json.load(open(os.path.join(workdir, 'thresholds.json')))
  for row in rows:
    h, w = sizes[os.path.basename(row['file'])]
    amap = np.asarray(Image.open(row['map']))
    assert amap.shape == (h, w) and amap.dtype == np.float32
    overlay = Image.open(row['map'].replace('.tiff', '_overlay.png'))
    assert overlay.size == (w, h)
    expected = 'DEFECT' if row['score'] >= thresholds['image'] else 'OK'
    assert row['decision'] == expected
  with open(tmp_path / 'out' / 'predictions.csv') as f:
    assert len(list(csv.DictReader(f))) == 3


def test_predict_rejects_missing_input(trained, tmp_path):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.mode = 'predict'
  config.predict.inputs = str(tmp_path / 'missing.png')
  with pytest.raises(folder.DataError, match='missing.png'):
    run_lib.run(config, workdir)


def test_depth_report_summarizes_errors_per_depth():
  from rcae_jax import depth_report  # pylint: disable=g-import-not-at-top
  masks = np.zeros((2, 4, 4), bool)
  masks[0, :2, :2] = True
  errors = np.stack([np.where(masks, 0.5, 0.1),      # depth 1 separates
                     np.where(masks, 0.1, 0.2)])     # depth 2 inverts
  rows = depth_report.summarize(errors.astype(np.float32), masks)
  assert [r['depth'] for r in rows] == [1, 2]
  assert rows[0]['defect_error'] == pytest.approx(0.5)
  assert rows[0]['good_error'] == pytest.approx(0.1)
  assert rows[0]['ratio'] == pytest.approx(5.0)
  assert rows[0]['pixel_auroc'] == 1.0 and rows[1]['pixel_auroc'] == 0.0


def test_depth_report_mode_on_a_trained_workdir(trained):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.mode = 'depth_report'
  report = run_lib.run(config, workdir)
  saved = json.load(open(os.path.join(workdir, 'depth_report.json')))
  assert saved == json.loads(json.dumps(report))
  for name in ('rcae', 'dpn'):  # The tiny config trains DPN (stage 2).
    assert [r['depth'] for r in report[name]] == list(
        range(1, config.model.depth + 1))
    assert all(0.0 <= r['pixel_auroc'] <= 1.0 for r in report[name])


def test_recursion_error_map_combines_depths():
  from rcae_jax import evaluate  # pylint: disable=g-import-not-at-top
  from rcae_jax import validate  # pylint: disable=g-import-not-at-top
  import conftest  # pylint: disable=g-import-not-at-top
  x = np.zeros((1, 2, 2, 3), np.float32)
  # Depth 1 errs by 0.3 at pixel (0, 0), depth 2 by 0.1 everywhere.
  dets = np.zeros((2, 1, 2, 2, 3), np.float32)
  dets[0, 0, 0, 0] = 0.3
  dets[1] = 0.1
  got = {r: np.asarray(evaluate.recursion_error_map(dets, x, r))[0]
         for r in ('mean', 'max', 'last')}
  np.testing.assert_allclose(got['mean'], [[0.2, 0.05], [0.05, 0.05]])
  np.testing.assert_allclose(got['max'], [[0.3, 0.1], [0.1, 0.1]])
  np.testing.assert_allclose(got['last'], np.full((2, 2), 0.1))
  with pytest.raises(validate.ConfigError, match='eval.recursion_reduce'):
    validate.validate(conftest.tiny_config(**{'eval.recursion_reduce': 'sum'}))
