"""Native aspect ratio: `data.image_size` as (H, W) and `data.resize`
('squash' or 'keep_aspect'); maps come back at each image's own size,
aligned with its mask, and the padding counts nowhere."""

import json
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import BRIGHT, DARK
from conftest import brightness_predict_fn
from conftest import assert_pixel_metrics_are_the_maps
from conftest import surface, surface_category, write_image
from rcae_jax import run as run_lib
from rcae_jax import validate
from rcae_jax.data import folder
from rcae_jax.data import geometry
from rcae_jax.data import input_pipeline
from rcae_jax.data import loader as loader_lib
from rcae_jax.data import tfdata_loader
from rcae_jax.evaluation import evaluate
from rcae_jax.evaluation import scoring
from rcae_jax.evaluation import maps as maps_lib

# A long part, 3:1 like a strip on a line camera; the model input is 1:2,
# so 'keep_aspect' pads 11 of its 32 rows.
IMAGE_HW = (24, 72)
MODEL_HW = (32, 64)
# The defect touches the bottom edge: edge padding copies it into the
# padded rows, where it must not count as a false positive.
DEFECT = (slice(14, 24), slice(20, 44))


def _category(root, n_train=8):
  """<root>/long/ with non-square images, two with a defect (and masks)."""
  box = (DEFECT[0].start, DEFECT[1].start, DEFECT[0].stop - DEFECT[0].start,
         DEFECT[1].stop - DEFECT[1].start)
  return surface_category(root, 'long', [IMAGE_HW] * n_train, IMAGE_HW,
                          defects=[box, box])


def test_image_size_parses_a_side_or_a_pair():
  assert geometry.as_hw(64) == (64, 64)
  assert geometry.as_hw((32, 64)) == geometry.as_hw([32, 64]) == (32, 64)
  for bad in ((32,), (32, 64, 3), '64', (32.0, 64), True):
    with pytest.raises(validate.ConfigError, match='config.data.image_size'):
      geometry.as_hw(bad)


def test_fitted_size_keeps_the_aspect_ratio():
  assert geometry.fitted_hw(IMAGE_HW, MODEL_HW) == (21, 64)
  assert geometry.fitted_hw((203, 512), (128, 320)) == (127, 320)
  assert geometry.fitted_hw((512, 203), (128, 128)) == (128, 51)
  assert geometry.extent(IMAGE_HW, MODEL_HW, 'squash') == MODEL_HW


def test_keep_aspect_layout_is_edge_padded_and_crops_back():
  image = surface(np.random.default_rng(1), IMAGE_HW)
  image[DEFECT] = BRIGHT
  out = geometry.layout_image(image, MODEL_HW, 'keep_aspect')
  assert out.shape == MODEL_HW + (3,)
  h, w = geometry.fitted_hw(IMAGE_HW, MODEL_HW)
  # The padded rows repeat the last valid one: no step at the boundary.
  np.testing.assert_array_equal(out[h:], np.repeat(out[h - 1:h], 32 - h, 0))
  mask = np.zeros(IMAGE_HW, bool)
  mask[DEFECT] = True
  small = geometry.layout_mask(mask, MODEL_HW, 'keep_aspect')
  assert small.shape == MODEL_HW and not small[h:].any()
  back = maps_lib.upsample(geometry.crop(small.astype(np.float32), (h, w)),
                           IMAGE_HW) > 0.5
  assert (back & mask).sum() / (back | mask).sum() > 0.8


@pytest.mark.parametrize('config_values,message', [
    ({'data.image_size': (32, 40)}, 'divisible by 16 on both sides'),
    ({'data.resize': 'fit'}, 'config.data.resize must be one of'),
    ({'data.image_size': (32, 64), 'data.augment': 'rot90'},
     'rot90 needs a square'),
    ({'data.image_size': (32, 64), 'train.crop_size': 48}, 'shorter side'),
    ({'data.resize': 'keep_aspect', 'mode': 'export'},
     "resize='squash' only"),
])
def test_bad_geometry_is_one_clear_error(make_config, config_values, message):
  with pytest.raises(validate.ConfigError, match=message):
    validate.validate(make_config(**config_values))


def test_image_scores_ignore_the_padding():
  maps = np.zeros((2, 8, 8), np.float32)
  maps[:, 6, 3] = 5.0  # A spike in the padded rows of both.
  maps[1, 1, 1] = 1.0
  extents = jnp.asarray([[5, 8], [5, 8]])
  valid = geometry.valid_mask(extents, (8, 8))
  for score in ('max', 'mean'):
    cfg = ml_collections.ConfigDict(dict(image_score=score, smoothing='box',
                                         smoothing_size=1))
    plain = np.asarray(scoring.image_scores(jnp.asarray(maps), cfg))
    masked = np.asarray(scoring.image_scores(jnp.asarray(maps), cfg, valid))
    expected = [0.0, 1.0] if score == 'max' else [0.0, 1.0 / 40]
    np.testing.assert_allclose(masked, expected, rtol=1e-6)
    assert (plain > masked).all()


def test_both_loaders_lay_out_non_square_images_alike(tmp_path):
  files = folder.discover(_category(tmp_path, n_train=4), 'long')
  memory = loader_lib.MemoryLoader(files, MODEL_HW, resize='keep_aspect')
  tfdata = tfdata_loader.TFDataLoader(files, MODEL_HW, resize='keep_aspect')
  a = list(memory.test_batches(3))  # 4 test images: 2 batches, 1 padded.
  b = list(tfdata.test_batches(3))
  assert len(a) == len(b) == 2
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert a[0]['image'].shape == (3,) + MODEL_HW + (3,)
  np.testing.assert_array_equal(np.concatenate([x['extent'] for x in a]),
                                [[21, 64]] * 6)
  train = next(memory.train_batches(2, seed=0))['image']
  np.testing.assert_array_equal(
      train, next(tfdata.train_batches(2, seed=0))['image'])
  assert train.shape == (2,) + MODEL_HW + (3,)


@pytest.mark.parametrize('resize', ['squash', 'keep_aspect'])
@pytest.mark.parametrize('resolution', ['ground_truth', 'model'])
def test_maps_align_with_masks_and_padding_counts_nowhere(
    make_config, tmp_path, monkeypatch, resize, resolution):
  files = folder.discover(_category(tmp_path / 'data'), 'long')
  config = make_config(**{'data.image_size': MODEL_HW, 'data.resize': resize,
                          'eval.pixel_resolution': resolution,
                          'eval.scoring': 'recursion',
                          'eval.pictures_per_type': 1})
  monkeypatch.setattr(maps_lib, 'make_predict_fn', brightness_predict_fn)
  loader = input_pipeline.make_loader(config.data, files, files.train[:2])
  workdir = str(tmp_path / 'wd')
  report = evaluate.evaluate(None, loader, config, workdir)['long']
  assert report['image_auroc'] == 1.0
  # Counted, the bright padded rows below the defect (keep_aspect) would be
  # about as many false positives as the defect has pixels.
  assert report['pixel_auroc'] > 0.99
  mask = np.zeros(IMAGE_HW, bool)
  mask[DEFECT] = True
  tiff = os.path.join(workdir, 'anomaly_maps', 'long', 'test', 'spot',
                      '000.tiff')
  amap = np.asarray(Image.open(tiff))
  assert amap.shape == IMAGE_HW
  found = amap > (DARK + BRIGHT) / 2 / 255
  assert (found & mask).sum() / (found | mask).sum() > 0.8
  thresholds = json.load(open(os.path.join(workdir, 'thresholds.json')))
  assert thresholds['pixel'] < 0.3  # Good pixels only (the dark surface).


@pytest.mark.slow
def test_keep_aspect_trains_evaluates_and_predicts(make_config, tmp_path):
  root = _category(tmp_path / 'data')
  workdir = str(tmp_path / 'wd')
  # Stage 1 only: stages 2 and 3 see the same laid-out batches, and their
  # steps on non-square images compile for a minute on 2 cores.
  config = make_config(**{'data.root': root, 'data.category': 'long',
                          'data.image_size': MODEL_HW,
                          'data.resize': 'keep_aspect',
                          'train.stage2.steps': 0, 'train.stage3.steps': 0,
                          'eval.scoring': 'recursion'})
  report = run_lib.run(config, workdir)['long']
  # The reported pixel numbers are those of the maps written at each
  # image's own size against its mask: padding counted, a map misaligned
  # with its mask or a constant map fail here.
  assert_pixel_metrics_are_the_maps(
      report, workdir, 'long', folder.discover(root, 'long'))
  tiff = os.path.join(workdir, 'anomaly_maps', 'long', 'test', 'spot',
                      '001.tiff')
  assert np.asarray(Image.open(tiff)).shape == IMAGE_HW
  saved = json.load(open(os.path.join(workdir, 'checkpoints',
                                      'model_config.json')))
  assert saved['data.image_size'] == list(MODEL_HW)
  assert saved['data.resize'] == 'keep_aspect'

  inputs = tmp_path / 'in'
  inputs.mkdir()
  sizes = {'tall.png': (70, 20), 'long.png': IMAGE_HW, 'square.png': (33, 33)}
  rng = np.random.default_rng(2)
  for name, hw in sizes.items():
    write_image(inputs / name, surface(rng, hw))
  predict = config.copy_and_resolve_references()
  predict.mode = 'predict'
  predict.predict.inputs = str(inputs)
  predict.predict.output = str(tmp_path / 'out')
  rows = run_lib.run(predict, workdir)['predictions']
  assert len(rows) == 3
  for row in rows:
    assert np.asarray(Image.open(row['map'])).shape == sizes[
        os.path.basename(row['file'])]
    assert row['decision'] in ('OK', 'DEFECT')

  squashed = predict.copy_and_resolve_references()
  squashed.data.resize = 'squash'
  squashed.predict.output = str(tmp_path / 'out_squashed')
  with pytest.raises(validate.ConfigError, match='data.resize'):
    run_lib.run(squashed, workdir)
