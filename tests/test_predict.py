"""Predict on a tiny trained workdir: maps at each input's own size."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import BLOCKING_RUNNER
from conftest import REPO
from conftest import run_report
from conftest import subprocess_env
from conftest import write_image

from rcae_jax import run as run_lib
from rcae_jax.data import folder
from rcae_jax.data import sources
from rcae_jax.evaluation import maps as maps_lib
from rcae_jax.serving import params as params_lib


def test_predict_writes_maps_of_each_inputs_size(trained, tmp_path):
  config, workdir = trained
  inputs = tmp_path / 'in'
  inputs.mkdir()
  rng = np.random.default_rng(0)
  sizes = {'a.png': (40, 56), 'b.JPG': (33, 33), 'c.bmp': (70, 20)}
  for name, (h, w) in sizes.items():
    Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(
        inputs / name)
  # A defective test image the evaluation scored, twice under two names:
  # predict must give its two copies the same map, and the map the
  # evaluation exported for it (a noise or constant map, or a map of
  # another image, fails).
  files = sources.resolve_files(config.data, seed=config.seed)
  defective = next(e for e in files.test if e.label)
  for name in ('d.png', 'e.png'):
    shutil.copy(defective.path, inputs / name)
    sizes[name] = np.asarray(Image.open(defective.path)).shape[:2]
  (inputs / 'notes.txt').write_text('not an image')
  config = config.copy_and_resolve_references()
  config.mode = 'predict'
  config.predict.inputs = str(inputs)
  config.predict.output = str(tmp_path / 'out')
  rows = run_lib.run(config, workdir)['predictions']
  assert [os.path.basename(r['file']) for r in rows] == sorted(sizes)
  thresholds = json.load(open(os.path.join(workdir, 'thresholds.json')))
  maps = {}
  for row in rows:
    name = os.path.basename(row['file'])
    amap = maps[name] = np.asarray(Image.open(row['map']))
    assert amap.shape == sizes[name] and amap.dtype == np.float32
    assert amap.std() > 0, name
    overlay = Image.open(row['overlay'])
    assert overlay.size == sizes[name][::-1]
    expected = 'DEFECT' if row['score'] >= thresholds['image'] else 'OK'
    assert row['decision'] == expected
  np.testing.assert_array_equal(maps['d.png'], maps['e.png'])
  assert rows[3]['score'] == rows[4]['score']
  stem = os.path.splitext(os.path.basename(defective.path))[0]
  evaluated = np.asarray(Image.open(os.path.join(
      workdir, 'anomaly_maps', 'synthetic', 'test',
      os.path.basename(os.path.dirname(defective.path)), f'{stem}.tiff')))
  np.testing.assert_allclose(maps['d.png'], evaluated, rtol=1e-5, atol=1e-6)
  assert not np.allclose(maps['a.png'].mean(), maps['d.png'].mean())
  with open(tmp_path / 'out' / 'predictions.csv') as f:
    assert len(list(csv.DictReader(f))) == len(sizes)


def test_predict_rejects_missing_input(trained, tmp_path):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.mode = 'predict'
  config.predict.inputs = str(tmp_path / 'missing.png')
  with pytest.raises(folder.DataError, match='missing.png'):
    run_lib.run(config, workdir)


def test_depth_report_summarizes_errors_per_depth():
  from rcae_jax.tools import depth_report  # pylint: disable=g-import-not-at-top
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


def test_depth_report_mode_on_a_trained_workdir(trained, tmp_path):
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  report = run_report(trained, 'depth_report')
  config, workdir = trained
  # The same per-depth errors from the evaluation's forward pass (the
  # reconstructions and details maps.predict returns), scored by sklearn:
  # a report of another output, depth, image or mask differs.
  params = params_lib.load_params(config, workdir)
  loader = run_lib.prepare(config, str(tmp_path / 'wd'))
  predict_fn = maps_lib.make_predict_fn(config)
  errors, masks = {'rcae': [], 'dpn': []}, []
  for batch in loader.test_batches(config.eval.batch_size):
    out = predict_fn(params, batch['image'])
    keep = batch['valid']
    x = batch['image'][keep].astype(np.float32) / 255
    for name, key in (('rcae', 'recs'), ('dpn', 'details')):
      errors[name].append(np.abs(np.asarray(out[key])[:, keep] - x).mean(-1))
    masks.append(batch['mask'][keep].astype(bool))
  masks = np.concatenate(masks)
  for name in ('rcae', 'dpn'):  # The tiny config trains DPN (stage 2).
    per_depth = np.concatenate(errors[name], axis=1)
    assert [r['depth'] for r in report[name]] == list(
        range(1, config.model.depth + 1))
    for row, err in zip(report[name], per_depth):
      assert row['pixel_auroc'] == pytest.approx(
          skm.roc_auc_score(masks.ravel(), err.ravel()), abs=1e-6)
      assert row['defect_error'] == pytest.approx(err[masks].mean(), 1e-4)
      assert row['good_error'] == pytest.approx(err[~masks].mean(), 1e-4)


def test_recursion_error_map_combines_depths():
  from rcae_jax import validate  # pylint: disable=g-import-not-at-top
  from rcae_jax.evaluation import scoring  # pylint: disable=g-import-not-at-top
  import conftest  # pylint: disable=g-import-not-at-top
  x = np.zeros((1, 2, 2, 3), np.float32)
  # Depth 1 errs by 0.3 at pixel (0, 0), depth 2 by 0.1 everywhere.
  dets = np.zeros((2, 1, 2, 2, 3), np.float32)
  dets[0, 0, 0, 0] = 0.3
  dets[1] = 0.1
  got = {r: np.asarray(scoring.recursion_error_map(dets, x, r))[0]
         for r in ('mean', 'max', 'last')}
  np.testing.assert_allclose(got['mean'], [[0.2, 0.05], [0.05, 0.05]])
  np.testing.assert_allclose(got['max'], [[0.3, 0.1], [0.1, 0.1]])
  np.testing.assert_allclose(got['last'], np.full((2, 2), 0.1))
  with pytest.raises(validate.ConfigError, match='eval.recursion_reduce'):
    validate.validate(conftest.tiny_config(**{'eval.recursion_reduce': 'sum'}))


# ------------------------------------------------- production-line predict

def _save(path, shape, seed=0):
  """A random image of `shape`, from `seed`."""
  write_image(path, np.random.default_rng(seed).integers(0, 255, shape,
                                                           np.uint8))


def _truncated_png(path):
  _save(path, (24, 24, 3), seed=9)
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:len(data) // 2])


def test_output_names_keep_relative_paths(tmp_path):
  from rcae_jax.serving import predict_inputs  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'cam'
  for rel in ('line1/001.png', 'line2/001.png', '001.png', '001.jpg',
              '.tmp.png', 'out/old.png'):
    _save(str(root / rel), (4, 4, 3))
  names = [x.name for x in predict_inputs.list_inputs(
      str(root), skip=str(root / 'out'))]
  # Equal stems stay apart, hidden files and the output folder are skipped.
  assert names == ['001.jpg', '001.png', 'line1/001.png', 'line2/001.png']
  # Loose files and several folders: '<folder>-<hash>/' keeps apart equal
  # names from different folders, and does not depend on the other inputs.
  other = tmp_path / 'b' / 'cam'
  _save(str(other / '001.png'), (4, 4, 3))
  spec = f'{root / "001.png"},{other / "001.png"}'
  loose = [x.name for x in predict_inputs.list_inputs(spec)]
  assert len(set(loose)) == 2
  assert all(n.startswith('cam-') and n.endswith('/001.png') for n in loose)
  again = predict_inputs.list_inputs(f'{other},{root / "001.png"}')
  assert again[-1].name == loose[0]
  assert {x.path for x in again} == {str(root / '001.png'),
                                     str(other / '001.png')}


def test_progress_line_gives_rate_and_eta():
  from rcae_jax.serving import predict  # pylint: disable=g-import-not-at-top
  assert predict.progress_line(0, 10, 0, 0.0) == (
      'Predicted 0/10 images (0 errors)')
  assert predict.progress_line(1200, 100000, 3, 60.0) == (
      'Predicted 1,200/100,000 images (3 errors), 20.0 images/s, '
      'ETA 1h 22m')
  assert predict.progress_line(10, 40, 0, 5.0).endswith('ETA 0m 15s')


def test_report_appends_resumes_and_refuses_another_model(tmp_path):
  from rcae_jax.serving import predict_report  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'predictions.csv')
  report = predict_report.Report(path, threshold=0.5)
  report.append([{'file': '/a.png', 'name': 'a.png', 'decision': 'OK',
                  'score': 0.25, 'threshold': 0.5, 'height': 4, 'width': 6},
                 {'file': '/b.png', 'name': 'b.png', 'decision': 'ERROR',
                  'threshold': 0.5, 'error': 'cannot decode,\n"truncated"'}])
  rows = predict_report.Report(path, 0.5).rows()  # Reopening drops ERROR.
  assert [r['file'] for r in rows] == ['/a.png']
  assert rows[0]['score'] == 0.25 and rows[0]['width'] == 6
  # The machine died inside a write: the torn line is cut off on resume.
  with open(path, 'a') as f:
    f.write('/c.png,c.png,DEF')
  report = predict_report.Report(path, 0.5)
  assert report.done == {'/a.png'}
  assert open(path).read().endswith('\n')
  report.append([{'file': '/c.png', 'name': 'c.png', 'decision': 'DEFECT',
                  'score': 0.75, 'threshold': 0.5}])
  assert [r['file'] for r in report.rows()] == ['/a.png', '/c.png']
  with pytest.raises(folder.DataError, match='image threshold 0.5'):
    predict_report.Report(path, 0.6)


@pytest.mark.slow
def test_interrupted_predict_keeps_rows_and_rerun_skips_them(
    trained, tmp_path, monkeypatch):
  from rcae_jax.serving import predict  # pylint: disable=g-import-not-at-top
  config, workdir = trained
  for i in range(4):
    _save(str(tmp_path / 'in' / f'a{i}.png'), (20, 30, 3), seed=i)
  _truncated_png(str(tmp_path / 'in' / 'bad.png'))
  config = config.copy_and_resolve_references()
  config.mode = 'predict'
  config.predict.inputs = str(tmp_path / 'in')
  config.predict.output = str(tmp_path / 'out')
  config.predict.flush_seconds = 0.0
  config.eval.batch_size = 2
  scored, original = [], predict.score_chunk

  def interrupt_second_batch(predict_fn, params, chunk, *args):
    if len(scored) == 1:
      raise KeyboardInterrupt
    scored.append([x.name for x in chunk])
    return original(predict_fn, params, chunk, *args)

  monkeypatch.setattr(predict, 'score_chunk', interrupt_second_batch)
  with pytest.raises(KeyboardInterrupt):
    run_lib.run(config, workdir)
  csv_path = tmp_path / 'out' / 'predictions.csv'
  with open(csv_path) as f:
    assert [r['name'] for r in csv.DictReader(f)] == ['a0.png', 'a1.png']

  def count(predict_fn, params, chunk, *args):
    scored.append([x.name for x in chunk])
    return original(predict_fn, params, chunk, *args)

  monkeypatch.setattr(predict, 'score_chunk', count)
  scored.clear()
  report = run_lib.run(config, workdir)
  assert scored == [['a2.png', 'a3.png'], ['bad.png']]
  assert [r['name'] for r in report['predictions']] == [
      'a0.png', 'a1.png', 'a2.png', 'a3.png', 'bad.png']
  assert report['summary']['error'] == 1
  scored.clear()  # A third run tries the failed image again, only it.
  report = run_lib.run(config, workdir)
  assert scored == [['bad.png']]
  assert len(report['predictions']) == 5


def test_predict_command_survives_bad_frames(trained, tmp_path):
  """From the command line (without TensorFlow): unreadable frames become
  ERROR rows with the reason, the rest are scored, equal stems keep apart,
  the reports are written, and the exit status (3) and last line say what
  failed."""
  _, workdir = trained
  inputs = tmp_path / 'in'
  _save(str(inputs / 'line1' / '001.png'), (40, 50, 3), seed=1)
  _save(str(inputs / 'line2' / '001.png'), (40, 50, 3), seed=2)
  _truncated_png(str(inputs / 'line1' / '002.png'))
  (inputs / 'garbage.jpg').write_bytes(b'\xff\xd8 not a jpeg')
  env = subprocess_env()
  # Predict needs no TensorFlow: run it as where none is installed.
  proc = subprocess.run(
      [sys.executable, '-c', BLOCKING_RUNNER,
       '--config', os.path.join(REPO, 'configs', 'smoke.py'),
       '--workdir', workdir, '--config.mode=predict',
       f'--config.predict.inputs={inputs}',
       f'--config.predict.output={tmp_path / "out"}'],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert proc.returncode == 3, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('rcae_jax: predict: 4 images, ') and (
      '2 ERROR' in last and 'garbage.jpg' in last), last
  assert 'Predicted 4/4 images (2 errors)' in proc.stderr
  with open(tmp_path / 'out' / 'predictions.csv') as f:
    rows = {r['name']: r for r in csv.DictReader(f)}
  assert sorted(rows) == ['garbage.jpg', 'line1/001.png', 'line1/002.png',
                          'line2/001.png']
  for bad in ('garbage.jpg', 'line1/002.png'):
    assert rows[bad]['decision'] == 'ERROR' and bad in rows[bad]['error']
  maps = [np.asarray(Image.open(tmp_path / 'out' / f'{n}.tiff'))
          for n in ('line1/001.png', 'line2/001.png')]
  assert maps[0].shape == (40, 50) and not np.array_equal(*maps)
  assert (tmp_path / 'out' / 'line2' / '001.png.overlay.png').exists()
  # The two scored frames' decisions from their scores and the workdir's
  # threshold; the summary counts those rows.
  threshold = json.load(open(os.path.join(workdir, 'thresholds.json')))['image']
  scored = [rows[n] for n in ('line1/001.png', 'line2/001.png')]
  decisions = ['DEFECT' if float(r['score']) >= threshold else 'OK'
               for r in scored]
  assert [r['decision'] for r in scored] == decisions
  saved = json.load(open(tmp_path / 'out' / 'predictions.json'))
  assert saved['summary'] == {'images': 4, 'ok': decisions.count('OK'),
                              'defect': decisions.count('DEFECT'),
                              'error': 2}


def test_inference_modes_import_no_training_code():
  """Evaluation, predict, benchmark, export and the reports load
  parameters without optax, the train state or the training loop (a fresh
  interpreter: this one has imported everything)."""
  code = ('import sys\n'
          'from rcae_jax.evaluation import evaluate\n'
          'from rcae_jax.serving import export, predict\n'
          'from rcae_jax.tools import benchmark, depth_report, fusion_report, '
          'shortcut_report\n'
          "print(sorted(m for m in sys.modules if m.split('.')[0] == 'optax'"
          " or m.startswith('rcae_jax.training')))")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, env=subprocess_env(), timeout=120,
                       check=True)
  assert out.stdout.strip() == '[]', out.stdout
