"""tools/map_screen.py: positional standardisation and the image scores
that issue 36's screen compares."""

import numpy as np

from conftest import tiny_config
from rcae_jax.evaluation import scoring
from rcae_jax.tools import map_screen


def test_positional_z_makes_a_recurring_edge_normal():
  rng = np.random.default_rng(0)
  val = rng.normal(0.1, 0.01, (20, 32, 32)).astype(np.float32)
  val[:, :, 16] += 1.0  # An edge every good image has, always there.
  test = rng.normal(0.1, 0.01, (2, 32, 32)).astype(np.float32)
  test[:, :, 16] += 1.0
  test[1, 5:8, 5:8] += 0.3  # A defect weaker than the edge.
  z = map_screen.positional_z(test, val)
  # Raw, the edge outranks the defect; standardised, the defect wins.
  assert test[1, 6, 6] < test[1, 6, 16]
  assert z[1, 6, 6] > 3 * np.abs(z[1, :, 16]).max()


def test_border_correct_box_keeps_a_flat_map_flat():
  maps = np.full((1, 16, 16), 0.5, np.float32)
  # Zero padding lowers the border of the smoothed map; the average over
  # in-image pixels does not.
  assert np.asarray(scoring.box_blur(maps, 5))[0, 0, 0] < 0.5 * 0.5
  np.testing.assert_allclose(scoring.box_blur_valid(maps, 5), maps,
                             rtol=1e-6)
  # Keep-aspect padding (invalid pixels) counts neither way.
  valid = np.zeros((1, 16, 16), bool)
  valid[:, :, :8] = True
  np.testing.assert_allclose(
      np.asarray(scoring.box_blur_valid(maps, 5, valid))[valid], 0.5,
      rtol=1e-6)


def test_top_mean_is_the_mean_of_the_highest_valid_pixels():
  maps = np.zeros((1, 100, 100), np.float32)
  maps[0, 0, :10] = np.arange(10)
  np.testing.assert_allclose(scoring.top_mean(maps, 0.0005), [7.0])
  valid = np.ones_like(maps, bool)
  valid[0, 0, 9] = False  # The 9 is padding: 4..8 are the top five.
  np.testing.assert_allclose(scoring.top_mean(maps, 0.0005, valid), [6.0])


def test_the_screens_scores_are_evaluations():
  maps = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
  cfg = tiny_config().eval
  got = map_screen.image_scores(maps, cfg)
  cfg.image_score, cfg.top_fraction = 'top_mean', map_screen.TOP_FRACTION
  np.testing.assert_allclose(got['top_mean'],
                             scoring.image_scores(maps, cfg), rtol=1e-6)
