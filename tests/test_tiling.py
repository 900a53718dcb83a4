"""Tiling of high-resolution images (`data.tile_size`, `data.tile_overlap`,
`data.tile_sampling`): tiles cover every pixel, maps stitch back exactly
and in place, an image of one tile's size maps as without tiling, both
loaders cut the same training tiles, and a tiled run works end to end."""

import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import BRIGHT, DARK, REPO
from conftest import brightness_predict_fn
from conftest import assert_pixel_metrics_are_the_maps
from conftest import subprocess_env
from conftest import surface, surface_category, write_image

from rcae_jax import run as run_lib
from rcae_jax import validate
from rcae_jax.data import folder
from rcae_jax.data import input_pipeline
from rcae_jax.data import loader as loader_lib
from rcae_jax.data import order as order_lib
from rcae_jax.data import tfdata_loader
from rcae_jax.data import tiling
from rcae_jax.evaluation import evaluate
from rcae_jax.evaluation import scoring
from rcae_jax.evaluation import maps as maps_lib
from rcae_jax.evaluation import loops
from rcae_jax.model import inference
from rcae_jax.training import train



# ------------------------------------------------------- tiles and stitching


@pytest.mark.parametrize('length', [1, 20, 32, 33, 64, 100, 257])
@pytest.mark.parametrize('overlap', [0.0, 0.25, 0.5, 0.9])
def test_tiles_cover_every_pixel_with_the_overlap_asked(length, overlap):
  side = 32
  o = int(overlap * side)
  starts = tiling.origins(length, side, o)
  assert starts[0] == 0
  if length <= side:
    assert starts.tolist() == [0]
    return
  assert starts[-1] == length - side  # The last tile is flush.
  gaps = np.diff(starts)
  assert (gaps >= 1).all() and (gaps <= side - o).all()  # Overlap >= o.
  assert len(starts) == -(-(length - o) // (side - o))  # README's count.
  covered = np.zeros(length, int)
  for s in starts:
    covered[s:s + side] += 1
  assert covered.min() >= 1


def test_a_map_cut_into_tiles_stitches_back_exactly():
  rng = np.random.default_rng(0)
  amap = rng.random((100, 77)).astype(np.float32)
  t = tiling.Tiling(tile=32, side=32, overlap=0.25, sampling='grid')
  origins = tiling.grid(amap.shape, t)
  assert len(origins) == tiling.count(amap.shape, t) == 4 * 3
  parts = []
  for origin in origins:
    tile, (h, w) = tiling.cut(amap, origin, 32)
    assert tile.shape == (32, 32)
    parts.append(tile[:h, :w])
  np.testing.assert_array_equal(tiling.stitch(parts, origins, amap.shape),
                                amap)
  # Smaller than a tile: one tile, edge-padded, its extent the image.
  small = amap[:20, :30]
  tile, ext = tiling.cut(small, (0, 0), 32)
  assert ext == (20, 30)
  np.testing.assert_array_equal(tile[25], np.pad(small[-1], (0, 2), 'edge'))


def test_blending_weights_taper_only_towards_inner_borders():
  w = tiling.window((24, 0), (32, 32), (100, 77))
  # Top border inside the image: tapered; left border on its edge: not.
  assert w[0, 16] == 1 and w[31, 16] == 1 and w[16, 16] == 16
  assert w[16, 0] == 16
  one = tiling.window((0, 0), (20, 30), (20, 30))
  assert (one == one.max()).all()  # A tile alone: a constant weight.


def _brightness(images):
  return np.asarray(images, np.float32).mean(-1) / 255


@pytest.mark.parametrize('tile', [32, 64])
def test_stitched_maps_land_where_their_tiles_came_from(tile):
  """A stand-in model whose map is each pixel's brightness: the stitched
  map must equal the brightness of the whole (working-resolution) image,
  so any tile placed wrongly, flipped or cropped wrongly shows."""
  rng = np.random.default_rng(1)
  t = tiling.Tiling(tile=tile, side=32, overlap=0.25, sampling='random')
  images = [rng.integers(0, 256, hw + (3,), dtype=np.uint8)
            for hw in ((150, 97), (20, 45), (64, 64), (33, 200))]
  working = [tiling.to_working(im, t) for im in images]
  calls = []

  def predict(batch, pieces):
    calls.append((batch.shape, len(pieces)))
    return _brightness(batch)

  out = list(tiling.stitch_stream(iter(working), predict, t, batch_size=8))
  assert [n for n, _ in out] == [0, 1, 2, 3]
  for (_, amap), image in zip(out, working):
    np.testing.assert_allclose(amap, _brightness(image), atol=1e-6)
  assert {shape for shape, _ in calls} == {(8, 32, 32, 3)}  # One shape.
  assert sum(n for _, n in calls) == sum(tiling.count(w.shape[:2], t)
                                         for w in working)


def _reference_score(amap, score, smoothing, size):
  """The image score by its definition, pixel by pixel in float64: the
  maximum of the box mean (zero outside the map) or of the edge-padded
  separable Gaussian of sigma size / 3, or the plain mean."""
  if score == 'mean':
    return amap.mean()
  h, w = amap.shape
  if smoothing == 'box':
    lo = (size - 1) // 2
    padded = np.pad(amap.astype(np.float64), ((lo, size - 1 - lo),) * 2)
    return max(padded[y:y + size, x:x + size].sum() / size ** 2
               for y in range(h) for x in range(w))
  k = scoring.gaussian_kernel(size / 3).astype(np.float64)
  r = len(k) // 2
  padded = np.pad(amap.astype(np.float64), r, mode='edge')
  return max((np.outer(k, k) * padded[y:y + 2 * r + 1, x:x + 2 * r + 1]).sum()
             for y in range(h) for x in range(w))


def test_stitched_scores_follow_the_eval_config():
  """`map_score` (one map of any size) and the jitted batch `image_scores`
  both equal the score computed from its definition."""
  rng = np.random.default_rng(2)
  maps = rng.random((3, 24, 40)).astype(np.float32)
  for score, smoothing, size in (('max', 'box', 4), ('max', 'box', 3),
                                 ('max', 'gaussian', 6), ('mean', 'box', 1)):
    cfg = type('Eval', (), dict(image_score=score, smoothing=smoothing,
                                smoothing_size=size))
    expected = [_reference_score(m, score, smoothing, size) for m in maps]
    batch = np.asarray(scoring.image_scores(jnp.asarray(maps), cfg))
    got = [scoring.map_score(m, cfg) for m in maps]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(batch, expected, rtol=1e-5)


# ------------------------------------------------------------ evaluation


def test_an_image_of_one_tile_maps_exactly_as_untiled(make_config, tmp_path):
  """48 px images, 48 px tiles, a 32 px model: tiled or not, each image is
  one 32 px model input, and the maps and scores must agree."""
  root = surface_category(tmp_path, 'one', [(48, 48)] * 2, (48, 48),
                          defects=[(10, 12, 6, 8)])
  files = folder.discover(root, 'one')
  config = make_config(**{'eval.scoring': 'recursion'})
  nets = inference.build_networks(config.model)
  params = train.initial_params(nets, config)
  fn = maps_lib.make_predict_fn(config, nets)
  untiled = loader_lib.MemoryLoader(files, 32)
  tiled = loader_lib.MemoryLoader(
      files, 32, tiling=tiling.Tiling(tile=48, side=32, overlap=0.25,
                                      sampling='random'))
  a = loops.run_predictions(params, untiled, config, 'test', fn, keep=[2])
  b = loops.run_predictions(params, tiled, config, 'test', fn, keep=[2])
  assert len(a[0]) == len(b[0]) == 3
  for x, y in zip(a[0], b[0]):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_allclose(a[1], b[1], rtol=1e-6)  # Scores.
  np.testing.assert_array_equal(a[2], b[2])  # Labels.
  np.testing.assert_array_equal(np.stack(b[3]), a[3].astype(bool))  # Masks.
  assert a[4][2][2] == b[4][2][2] == (0, 0, 32, 32)  # The picture's box.
  np.testing.assert_array_equal(a[4][2][0], b[4][2][0])


def test_a_defect_smaller_than_a_tile_is_found_in_a_large_image(
    make_config, tmp_path, monkeypatch):
  """256 px images, 5 px defects, a 32 px model: squashed, a defect is a
  fraction of a model pixel; tiled at native resolution, the stitched map
  at the image's size peaks on it. One defect sits across tile seams."""
  defects = [(200, 150, 5, 5), (40, 45, 5, 5)]  # The second on a seam.
  root = surface_category(tmp_path / 'data', 'big', [(256, 256)] * 2,
                          (256, 256), defects)
  files = folder.discover(root, 'big')
  monkeypatch.setattr(maps_lib, 'make_predict_fn', brightness_predict_fn)
  peaks = {}
  for tile in (0, 32):
    config = make_config(**{'data.tile_size': tile,
                            'eval.scoring': 'recursion',
                            'eval.pictures_per_type': 1})
    loader = input_pipeline.make_loader(config.data, files, files.train)
    workdir = str(tmp_path / f'wd{tile}')
    report = evaluate.evaluate(None, loader, config, workdir)['big']
    maps = [np.asarray(Image.open(os.path.join(
        workdir, 'anomaly_maps', 'big', 'test', 'spot', f'00{i}.tiff')))
            for i in range(2)]
    assert all(m.shape == (256, 256) for m in maps)
    peaks[tile] = [m[y:y + h, x:x + w].mean()
                   for m, (y, x, h, w) in zip(maps, defects)]
    if tile:
      assert report['image_auroc'] == 1.0
      assert report['pixel_auroc'] > 0.999
      for m, (y, x, h, w) in zip(maps, defects):
        found = m > (DARK + BRIGHT) / 2 / 255
        assert found.sum() == h * w and found[y:y + h, x:x + w].all()
      assert os.path.exists(os.path.join(workdir, 'pictures', 'spot',
                                         '000.png'))
      thresholds = json.load(open(os.path.join(workdir, 'thresholds.json')))
      assert thresholds['pixel'] < 0.3  # The good surface only.
  # The defect at full strength tiled; squashed, blurred into its
  # surroundings.
  np.testing.assert_allclose(peaks[32], BRIGHT / 255, rtol=1e-6)
  assert max(peaks[0]) < (DARK + BRIGHT) / 2 / 255


# --------------------------------------------------------------- training


@pytest.mark.parametrize('sampling', ['random', 'grid'])
def test_both_loaders_cut_the_same_training_tiles(tmp_path, sampling):
  # Larger than, smaller than and straddling a 48 px tile (32 px model).
  root = surface_category(tmp_path, 'mixed',
                          [(80, 100), (40, 24), (70, 50)], (48, 48))
  files = folder.discover(root, 'mixed')
  t = tiling.Tiling(tile=48, side=32, overlap=0.25, sampling=sampling)
  memory = loader_lib.MemoryLoader(files, 32, augment='hflip',
                                   tiling=t)
  tfdata = tfdata_loader.TFDataLoader(files, 32, augment='hflip', tiling=t)
  if sampling == 'grid':  # Working sizes 53x67, 27x16, 47x33.
    assert memory.num_train_examples == 2 * 3 + 1 + 2 * 2
  a, b = memory.train_batches(4, seed=3), tfdata.train_batches(4, seed=3)
  steps = [next(a)['image'] for _ in range(3)]
  for x in steps:
    assert x.shape == (4, 32, 32, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(x, next(b)['image'])
  # A resumed stream continues with the same tiles.
  np.testing.assert_array_equal(
      next(memory.train_batches(4, seed=3, start_step=2))['image'], steps[2])
  np.testing.assert_array_equal(
      next(tfdata.train_batches(4, seed=3, start_step=2))['image'], steps[2])
  # Each process's share is its slice of the global batch.
  half = next(memory.train_batches(4, seed=3, process_index=1,
                                   process_count=2))['image']
  np.testing.assert_array_equal(half, steps[0][2:])


def test_training_tiles_are_cut_from_the_working_image(tmp_path):
  root = surface_category(tmp_path, 'big', [(128, 128)] * 3, (48, 48))
  files = folder.discover(root, 'big')
  t = tiling.Tiling(tile=64, side=32, overlap=0.25, sampling='random')
  loader = loader_lib.MemoryLoader(files, 32, tiling=t)
  batch = next(loader.train_batches(3, seed=0, start_step=5))['image']
  idx = order_lib.batch_indices(5, 3, 3, seed=0)
  draws = order_lib.tile_draws(5, 0, 3)
  origins = set()
  for tile, k, u in zip(batch, idx, draws):
    working = loader.load_working(files.train[k])
    assert working.shape == (64, 64, 3)  # 128 px scaled by 32 / 64.
    y, x = tiling.random_origin(working.shape[:2], 32, u)
    np.testing.assert_array_equal(tile, working[y:y + 32, x:x + 32])
    origins.add((y, x))
  assert len(origins) > 1  # Not always the same corner.


# ------------------------------------------------------------ validation


@pytest.mark.parametrize('config_values,message', [
    ({'data.tile_size': -32}, 'config.data.tile_size must be 0 (off)'),
    ({'data.tile_overlap': 1.0}, 'config.data.tile_overlap'),
    ({'data.tile_overlap': -0.1}, 'config.data.tile_overlap'),
    ({'data.tile_sampling': 'spiral'}, 'config.data.tile_sampling must be'),
    ({'data.tile_size': 64, 'data.image_size': (32, 64)},
     'cuts square tiles'),
    ({'data.tile_size': 64, 'data.resize': 'keep_aspect'},
     "leave config.data.resize='squash'"),
    ({'data.tile_size': 64, 'mode': 'export'},
     "mode='export' does not support tiling"),
    ({'data.tile_size': 64, 'mode': 'depth_report'},
     "mode='depth_report' does not support tiling"),
    ({'data.tile_size': 64, 'mode': 'fusion_report'},
     "mode='fusion_report' does not support tiling"),
])
def test_bad_tiling_is_one_clear_error(make_config, config_values, message):
  with pytest.raises(validate.ConfigError, match=re.escape(message)):
    validate.validate(make_config(**config_values))


# ------------------------------------------------------------ end to end


@pytest.mark.slow
def test_tiled_run_from_the_command_line(make_config, tmp_path):
  """`python -m rcae_jax.main ... --config.data.tile_size=32`: trains on
  tiles, writes thresholds, metrics and TIFFs at each image's size from the
  stitched maps; predict scores images of any size; another tile size is
  refused on the trained workdir."""
  root = surface_category(tmp_path / 'data', 'wide', [(64, 96)] * 6,
                          (64, 96), defects=[(20, 70, 6, 6), (40, 10, 6, 6)])
  workdir = tmp_path / 'wd'
  # Stage 1 only, as in tests/test_aspect.py: stages 2 and 3 see the same
  # model-size batches.
  flags = [f'--config.data.root={root}', '--config.data.category=wide',
           '--config.data.tile_size=32', '--config.data.tile_overlap=0.5',
           '--config.train.stage2.steps=0', '--config.train.stage3.steps=0',
           '--config.eval.scoring=recursion', '--config.mesh.num_devices=1',
           '--config.tensorboard=False']  # No TensorFlow import: ~5 CPU-s.
  env = subprocess_env()
  result = subprocess.run(
      [sys.executable, '-m', 'rcae_jax.main', '--config',
       os.path.join(REPO, 'configs', 'smoke.py'), '--workdir', str(workdir),
       *flags], capture_output=True, text=True, env=env, timeout=600,
      cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  # 4 test images of 64 x 96 px, each 3 x 5 tiles at half overlap.
  assert 'Tiled test: 4 images as 60 tiles of 32 source px' in result.stderr
  report = json.load(open(workdir / 'metrics.json'))['wide']
  # The reported pixel numbers are those of the stitched maps written at
  # each image's size: a tile stitched in the wrong place or a constant
  # map fail here.
  assert_pixel_metrics_are_the_maps(
      report, str(workdir), 'wide', folder.discover(root, 'wide'))
  thresholds = json.load(open(workdir / 'thresholds.json'))
  assert thresholds['num_images'] >= 1
  tiff = workdir / 'anomaly_maps' / 'wide' / 'test' / 'spot' / '001.tiff'
  assert np.asarray(Image.open(tiff)).shape == (64, 96)
  saved = json.load(open(workdir / 'checkpoints' / 'model_config.json'))
  assert saved['data.tile_size'] == 32

  inputs = tmp_path / 'in'
  inputs.mkdir()
  sizes = {'long.png': (40, 150), 'small.png': (20, 20)}
  rng = np.random.default_rng(2)
  for name, hw in sizes.items():
    write_image(inputs / name, surface(rng, hw))
  config = make_config(**{'data.root': root, 'data.category': 'wide',
                          'data.tile_size': 32, 'data.tile_overlap': 0.5,
                          'train.stage2.steps': 0, 'train.stage3.steps': 0,
                          'eval.scoring': 'recursion', 'mode': 'predict',
                          'predict.inputs': str(inputs),
                          'predict.output': str(tmp_path / 'out')})
  rows = run_lib.run(config, str(workdir))['predictions']
  assert len(rows) == 2
  for row in rows:
    assert np.asarray(Image.open(row['map'])).shape == sizes[
        os.path.basename(row['file'])]
    assert row['decision'] in ('OK', 'DEFECT')
  config.data.tile_size = 64
  config.predict.output = str(tmp_path / 'out64')
  with pytest.raises(validate.ConfigError, match='data.tile_size'):
    run_lib.run(config, str(workdir))
