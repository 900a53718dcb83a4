"""Known values for the functions every reported number goes through.

The end-to-end tests only checked that metrics lie in [0, 1], which a map
of pure noise passes. Here: losses, the image score and its blurs, map
upsampling, the held-out split and the thresholds set on it, each against
values worked out by hand (in the comments). The trained model against a
noise map is tests/test_reliability.py::test_trained_smoke_model_beats_a_
noise_map.
"""

import os

import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from conftest import tiny_config
from rcae_jax import run as run_lib
from rcae_jax.common import fileio
from rcae_jax.data import folder
from rcae_jax.data import sources
from rcae_jax.evaluation import evaluate
from rcae_jax.evaluation import scoring
from rcae_jax.evaluation import maps as maps_lib
from rcae_jax.model import losses

# x, one 2 x 3 single-channel image:  0 1 3
#                                     2 4 7
X = jnp.array([[0., 1., 3.], [2., 4., 7.]])[None, :, :, None]


# ------------------------------------------------------------------ losses


def test_gradients_are_forward_differences_zero_at_the_far_edge():
  dy, dx = losses.gradients(X)
  np.testing.assert_array_equal(dy[0, ..., 0], [[2, 3, 4], [0, 0, 0]])
  np.testing.assert_array_equal(dx[0, ..., 0], [[1, 2, 0], [2, 3, 0]])
  image = losses.gradient_image(X)  # [dy, dx] stacked on channels.
  assert image.shape == (1, 2, 3, 2)
  np.testing.assert_array_equal(image[..., 0], dy[..., 0])
  np.testing.assert_array_equal(image[..., 1], dx[..., 0])


def test_l1_and_l2_with_gradient_known_values():
  zero = jnp.zeros_like(X)
  # |x|: 17/6, |dy|: 9/6, |dx|: 8/6.
  np.testing.assert_allclose(losses.l1_with_gradient(X, zero), 34 / 6,
                             rtol=1e-6)
  # x^2: 79/6, dy^2: 29/6, dx^2: 18/6.
  np.testing.assert_allclose(losses.l2_with_gradient(X, zero), 126 / 6,
                             rtol=1e-6)
  # An offset changes no gradient: only the plain term counts.
  np.testing.assert_allclose(losses.l1_with_gradient(X + 0.5, X), 0.5,
                             rtol=1e-6)
  np.testing.assert_allclose(losses.l2_with_gradient(X + 0.5, X), 0.25,
                             rtol=1e-6)
  assert float(losses.l1_with_gradient(X, X)) == 0.0


# ------------------------------------------------- image score and blurs


def impulse(size=9, at=(4, 4)):
  m = np.zeros((1, size, size), np.float32)
  m[0, at[0], at[1]] = 1.0
  return jnp.asarray(m)


def test_box_blur_averages_over_the_window_zero_padded():
  out = np.asarray(scoring.box_blur(impulse(5, (2, 2)), 3))[0]
  expected = np.zeros((5, 5))
  expected[1:4, 1:4] = 1 / 9
  np.testing.assert_allclose(out, expected, atol=1e-7)
  # At the border the window reaches into zeros and still divides by 9.
  corner = np.asarray(scoring.box_blur(impulse(5, (0, 0)), 3))[0]
  np.testing.assert_allclose(corner[:2, :2], 1 / 9, atol=1e-7)
  assert corner.sum() == pytest.approx(4 / 9)
  # Even windows ('SAME' pads one more after than before).
  even = np.asarray(scoring.box_blur(impulse(5, (2, 2)), 2))[0]
  expected = np.zeros((5, 5))
  expected[1:3, 1:3] = 1 / 4
  np.testing.assert_allclose(even, expected, atol=1e-7)
  np.testing.assert_array_equal(scoring.box_blur(impulse(), 1), impulse())


def test_gaussian_kernel_and_blur():
  k = scoring.gaussian_kernel(1.0)
  assert k.shape == (7,)  # Radius 3 sigma.
  # Centre weight: 1 / (1 + 2 (e^-1/2 + e^-2 + e^-9/2)) = 0.399050.
  assert k[3] == pytest.approx(0.399050, abs=1e-6)
  assert k.sum() == pytest.approx(1.0, abs=1e-6)
  assert k[4] / k[3] == pytest.approx(np.exp(-0.5), rel=1e-6)
  np.testing.assert_allclose(k, k[::-1])
  blurred = np.asarray(scoring.gaussian_blur(impulse(), 1.0))[0]
  np.testing.assert_allclose(blurred[1:8, 1:8], np.outer(k, k), atol=1e-7)
  # Edge padding: a constant map stays constant up to the border.
  flat = jnp.full((1, 6, 6), 0.7)
  np.testing.assert_allclose(scoring.gaussian_blur(flat, 2.0), 0.7,
                             rtol=1e-6)
  np.testing.assert_array_equal(scoring.gaussian_blur(impulse(), 0.0),
                                impulse())


def eval_cfg(**kwargs):
  return ml_collections.ConfigDict(dict(
      {'image_score': 'max', 'smoothing': 'box', 'smoothing_size': 3},
      **kwargs))


def test_image_scores_known_values():
  maps = jnp.concatenate([impulse(), 0.25 * jnp.ones((1, 9, 9))])
  np.testing.assert_allclose(
      scoring.image_scores(maps, eval_cfg(image_score='mean')),
      [1 / 81, 0.25], rtol=1e-6)
  # Max after a 3 x 3 box: a lone hot pixel counts 1/9, a flat map itself.
  np.testing.assert_allclose(scoring.image_scores(maps, eval_cfg()),
                             [1 / 9, 0.25], rtol=1e-6)
  # Gaussian of sigma = smoothing_size / 3 = 1: the centre weight squared.
  np.testing.assert_allclose(
      scoring.image_scores(maps, eval_cfg(smoothing='gaussian')),
      [0.399050 ** 2, 0.25], rtol=1e-5)
  # A single hot pixel must not outscore a small hot region.
  region = np.zeros((1, 9, 9), np.float32)
  region[0, 3:6, 3:6] = 0.5
  scores = scoring.image_scores(jnp.concatenate([impulse(), region]),
                                 eval_cfg())
  assert scores[1] > scores[0]


# --------------------------------------------------------------- upsample


def test_upsample_is_pixel_centred_bilinear():
  np.testing.assert_allclose(
      maps_lib.upsample(np.array([[0., 1.]]), (1, 4)), [[0, 0.25, 0.75, 1]],
      atol=1e-6)
  # Separable: rows and columns with the same weights W.
  w = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
  m = np.array([[0., 1.], [2., 3.]])
  np.testing.assert_allclose(maps_lib.upsample(m, (4, 4)), w @ m @ w.T,
                             atol=1e-6)
  same = maps_lib.upsample(m, (2, 2))
  assert same.dtype == np.float32
  np.testing.assert_array_equal(same, m)
  # Non-square targets keep (H, W) order.
  assert maps_lib.upsample(m, (6, 3)).shape == (6, 3)
  np.testing.assert_allclose(maps_lib.upsample(np.full((3, 5), 0.4),
                                               (7, 11)), 0.4, rtol=1e-6)


# ------------------------------------------------- held-out split, thresholds


def make_category(root, n_train=10):
  """Train images of value 100 + i (each one distinct), test images of
  255 (one good, one defective with a mask)."""
  cat = os.path.join(root, 'cat')

  def save(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(path)

  for i in range(n_train):
    save(os.path.join(cat, 'train', 'good', f'{i:03d}.png'), 100 + i)
  save(os.path.join(cat, 'test', 'good', '000.png'), 255)
  save(os.path.join(cat, 'test', 'crack', '000.png'), 255)
  mask = np.zeros((32, 32), np.uint8)
  mask[:4, :4] = 255
  os.makedirs(os.path.join(cat, 'ground_truth', 'crack'))
  Image.fromarray(mask).save(
      os.path.join(cat, 'ground_truth', 'crack', '000_mask.png'))
  return cat


def value_of(path: str) -> int:
  """The grey value make_category gave a training image."""
  return 100 + int(os.path.basename(path)[:3])


def test_held_out_split_is_disjoint_deterministic_and_never_trained_on(
    tmp_path):
  make_category(str(tmp_path))
  files = folder.discover(str(tmp_path), 'cat')
  train, val = sources.split_validation(files, 0.3, seed=0)
  assert len(val) == 3 and len(train.train) == 7
  assert not set(val) & set(train.train)
  assert sorted(val + train.train) == sorted(files.train)
  assert sources.split_validation(files, 0.3, seed=0) == (train, val)
  assert sources.split_validation(files, 0.3, seed=1)[1] != val
  assert sources.split_validation(files, 0.0, seed=0) == (files, ())
  # What the loader trains on: a whole epoch of batches holds only the
  # 7 training images (values 100 + i identify them), never a held-out one.
  config = tiny_config(**{'data.root': str(tmp_path),
                          'data.category': 'cat', 'data.val_fraction': 0.3})
  loader = run_lib.prepare(config, str(tmp_path / 'wd'))
  seen = set()
  for _, batch in zip(range(7), loader.train_batches(1, seed=0)):
    seen.add(int(batch['image'][0, 0, 0, 0]))
  held = {value_of(e.path) for e in loader.examples['val']}
  trained = {value_of(p) for p in loader.files.train}
  assert seen == trained and not seen & held and len(held) == 3


def fake_predict_fn(config, nets=None, normalisers=None, mesh=None):
  """map = the image's mean grey level: thresholds become known values."""
  del config, nets, normalisers, mesh

  def predict(params, images):
    del params
    x = np.asarray(images, np.float32) / 255.0
    amap = x.mean(-1)
    return {'recs': x[None], 'details': x[None], 'map': amap,
            'score': amap.max(axis=(1, 2))}

  return predict


def test_thresholds_come_from_the_held_out_split_only(tmp_path, monkeypatch):
  make_category(str(tmp_path))
  config = tiny_config(**{'data.root': str(tmp_path),
                          'data.category': 'cat', 'data.val_fraction': 0.3,
                          'eval.image_quantile': 1.0,
                          'eval.pixel_quantile': 0.0,
                          'eval.pictures_per_type': 0})
  workdir = str(tmp_path / 'wd')
  loader = run_lib.prepare(config, workdir)
  splits = []
  real = loader.test_batches

  def recording(batch_size, split='test'):
    splits.append(split)
    return real(batch_size, split)

  monkeypatch.setattr(loader, 'test_batches', recording)
  monkeypatch.setattr(maps_lib, 'make_predict_fn', fake_predict_fn)
  evaluate.evaluate({}, loader, config, workdir)
  thresholds = fileio.read_json(os.path.join(workdir,
                                                      'thresholds.json'))
  held = [value_of(e.path) for e in loader.examples['val']]
  trained = [value_of(p) for p in loader.files.train]
  # Image threshold: the brightest held-out image (quantile 1); pixel
  # threshold: the darkest held-out pixel (quantile 0). Neither is what the
  # training images (100 and 109 at the ends) or the test images (255)
  # would give.
  assert max(held) < max(trained) and min(held) > min(trained)
  assert thresholds['image'] == pytest.approx(max(held) / 255, abs=1e-6)
  assert thresholds['pixel'] == pytest.approx(min(held) / 255, abs=1e-6)
  assert thresholds['num_images'] == 3
  assert thresholds['source'] == 'held-out good training images'
  assert splits == ['test', 'val']  # Test predictions never feed them.
