"""Anomaly-detection metrics (host side, numpy/scipy).

Image level: AUROC, average precision, best F1. Pixel level: the same three
over all pixels of the test set, plus AU-PRO (area under the per-region-overlap
curve up to a false-positive-rate limit) computed the way MVTec AD's official
evaluation script computes it, so numbers are comparable with published ones.

Everything here runs on the host after the model has produced scores: the
inputs can be tens of millions of pixels, so each metric is a single sort plus
cumulative sums (O(n log n)), with int64 counters and float64 accumulators
(pixel counts of a whole test set can exceed 2**32, and float32 cumulative sums
lose precision long before that).

evaluate.py collects the maps and scores of the whole test set and calls
`compute_metrics` once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.ndimage

__all__ = [
    "au_pro",
    "auroc",
    "average_precision",
    "compute_metrics",
    "f1_at",
    "f1_max",
    "pro_curve",
    "roc_curve",
    "trapezoid_area",
]

# 8-connectivity for ground-truth regions, as in MVTec AD's evaluation code.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


# ---------------------------------------------------------------------------
# Binary classification metrics (image level and flattened pixel level).
# ---------------------------------------------------------------------------


def _flatten_binary(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
  """Flattens to (bool labels, scores in their own dtype) and validates."""
  labels = np.asarray(labels)
  scores = np.asarray(scores)
  if labels.shape != scores.shape:
    raise ValueError(
        f"labels and scores must have the same shape, got {labels.shape} and "
        f"{scores.shape}.")
  # Nonzero means positive (anomalous), matching scipy.ndimage.label's notion
  # of foreground used by au_pro, so 0/1, 0/255 and bool masks all work.
  y = labels.reshape(-1) != 0
  return y, _check_scores(scores.reshape(-1))


def _check_scores(s: np.ndarray) -> np.ndarray:
  """Validates flat scores; keeps their dtype.

  Scores are sorted in their own dtype (float32 sorts much faster than
  float64 at tens of millions of pixels); widening to float64 is exact and
  monotone, so it changes neither the order nor the tie groups.
  """
  if s.dtype.kind not in "biuf":
    raise ValueError(f"scores must be numeric, got dtype {s.dtype}.")
  if s.dtype.kind == "f" and np.isnan(s).any():
    # NaN breaks the sort order and therefore every threshold sweep.
    raise ValueError("scores contain NaN.")
  return s


def _tie_run_ends(sorted_desc: np.ndarray) -> np.ndarray:
  """Indices of the last element of each run of equal values."""
  # Keeping only the end of each run groups ties: a threshold t predicts every
  # score >= t as positive, so all tied scores switch together.
  change = sorted_desc[1:] != sorted_desc[:-1]
  return np.append(np.flatnonzero(change), sorted_desc.size - 1)


def _binary_curve(
    labels: Any, scores: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
  """True/false positive counts at every distinct threshold, descending.

  Returns (tps, fps, thresholds, n_pos, n_neg); tps[i] / fps[i] count the
  positives / negatives with score >= thresholds[i].
  """
  y, s = _flatten_binary(labels, scores)
  if s.size == 0:
    raise ValueError("labels and scores are empty.")
  # Ascending stable sort reversed = descending; the order inside a tie run
  # does not matter because only run ends are kept.
  order = np.argsort(s, kind="stable")[::-1]
  s_sorted = s[order]
  ends = _tie_run_ends(s_sorted)
  tps = np.cumsum(y[order], dtype=np.int64)[ends]
  fps = (ends + 1).astype(np.int64) - tps
  n_pos = int(tps[-1])
  n_neg = int(fps[-1])
  return tps, fps, s_sorted[ends].astype(np.float64), n_pos, n_neg


def roc_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
  """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1)."""
  tps, fps, _, n_pos, n_neg = _binary_curve(labels, scores)
  if n_pos == 0 or n_neg == 0:
    raise ValueError("ROC needs both classes: got %d positive and %d negative"
                     % (n_pos, n_neg))
  return (np.concatenate([[0.0], fps / n_neg]),
          np.concatenate([[0.0], tps / n_pos]))


def auroc(labels: Any, scores: Any) -> float:
  """Area under the ROC curve; ties count 1/2 (Mann-Whitney U / (P * N)).

  Args:
    labels: bool or 0/1 array of any shape (nonzero = positive), flattened.
    scores: array of the same shape; higher means more anomalous.

  Raises:
    ValueError: if only one class is present.
  """
  tps, fps, _, n_pos, n_neg = _binary_curve(labels, scores)
  if n_pos == 0 or n_neg == 0:
    raise ValueError(
        "AUROC is undefined when only one class is present "
        f"(got {n_pos} positive and {n_neg} negative labels).")
  # The trapezoid rule over the tie-grouped ROC curve equals the Mann-Whitney
  # statistic with ties counted 1/2. Doing it in integers keeps it exact:
  # 2 * U = sum dfp * (tp_prev + tp_cur) <= 2 * P * N, which fits in int64
  # for billions of pixels.
  tp = np.concatenate([[0], tps])
  fp = np.concatenate([[0], fps])
  twice_u = int(np.sum(np.diff(fp) * (tp[1:] + tp[:-1])))
  return twice_u / (2.0 * n_pos * n_neg)


def average_precision(labels: Any, scores: Any) -> float:
  """Average precision, as sklearn.metrics.average_precision_score.

  AP = sum_k (R_k - R_{k-1}) * P_k over distinct thresholds in descending
  order (step-wise, no interpolation), with R_{-1} = 0.

  Raises:
    ValueError: if there is no positive label (recall is undefined).
  """
  tps, fps, _, n_pos, _ = _binary_curve(labels, scores)
  if n_pos == 0:
    raise ValueError("average precision is undefined without positive labels.")
  precision = tps / (tps + fps)  # tps + fps >= 1 at every run end.
  recall_steps = np.diff(np.concatenate([[0], tps])) / n_pos
  return float(np.sum(recall_steps * precision))


def f1_max(labels: Any, scores: Any) -> tuple[float, float]:
  """Best F1 over thresholds; a threshold t predicts all scores >= t.

  Returns:
    (f1, threshold); among equal F1 values the highest threshold is returned.

  Raises:
    ValueError: if there is no positive label.
  """
  tps, fps, thresholds, n_pos, _ = _binary_curve(labels, scores)
  if n_pos == 0:
    raise ValueError("F1 is undefined without positive labels.")
  # F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + P); the denominator is >= P.
  f1 = 2.0 * tps / (tps + fps + n_pos)
  best = int(np.argmax(f1))
  return float(f1[best]), float(thresholds[best])


def f1_at(labels: Any, scores: Any, threshold: float) -> float:
  """F1 of predicting `scores >= threshold` as positive.

  Returns 0.0 when F1 is undefined (no positive label and no positive
  prediction), like sklearn's f1_score with its default zero_division.
  """
  y, s = _flatten_binary(labels, scores)
  pred = s >= threshold
  tp = int(np.count_nonzero(pred & y))
  fp = int(np.count_nonzero(pred & ~y))
  fn = int(np.count_nonzero(~pred & y))
  denom = 2 * tp + fp + fn
  return 2.0 * tp / denom if denom else 0.0


# ---------------------------------------------------------------------------
# Per-region overlap (PRO) curve, as in MVTec AD's official evaluation code.
# ---------------------------------------------------------------------------


def _check_masks_maps(masks: Sequence[Any], maps: Sequence[Any]) -> None:
  if len(masks) != len(maps):
    raise ValueError(
        f"got {len(masks)} masks but {len(maps)} anomaly maps.")
  if len(masks) == 0:
    raise ValueError("masks and maps are empty.")
  for i, (mask, amap) in enumerate(zip(masks, maps)):
    mask_shape, map_shape = np.shape(mask), np.shape(amap)
    if mask_shape != map_shape:
      raise ValueError(
          f"mask and anomaly map shapes differ at index {i}: mask "
          f"{mask_shape} vs map {map_shape}.")
    if len(mask_shape) != 2:
      raise ValueError(
          f"mask and anomaly map at index {i} must be 2-D, got shape "
          f"{mask_shape}.")


def pro_curve(
    masks: Sequence[Any], maps: Sequence[Any]
) -> tuple[np.ndarray, np.ndarray]:
  """Per-region-overlap curve over all distinct thresholds.

  Args:
    masks: one 2-D ground-truth mask per test image (nonzero = defect; good
      images are all zero). Shapes may differ between images.
    maps: one 2-D anomaly map per image, same shape as its mask.

  Returns:
    (fprs, pros), both float64 and non-decreasing, starting with (0, 0) and
    ending with (1, 1). FPR is over all defect-free pixels of the whole set;
    PRO is the mean over all ground-truth regions (8-connected components per
    image) of the fraction of the region at or above the threshold.

  Raises:
    ValueError: on shape mismatch, no defect region or no defect-free pixel.
  """
  _check_masks_maps(masks, maps)
  num_regions = 0
  num_ok = 0
  ok_parts = []
  pro_parts = []
  score_parts = []
  for mask, amap in zip(masks, maps):
    labeled, n_components = scipy.ndimage.label(
        np.asarray(mask) != 0, structure=_EIGHT_CONNECTED)
    labeled = labeled.reshape(-1)
    ok = labeled == 0
    num_ok += int(np.count_nonzero(ok))
    num_regions += n_components
    # Each pixel of a region of size s adds 1/s to that region's overlap, so
    # the running sum over sorted pixels is the summed per-region overlap.
    sizes = np.bincount(labeled, minlength=n_components + 1).astype(np.float64)
    inv_size = np.zeros_like(sizes)
    inv_size[1:] = 1.0 / sizes[1:]
    ok_parts.append(ok)
    pro_parts.append(inv_size[labeled])
    score_parts.append(np.asarray(amap).reshape(-1))
  if num_regions == 0:
    raise ValueError(
        "PRO is undefined: the masks contain no defect region.")
  if num_ok == 0:
    raise ValueError(
        "PRO is undefined: the masks contain no defect-free pixel.")

  # Mixed float32/float64 maps concatenate to float64, which is exact.
  scores = _check_scores(np.concatenate(score_parts))
  del score_parts
  order = np.argsort(scores, kind="stable")[::-1]
  scores_sorted = scores[order]
  ends = _tie_run_ends(scores_sorted)
  del scores, scores_sorted
  # As in the official code: integer false-positive counts divided by the
  # number of defect-free pixels (exact), and summed 1/region_size divided by
  # the number of regions. int64 because counts may exceed 2**32.
  fp_counts = np.cumsum(np.concatenate(ok_parts)[order], dtype=np.int64)[ends]
  overlap_sums = np.cumsum(np.concatenate(pro_parts)[order])[ends]
  fprs = np.minimum(fp_counts / num_ok, 1.0)
  pros = np.minimum(overlap_sums / num_regions, 1.0)
  return (np.concatenate([[0.0], fprs, [1.0]]),
          np.concatenate([[0.0], pros, [1.0]]))


def trapezoid_area(x: Any, y: Any, x_max: float | None = None) -> float:
  """Trapezoid-rule area under y(x) for x <= x_max (MVTec AD's rule).

  x must be non-decreasing. If x_max is not itself a point of x, the curve is
  linearly interpolated at x_max between the last point below it and the
  first point above it. Non-finite points are dropped, as the official code
  does.
  """
  x = np.asarray(x, dtype=np.float64)
  y = np.asarray(y, dtype=np.float64)
  finite = np.isfinite(x) & np.isfinite(y)
  x, y = x[finite], y[finite]
  correction = 0.0
  if x_max is not None:
    if not np.any(x == x_max):
      # First index with x > x_max (bisect_right); x[ins - 1] < x_max < x[ins].
      ins = int(np.searchsorted(x, x_max, side="right"))
      if not 0 < ins < x.size:
        raise ValueError(
            f"x_max={x_max} lies outside the curve's x range "
            f"[{x.min() if x.size else None}, {x.max() if x.size else None}].")
      x0, x1, y0, y1 = x[ins - 1], x[ins], y[ins - 1], y[ins]
      y_interp = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
      correction = 0.5 * (y_interp + y0) * (x_max - x0)
    keep = x <= x_max
    x, y = x[keep], y[keep]
  return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) + correction)


def au_pro(
    masks: Sequence[Any], maps: Sequence[Any], fpr_limit: float = 0.3
) -> float:
  """Normalised area under the PRO curve up to FPR `fpr_limit`.

  Equals MVTec AD's official `au_pro`: trapezoid area of `pro_curve` up to
  fpr_limit divided by fpr_limit, so a perfect map scores 1.0.
  """
  if not 0.0 < fpr_limit <= 1.0:
    raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}.")
  fprs, pros = pro_curve(masks, maps)
  return trapezoid_area(fprs, pros, x_max=fpr_limit) / fpr_limit


# ---------------------------------------------------------------------------
# Aggregation.
# ---------------------------------------------------------------------------


def compute_metrics(
    image_labels: Any,
    image_scores: Any,
    masks: Sequence[Any] | None = None,
    maps: Sequence[Any] | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
  """All image-level and (optionally) pixel-level metrics.

  Args:
    image_labels: (N,) bool/0-1, nonzero = anomalous image.
    image_scores: (N,) image anomaly scores.
    masks: optional sequence of 2-D ground-truth masks (shapes may differ).
    maps: anomaly maps matching `masks`; required if masks is given.
    fpr_limit: FPR integration limit for AU-PRO.

  Returns:
    image_auroc (if both classes are present), image_ap and image_f1_max
    (if any image is anomalous) and, if masks are given and contain both
    defect and defect-free pixels, pixel_auroc, pixel_ap, pixel_f1_max,
    au_pro. Metrics that are undefined for the data (a test set of good
    images only, say) are left out rather than failing the whole eval,
    which runs after training.
  """
  y = np.asarray(image_labels).reshape(-1) != 0
  out = {}
  if y.any() and not y.all():
    out["image_auroc"] = auroc(image_labels, image_scores)
  if y.any():
    out["image_ap"] = average_precision(image_labels, image_scores)
    out["image_f1_max"] = f1_max(image_labels, image_scores)[0]
  if masks is None:
    return out
  if maps is None:
    raise ValueError("maps must be given together with masks.")
  _check_masks_maps(masks, maps)
  pixel_labels = np.concatenate([np.asarray(m).reshape(-1) != 0 for m in masks])
  n_defect = int(np.count_nonzero(pixel_labels))
  if n_defect == 0 or n_defect == pixel_labels.size:
    return out
  pixel_scores = np.concatenate([np.asarray(a).reshape(-1) for a in maps])
  out["pixel_auroc"] = auroc(pixel_labels, pixel_scores)
  out["pixel_ap"] = average_precision(pixel_labels, pixel_scores)
  out["pixel_f1_max"] = f1_max(pixel_labels, pixel_scores)[0]
  out["au_pro"] = au_pro(masks, maps, fpr_limit=fpr_limit)
  return out
