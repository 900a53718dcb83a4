"""eval.scoring='fused': CRD's map and the recursion map, each over its
held-out median, in evaluate, predict and export."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import evaluated_copy, set_fields

from rcae_jax import run as run_lib
from rcae_jax import validate
from rcae_jax.data import geometry
from rcae_jax.evaluation import fusion
from rcae_jax.evaluation import loops
from rcae_jax.evaluation import maps as maps_lib
from rcae_jax.serving import export
from rcae_jax.serving import params as params_lib


def _with(config, **fields):
  return set_fields(config.copy_and_resolve_references(), **fields)


@pytest.fixture(scope='module')
def fused(trained, tmp_path_factory):
  """(config, workdir, loader, params): a copy of the trained workdir
  evaluated with scoring='fused' (the shared one keeps its CRD metrics)."""
  config, workdir = evaluated_copy(trained, tmp_path_factory, 'fused',
                                   **{'eval.scoring': 'fused'})
  loader = run_lib.prepare(config, workdir)
  params = jax.device_get(params_lib.load_params(config, workdir))
  return config, workdir, loader, params


def test_fuse_is_the_sum_over_medians():
  crd, rec = np.full((2, 4, 4), 2.0), np.full((2, 4, 4), 3.0)
  # 2 / 4 + 3 / 0.5: each map over its own median, then summed.
  np.testing.assert_allclose(
      fusion.fuse(crd, rec, {'crd': 4.0, 'recursion': 0.5}), 6.5)
  pixels = np.arange(1, 102, dtype=np.float32)
  assert fusion.normalisers_from(pixels, 2 * pixels) == {'crd': 51.0,
                                                         'recursion': 102.0}
  # A saturated map's median of 0 never divides by zero.
  assert fusion.normalisers_from(np.zeros(5), pixels)['crd'] == fusion.TINY
  with pytest.raises(ValueError, match='normalisers'):
    fusion.fuse(crd, rec, None)


def test_fused_needs_stage_3(make_config):
  with pytest.raises(validate.ConfigError, match="'fused' needs stage 3"):
    validate.validate(make_config(**{'eval.scoring': 'fused',
                                     'train.stage3.steps': 0}))
  validate.validate(make_config(**{'eval.scoring': 'fused'}))


def test_normalisers_are_held_out_medians_and_maps_fuse_by_them(fused):
  config, workdir, loader, params = fused
  stored = json.load(open(os.path.join(workdir, fusion.FILE)))
  assert stored['quantile'] == 0.5 and stored['num_images'] > 0
  maps = {}
  for part in ('crd', 'recursion'):
    cfg = _with(config, **{'eval.scoring': part})
    fn = maps_lib.make_predict_fn(cfg)
    val = loops.run_predictions(params, loader, cfg, 'val', fn)[0]
    pixels = np.concatenate([geometry.crop(m, e).ravel() for m, e in
                             zip(val, loader.extents('val'))])
    assert stored[part] == pytest.approx(float(np.median(pixels)), rel=1e-6)
    maps[part] = loops.run_predictions(params, loader, cfg, 'test', fn)[0]
  normalisers = fusion.for_config(config, workdir)
  got = loops.run_predictions(
      params, loader, config, 'test',
      maps_lib.make_predict_fn(config, normalisers=normalisers))[0]
  np.testing.assert_allclose(
      got, maps['crd'] / stored['crd'] + maps['recursion'] / stored[
          'recursion'], rtol=1e-5, atol=1e-6)
  # Not either map alone (the fixture's two medians differ).
  assert not np.allclose(got, maps['crd'] / stored['crd'] * 2)
  (metrics,) = json.load(open(os.path.join(workdir,
                                           'metrics.json'))).values()
  assert metrics['scoring'] == 'fused'


def test_predict_scores_as_evaluate_does(fused, tmp_path):
  """The test images, saved at the model's size, score in predict as in
  evaluation's loop with the stored normalisers."""
  config, workdir, loader, params = fused
  fn = maps_lib.make_predict_fn(config,
                                normalisers=fusion.for_config(config, workdir))
  _, scores, _, _, _ = loops.run_predictions(params, loader, config, 'test',
                                             fn)
  images = [b['image'][np.asarray(b['valid'], bool)] for b in
            loader.test_batches(config.eval.batch_size)]
  images = np.concatenate(images)
  folder = tmp_path / 'in'
  folder.mkdir()
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / f'{i:03d}.png')
  cfg = _with(config, **{'mode': 'predict', 'predict.inputs': str(folder),
                         'predict.output': str(tmp_path / 'out')})
  rows = run_lib.run(cfg, workdir)['predictions']
  got = [r['score'] for r in sorted(rows, key=lambda r: r['name'])]
  np.testing.assert_allclose(got, scores, rtol=1e-5, atol=1e-6)
  thresholds = json.load(open(os.path.join(workdir, 'thresholds.json')))
  assert [r['decision'] for r in sorted(rows, key=lambda r: r['name'])] == [
      'DEFECT' if s >= thresholds['image'] else 'OK' for s in got]


def test_export_bakes_the_normalisers_in(fused, tmp_path, monkeypatch):
  config, workdir, _, params = fused
  # The shipped scorer script is not what this test is about (and its
  # source path is being moved by the layout work): a stand-in.
  stand_in = tmp_path / 'serve_export.py'
  stand_in.write_text('# stand-in\n')
  monkeypatch.setattr(export, 'SERVE_SOURCE', str(stand_in))
  meta = run_lib.run(_with(config, mode='export'), workdir)
  stored = json.load(open(os.path.join(workdir, fusion.FILE)))
  assert meta['scoring'] == 'fused'
  assert meta['fusion_normalisers'] == {k: stored[k] for k in fusion.UNIT}
  images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3),
                                             np.uint8)
  got = export.load_predict(os.path.join(workdir, export.EXPORT_FOLDER,
                                         export.FUNCTION_FILE))(images)
  want = maps_lib.make_predict_fn(
      config, normalisers=fusion.for_config(config, workdir))(params, images)
  for key in ('map', 'score'):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('mode', ['predict', 'export'])
def test_missing_normalisers_name_what_to_run(fused, tmp_path, mode):
  config, workdir, _, _ = fused
  bare = str(tmp_path / 'wd')
  shutil.copytree(workdir, bare)
  os.remove(os.path.join(bare, fusion.FILE))
  cfg = _with(config, **{'mode': mode, 'predict.inputs': str(tmp_path),
                         'predict.output': str(tmp_path / 'out')})
  with pytest.raises(validate.ConfigError,
                     match='fusion_normalisers.json is missing') as e:
    run_lib.run(cfg, bare)
  message = str(e.value)
  assert '\n' not in message
  assert '--config.mode=evaluate --config.eval.scoring=fused' in message
