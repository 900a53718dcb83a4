"""Tests for rcae_jax.evaluation.visualize and rcae_jax.evaluation.export_maps."""

import os

import numpy as np
import pytest
from PIL import Image

from rcae_jax.data import folder
from rcae_jax.evaluation import export_maps
from rcae_jax.evaluation import visualize


def _all_files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, files in os.walk(root) for f in files)


# ---------------------------------------------------------------------------
# Colour map, value range.
# ---------------------------------------------------------------------------


def test_colorize_distinct_colours_and_clipping():
  values = np.linspace(0.0, 1.0, 256).reshape(16, 16)
  rgb = visualize.colorize(values, 0.0, 1.0)
  assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
  # Every step of the scale has its own colour (no two values collide).
  assert len(np.unique(rgb.reshape(-1, 3), axis=0)) == 256
  # Low end blue-ish, high end red-ish.
  assert rgb[0, 0, 2] > rgb[0, 0, 0] and rgb[-1, -1, 0] > rgb[-1, -1, 2]
  # Out-of-range values clip to the ends of the scale; NaN draws as vmin.
  out = visualize.colorize(np.array([[-5.0, 0.0, 1.0, 7.0, np.nan]]), 0.0,
                           1.0)
  np.testing.assert_array_equal(out[0, 0], out[0, 1])
  np.testing.assert_array_equal(out[0, 3], out[0, 2])
  np.testing.assert_array_equal(out[0, 4], out[0, 1])
  assert not np.array_equal(out[0, 1], out[0, 2])


def test_colorize_fixed_scale_and_bad_scale():
  # The same value gets the same colour whatever else is in the map.
  a = visualize.colorize(np.array([[0.3, 0.9]]), 0.0, 1.0)
  b = visualize.colorize(np.array([[0.3, 0.1]]), 0.0, 1.0)
  np.testing.assert_array_equal(a[0, 0], b[0, 0])
  with pytest.raises(ValueError):
    visualize.colorize(np.zeros((2, 2)), 1.0, 1.0)


def test_lut_has_no_contour_colours():
  lut = {tuple(c) for c in visualize.LUT}
  assert visualize.GT_COLOR not in lut and visualize.PRED_COLOR not in lut


def test_value_range_robust_and_constant():
  maps = [np.zeros((100, 100), np.float32) for _ in range(3)]
  maps[0][0, 0] = 1000.0  # one outlier pixel must not set the scale
  maps[1][:10, :10] = 1.0
  vmin, vmax = visualize.value_range(maps)
  assert vmin == 0.0 and vmax == pytest.approx(1.0)
  vmin, vmax = visualize.value_range([np.full((4, 5), 3.0)] * 2)
  assert vmin == 3.0 and vmax > vmin
  vmin, vmax = visualize.value_range([np.full((4, 5), 1e10)])
  assert vmax > vmin
  assert visualize.value_range([np.full((2, 2), np.nan)]) == (0.0, 1.0)


# ---------------------------------------------------------------------------
# Contours and overlays.
# ---------------------------------------------------------------------------


def test_contour_of_filled_square_is_its_boundary():
  mask = np.zeros((20, 30), bool)
  mask[5:15, 8:18] = True  # 10 x 10 square
  c = visualize.contour(mask)
  assert c.dtype == bool and c.shape == mask.shape
  assert c.sum() == 4 * 10 - 4  # 36 boundary pixels
  assert c[5, 8:18].all() and c[14, 8:18].all()
  assert c[5:15, 8].all() and c[5:15, 17].all()
  assert not c[6:14, 9:17].any()
  assert not (c & ~mask).any()
  assert not visualize.contour(np.zeros((4, 4))).any()
  # A mask touching the border gets its boundary along the border.
  assert visualize.contour(np.ones((5, 7))).sum() == 2 * 5 + 2 * 7 - 4


def test_overlay_shape_and_gt_contour_colour():
  h, w = 24, 40  # non-square
  image = np.full((h, w, 3), 128, np.uint8)
  amap = np.tile(np.linspace(0.0, 1.0, w), (h, 1))
  mask = np.zeros((h, w), bool)
  mask[6:16, 10:30] = True
  out = visualize.overlay(image, amap, 0.0, 1.0, gt_mask=mask)
  assert out.shape == (h, w, 3) and out.dtype == np.uint8
  is_gt = np.all(out == visualize.GT_COLOR, axis=-1)
  np.testing.assert_array_equal(is_gt, visualize.contour(mask))
  # Elsewhere: the 50/50 blend of image and heat map.
  heat = visualize.colorize(amap, 0.0, 1.0).astype(np.float32)
  blend = np.round(0.5 * 128 + 0.5 * heat).astype(np.uint8)
  np.testing.assert_array_equal(out[~is_gt], blend[~is_gt])


def test_overlay_predicted_contour_where_map_exceeds_threshold():
  h, w = 30, 20
  image = np.zeros((h, w), np.uint8)  # grayscale input is accepted
  amap = np.zeros((h, w), np.float32)
  amap[10:20, 5:12] = 0.8
  out = visualize.overlay(image, amap, 0.0, 1.0, threshold=0.5)
  is_pred = np.all(out == visualize.PRED_COLOR, axis=-1)
  np.testing.assert_array_equal(is_pred, visualize.contour(amap >= 0.5))
  assert is_pred.sum() == 2 * 10 + 2 * 7 - 4
  # No threshold, no predicted contour.
  out = visualize.overlay(image, amap, 0.0, 1.0)
  assert not np.all(out == visualize.PRED_COLOR, axis=-1).any()


def test_overlay_rejects_mismatched_map():
  with pytest.raises(ValueError, match='resize'):
    visualize.overlay(np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4)), 0, 1)


# ---------------------------------------------------------------------------
# Panels.
# ---------------------------------------------------------------------------


def _panel_inputs(h=20, w=36, n=3):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  recs = [rng.random((h, w, 3)) for _ in range(n)]  # float in [0, 1]
  amap = rng.random((h, w)).astype(np.float32)
  mask = np.zeros((h, w), bool)
  mask[4:10, 5:20] = True
  return image, recs, amap, mask


def test_panel_shapes_non_square():
  h, w, n = 20, 36, 3
  image, recs, amap, mask = _panel_inputs(h, w, n)
  gap = visualize.GAP
  cols = n + 2
  out = visualize.panel(image, recs, None, amap, 0.0, 1.0, gt_mask=mask,
                        threshold=0.9, labels=False)
  assert out.dtype == np.uint8
  assert out.shape == (h, cols * w + (cols - 1) * gap, 3)
  # Input in the first tile, the first reconstruction in the second.
  np.testing.assert_array_equal(out[:, :w], image)
  np.testing.assert_array_equal(
      out[:, w + gap:2 * w + gap], np.round(recs[0] * 255).astype(np.uint8))
  # The overlay is the last tile.
  np.testing.assert_array_equal(
      out[:, -w:], visualize.overlay(image, amap, 0.0, 1.0, gt_mask=mask,
                                     threshold=0.9))

  # Second row of detail-restored images; labels and colour bar.
  details = [np.round(r * 255).astype(np.uint8) for r in recs]
  out = visualize.panel(image, recs, details, amap, 0.0, 1.0, labels=True)
  lh = visualize.LABEL_H
  assert out.shape == (2 * (lh + h) + gap,
                       cols * w + cols * gap + visualize.COLORBAR_W, 3)
  y2 = lh + h + gap + lh
  np.testing.assert_array_equal(out[y2:y2 + h, w + gap:2 * w + gap],
                                details[0])
  # Labels drew some dark text in the label bar above the input tile.
  assert (out[:lh, :w] < 100).any()


def test_panel_resizes_small_reconstructions_and_checks_details():
  image, _, amap, _ = _panel_inputs(20, 36, 2)
  recs = [np.zeros((10, 18, 3), np.uint8)] * 2
  out = visualize.panel(image, recs, None, amap, 0.0, 1.0, labels=False)
  assert out.shape[0] == 20
  with pytest.raises(ValueError):
    visualize.panel(image, recs, recs[:1], amap, 0.0, 1.0)


# ---------------------------------------------------------------------------
# Curves.
# ---------------------------------------------------------------------------


def test_curve_plot_size_and_content():
  fpr = np.linspace(0.0, 1.0, 50)
  out = visualize.curve_plot(fpr, np.sqrt(fpr), 'ROC', 'FPR', 'TPR')
  assert out.shape == (240, 320, 3) and out.dtype == np.uint8
  # Not blank: the curve's blue and dark axis/text pixels are present.
  assert (np.abs(out.astype(int) - (31, 90, 200)).sum(-1) == 0).sum() > 100
  assert (out.sum(-1) == 0).sum() > 100
  # PRO curve cut at x_max=0.3, another size.
  out = visualize.curve_plot(fpr, np.sqrt(fpr), 'PRO', 'FPR', 'PRO',
                             x_max=0.3, size=(200, 150))
  assert out.shape == (150, 200, 3)
  assert (np.abs(out.astype(int) - (31, 90, 200)).sum(-1) == 0).sum() > 50
  # Empty input still gives axes.
  out = visualize.curve_plot([], [], 't', 'x', 'y')
  assert (out.sum(-1) == 0).any()


def test_clip_polyline_cuts_at_x_max():
  pieces = visualize._clip_polyline(np.array([0.0, 0.2, 0.4, 0.1]),
                                    np.array([0.0, 0.2, 0.4, 0.1]), 0.3)
  assert len(pieces) == 2
  assert pieces[0][-1] == pytest.approx((0.3, 0.3))
  assert pieces[1][0] == pytest.approx((0.3, 0.3))
  assert pieces[1][-1] == (0.1, 0.1)


# ---------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------


def test_save_png_atomic(tmp_path):
  path = str(tmp_path / 'a' / 'b' / 'x.png')
  arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  visualize.save_png(path, arr)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), arr)
  assert _all_files(str(tmp_path)) == [os.path.join('a', 'b', 'x.png')]


def test_map_path_layout():
  p = export_maps.map_path('/out', 'bottle', '/data/bottle/test/crack/003.png',
                           'crack')
  assert p == os.path.join('/out', 'anomaly_maps', 'bottle', 'test', 'crack',
                           '003.tiff')


def test_export_writes_paths_and_round_trips_float32(tmp_path):
  rng = np.random.default_rng(1)
  examples = [
      folder.TestExample('/d/cat/test/good/000.png', 0, 'good', None),
      folder.TestExample('/d/cat/test/crack/001.png', 1, 'crack',
                  '/d/cat/ground_truth/crack/001_mask.png'),
      folder.TestExample('/d/cat/test/crack/002.JPG', 1, 'crack',
                  '/d/cat/ground_truth/crack/002_mask.png'),
  ]
  # Different (non-square) sizes per image, awkward float32 values.
  maps = [rng.standard_normal((7, 11)).astype(np.float32) * 1e3,
          rng.random((13, 5)).astype(np.float32) * 1e-7,
          np.array([[np.float32(1) / 3, -0.0, 3.4e38]], np.float32)]
  out = str(tmp_path)
  assert export_maps.export(out, 'cat', examples, maps) == 3
  assert _all_files(out) == sorted(
      os.path.join('anomaly_maps', 'cat', 'test', d, f)
      for d, f in [('good', '000.tiff'), ('crack', '001.tiff'),
                   ('crack', '002.tiff')])
  for e, m in zip(examples, maps):
    with Image.open(export_maps.map_path(out, 'cat', e.path,
                                         e.defect_type)) as img:
      assert img.mode == 'F'
      back = np.asarray(img)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, m)
  # float64 maps are stored as float32.
  export_maps.write_tiff_atomic(os.path.join(out, 'f64.tiff'),
                                np.array([[0.1, 0.2]]))
  with Image.open(os.path.join(out, 'f64.tiff')) as img:
    np.testing.assert_array_equal(np.asarray(img),
                                  np.array([[0.1, 0.2]], np.float32))


def test_export_rejects_bad_input(tmp_path):
  a = folder.TestExample('/d/t/crack/000.png', 1, 'crack', None)
  b = folder.TestExample('/d/t/crack/000.jpg', 1, 'crack', None)
  m = np.zeros((2, 2), np.float32)
  with pytest.raises(ValueError, match='both'):
    export_maps.export(str(tmp_path), 'c', [a, b], [m, m])
  with pytest.raises(ValueError):
    export_maps.export(str(tmp_path), 'c', [a], [m, m])
  with pytest.raises(ValueError, match='2-D'):
    export_maps.export(str(tmp_path), 'c', [a], [np.zeros((2, 2, 1))])
  assert _all_files(str(tmp_path)) == []


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
  def broken_save(self, fp, format=None, **kwargs):  # pylint: disable=redefined-builtin
    fp.write(b'partial')
    raise OSError('disk full')

  monkeypatch.setattr(Image.Image, 'save', broken_save)
  path = str(tmp_path / 'm' / 'x.tiff')
  with pytest.raises(OSError, match='disk full'):
    export_maps.write_tiff_atomic(path, np.zeros((3, 3), np.float32))
  with pytest.raises(OSError, match='disk full'):
    visualize.save_png(str(tmp_path / 'm' / 'y.png'),
                       np.zeros((3, 3, 3), np.uint8))
  assert _all_files(str(tmp_path)) == []
