"""Tests for rcae_jax.evaluation.metrics."""

import numpy as np
import pytest
import scipy.ndimage
from sklearn import metrics as skm

from rcae_jax.evaluation import metrics


# ---------------------------------------------------------------------------
# AUROC / AP / F1.
# ---------------------------------------------------------------------------


def test_auroc_all_equal_scores_is_half():
  assert metrics.auroc([0, 1, 0, 1, 1], [0.3] * 5) == 0.5


def test_auroc_perfect_and_reversed():
  labels = np.array([0, 0, 1, 1, 1])
  scores = np.array([0.1, 0.2, 0.5, 0.7, 0.9])
  assert metrics.auroc(labels, scores) == 1.0
  assert metrics.auroc(labels, -scores) == 0.0


def test_auroc_hand_computed_with_ties():
  # Pairs (pos, neg): pos 0.5 vs neg 0.5 -> 1/2, pos 0.5 vs neg 0.2 -> 1,
  # pos 0.9 beats both -> 2. AUC = 3.5 / 4.
  assert metrics.auroc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == 0.875
  # Classic example: 3 of 4 pairs ordered correctly.
  assert metrics.auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75


def test_auroc_accepts_any_shape_and_bool():
  labels = np.array([[False, True], [False, True]])
  scores = np.array([[0.1, 0.9], [0.2, 0.8]], dtype=np.float32)
  assert metrics.auroc(labels, scores) == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_match_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  n = 2000
  labels = rng.random(n) < 0.3
  # Rounded scores -> many ties; shifted for positives so the AUC is not 0.5.
  scores = np.round(rng.random(n) + 0.3 * labels, 1)
  np.testing.assert_allclose(
      metrics.auroc(labels, scores), skm.roc_auc_score(labels, scores),
      rtol=0, atol=1e-12)
  np.testing.assert_allclose(
      metrics.average_precision(labels, scores),
      skm.average_precision_score(labels, scores), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_f1_max_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  labels = rng.random(500) < 0.2
  scores = np.round(rng.random(500) + 0.5 * labels, 1)
  best = max(skm.f1_score(labels, scores >= t) for t in np.unique(scores))
  f1, thr = metrics.f1_max(labels, scores)
  np.testing.assert_allclose(f1, best, atol=1e-12)
  np.testing.assert_allclose(metrics.f1_at(labels, scores, thr), f1,
                             atol=1e-12)


def test_f1_max_hand_computed():
  labels = [1, 1, 0, 1, 0]
  scores = [0.9, 0.8, 0.7, 0.6, 0.2]
  # t=0.9: 2*1/(2+0+2)=0.5; t=0.8: 4/5=0.8; t=0.7: 4/6; t=0.6: TP=3, FP=1,
  # FN=0 -> 6/7; t=0.2: 6/8. Max 6/7 at 0.6.
  f1, thr = metrics.f1_max(labels, scores)
  assert f1 == pytest.approx(6 / 7)
  assert thr == 0.6


def test_f1_max_groups_ties():
  # The tied pair (one positive, one negative) must switch together:
  # t=0.9: TP=1 -> 2/(2+0+1) = 2/3; t=0.5: TP=2, FP=1 -> 4/5.
  # A split tie (taking only the positive at 0.5) would give 1.0.
  f1, thr = metrics.f1_max([1, 1, 0], [0.9, 0.5, 0.5])
  assert f1 == pytest.approx(0.8)
  assert thr == 0.5


def test_f1_at():
  # Labels [1, 1, 1, 0], predictions [1, 1, 0, 1]: TP=2, FP=1, FN=1 -> 4/6.
  assert metrics.f1_at([1, 1, 1, 0], [0.9, 0.8, 0.1, 0.5], 0.5) == (
      pytest.approx(2 / 3))
  assert metrics.f1_at([0, 0], [0.1, 0.2], 0.5) == 0.0


def test_single_class_raises():
  with pytest.raises(ValueError, match="only one class"):
    metrics.auroc([1, 1, 1], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="only one class"):
    metrics.auroc(np.zeros((2, 2)), np.ones((2, 2)))
  with pytest.raises(ValueError, match="without positive"):
    metrics.average_precision([0, 0], [0.1, 0.2])
  with pytest.raises(ValueError, match="same shape"):
    metrics.auroc([0, 1], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="NaN"):
    metrics.auroc([0, 1], [0.1, np.nan])


# ---------------------------------------------------------------------------
# AU-PRO.
# ---------------------------------------------------------------------------


def _two_region_mask():
  mask = np.zeros((10, 12), dtype=bool)
  mask[1:3, 1:4] = True  # Region A, 6 pixels.
  mask[6:8, 7:10] = True  # Region B, 6 pixels (not 8-connected to A).
  return mask


def test_au_pro_perfect_map():
  mask = _two_region_mask()
  good = np.zeros((7, 5), dtype=bool)
  maps = [mask.astype(np.float32), np.zeros(good.shape, np.float32)]
  # Curve (0,0), (0,1), (1,1), (1,1): area 0.3 -> normalised 1.
  assert metrics.au_pro([mask, good], maps) == pytest.approx(1.0, abs=1e-12)


def test_au_pro_one_region_found_one_tied_with_normal():
  mask = _two_region_mask()
  amap = np.ones(mask.shape)
  amap[1:3, 1:4] = 2.0  # Region A above every normal pixel.
  # Region B scores 1 like the normal pixels. Thresholds: t=2 -> FPR 0,
  # PRO 1/2 (A fully covered); t=1 -> FPR 1, PRO 1. Curve:
  # (0,0), (0,1/2), (1,1), (1,1). PRO at FPR 0.3 = 1/2 + 0.3/2 = 0.65, so
  # area = 0.3 * (0.5 + 0.65) / 2 = 0.1725 and au_pro = 0.1725 / 0.3 = 0.575.
  assert metrics.au_pro([mask], [amap]) == pytest.approx(0.575, abs=1e-12)


def test_au_pro_constant_map():
  mask = _two_region_mask()
  good = np.zeros((4, 9), dtype=bool)
  maps = [np.full(mask.shape, 0.5), np.full(good.shape, 0.5)]
  # One threshold: (0,0), (1,1), (1,1). Area under PRO = FPR up to 0.3 is
  # 0.3**2 / 2 = 0.045; / 0.3 = 0.15.
  assert metrics.au_pro([mask, good], maps) == pytest.approx(0.15, abs=1e-12)
  fprs, pros = metrics.pro_curve([mask, good], maps)
  np.testing.assert_array_equal(fprs, [0, 1, 1])
  np.testing.assert_array_equal(pros, [0, 1, 1])


def test_au_pro_limit_on_curve_point():
  # 10 normal pixels with distinct scores, one 1-pixel region scoring highest:
  # points (0,1), (0.1,1), ..., (1,1); at fpr_limit=0.3 (a curve point, no
  # interpolation) the area is 0.3 and au_pro is 1.
  mask = np.zeros((1, 11), dtype=bool)
  mask[0, 0] = True
  amap = np.array([[11.0] + list(range(10, 0, -1))])
  assert metrics.au_pro([mask], [amap], fpr_limit=0.3) == pytest.approx(1.0)


def test_trapezoid_area_interpolates():
  x, y = [0.0, 0.2, 0.4], [0.0, 1.0, 1.0]
  # 0.1 (triangle) + 0.1 * 1 (interpolated piece 0.2..0.3).
  assert metrics.trapezoid_area(x, y, 0.3) == pytest.approx(0.2)
  assert metrics.trapezoid_area(x, y) == pytest.approx(0.3)


def _reference_pro_curve(masks, maps):
  """Slow direct definition: per threshold, FPR and mean region overlap."""
  regions = []  # (image index, boolean region mask)
  ok_total = 0
  for i, mask in enumerate(masks):
    labeled, n = scipy.ndimage.label(mask != 0, structure=np.ones((3, 3)))
    regions += [(i, labeled == k) for k in range(1, n + 1)]
    ok_total += int(np.sum(labeled == 0))
  thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
  fprs, pros = [0.0], [0.0]
  for t in thresholds:
    fp = sum(int(np.sum((a >= t) & (m == 0))) for m, a in zip(masks, maps))
    overlaps = [np.sum((maps[i] >= t) & r) / np.sum(r) for i, r in regions]
    fprs.append(min(fp / ok_total, 1.0))
    pros.append(min(float(np.mean(overlaps)), 1.0))
  fprs.append(1.0)
  pros.append(1.0)
  return fprs, pros


def _reference_area(fprs, pros, limit):
  area = 0.0
  for (x0, y0), (x1, y1) in zip(zip(fprs, pros), zip(fprs[1:], pros[1:])):
    if x1 <= limit:
      area += (x1 - x0) * (y0 + y1) / 2
    elif x0 < limit:
      y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
      area += (limit - x0) * (y0 + y_lim) / 2
      break
    else:
      break
  return area / limit


def _random_set(rng):
  shapes = [(9, 13), (12, 7), (10, 10), (6, 15), (8, 8)]
  masks, maps = [], []
  for i, shape in enumerate(shapes):
    mask = np.zeros(shape, dtype=np.uint8)
    if i % 2 == 0:  # Odd indices stay good images.
      for _ in range(rng.integers(1, 4)):  # Several (maybe merging) blobs.
        r, c = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
        h, w = rng.integers(1, 4, size=2)
        mask[r:r + h, c:c + w] = 255
      mask[rng.random(shape) < 0.03] = 1  # Isolated pixels / diagonal links.
    # Few distinct values -> heavy ties, across images too.
    amap = np.round(rng.random(shape) + 0.4 * (mask > 0), 1).astype(np.float32)
    masks.append(mask)
    maps.append(amap)
  return masks, maps


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_au_pro_matches_slow_reference(seed, limit):
  rng = np.random.default_rng(seed)
  masks, maps = _random_set(rng)
  ref_fprs, ref_pros = _reference_pro_curve(masks, maps)
  fprs, pros = metrics.pro_curve(masks, maps)
  np.testing.assert_allclose(fprs, ref_fprs, rtol=0, atol=1e-12)
  np.testing.assert_allclose(pros, ref_pros, rtol=0, atol=1e-12)
  np.testing.assert_allclose(
      metrics.au_pro(masks, maps, fpr_limit=limit),
      _reference_area(ref_fprs, ref_pros, limit), rtol=0, atol=1e-9)


def test_au_pro_errors():
  mask = _two_region_mask()
  with pytest.raises(ValueError, match=r"index 1.*\(10, 12\).*\(12, 10\)"):
    metrics.au_pro([mask, mask], [np.zeros((10, 12)), np.zeros((12, 10))])
  with pytest.raises(ValueError, match="no defect region"):
    metrics.au_pro([np.zeros((3, 3))], [np.zeros((3, 3))])
  with pytest.raises(ValueError, match="no defect-free pixel"):
    metrics.au_pro([np.ones((3, 3))], [np.zeros((3, 3))])
  with pytest.raises(ValueError, match="1 masks but 2"):
    metrics.au_pro([mask], [mask, mask])


# ---------------------------------------------------------------------------
# compute_metrics and the clu wrapper.
# ---------------------------------------------------------------------------


def test_compute_metrics_keys_and_values():
  rng = np.random.default_rng(0)
  masks, maps = _random_set(rng)
  labels = np.array([m.any() for m in masks])
  scores = np.array([a.max() for a in maps])
  out = metrics.compute_metrics(labels, scores, masks, maps)
  assert set(out) == {"image_auroc", "image_ap", "image_f1_max",
                      "pixel_auroc", "pixel_ap", "pixel_f1_max", "au_pro"}
  pix_l = np.concatenate([m.ravel() > 0 for m in masks])
  pix_s = np.concatenate([a.ravel() for a in maps])
  assert out["pixel_auroc"] == pytest.approx(skm.roc_auc_score(pix_l, pix_s))
  assert out["au_pro"] == metrics.au_pro(masks, maps)
  assert all(isinstance(v, float) for v in out.values())


def test_compute_metrics_skips_pixels_without_defects():
  masks = [np.zeros((4, 5)), np.zeros((3, 3))]
  maps = [np.ones((4, 5)), np.ones((3, 3))]
  out = metrics.compute_metrics([0, 1], [0.1, 0.9], masks, maps)
  assert set(out) == {"image_auroc", "image_ap", "image_f1_max"}
  assert out["image_auroc"] == 1.0
