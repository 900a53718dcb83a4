"""Panels of the sampled test images (input, every depth, map, mask) and
ROC / PRO plots under <workdir>/pictures."""

from __future__ import annotations

import os

import numpy as np

from rcae_jax.data import geometry
from rcae_jax.evaluation import metrics as metrics_lib
from rcae_jax.evaluation import visualize
from rcae_jax.model import inference


def picture_indices(examples, per_type: int) -> list[int]:
  """The first `per_type` test images of each defect type (and of good)."""
  seen, out = {}, []
  for i, e in enumerate(examples):
    if seen.get(e.defect_type, 0) < per_type:
      seen[e.defect_type] = seen.get(e.defect_type, 0) + 1
      out.append(i)
  return out


def save_pictures(workdir, loader, examples, kept, maps, small_masks, labels,
                  scores, masks, pixel_maps, thresholds, config) -> dict:
  """Panels for the sampled test images and ROC / PRO curves as PNG under
  <workdir>/pictures; returns a few as TensorBoard images."""
  out = os.path.join(workdir, 'pictures')
  extents = loader.extents('test')
  # Panels show each image's valid region only (all of it when squashed).
  vmin, vmax = visualize.value_range(
      [geometry.crop(m, e) for m, e in zip(maps, extents)])
  tb = {}
  # Small model inputs are enlarged (nearest) so the panels stay legible.
  k = max(1, -(-128 // loader.hw[0]))
  up = lambda a: np.repeat(np.repeat(np.asarray(a), k, -2 if a.ndim == 2
                                     else -3), k, -1 if a.ndim == 2 else -2)
  for i, (recs, dets, (y, x, h, w)) in sorted(kept.items()):
    # The box of the map that recs and details show: the valid region, or
    # (tiled) the tile where the map peaks.
    ex = examples[i]
    box = lambda a, y=y, x=x, h=h, w=w: up(np.asarray(a)[y:y + h, x:x + w])
    tile = lambda a, h=h, w=w: up(geometry.crop(a, (h, w)))
    strip = visualize.panel(
        box(loader.eval_image(i)), [tile(np.clip(r, 0, 1)) for r in recs],
        [tile(np.clip(d, 0, 1)) for d in dets] if inference.uses_dpn(config)
        else None, box(maps[i]), vmin, vmax,
        gt_mask=box(small_masks[i].astype(bool)),
        threshold=thresholds['pixel'])
    stem = os.path.splitext(os.path.basename(ex.path))[0]
    visualize.save_png(os.path.join(out, ex.defect_type, f'{stem}.png'), strip)
    if len(tb) < 8:
      tb[f'panel/{ex.defect_type}_{stem}'] = strip[None]
  if len(set(labels.tolist())) == 2:
    fpr, tpr = metrics_lib.roc_curve(labels, scores)
    tb['curves/image_roc'] = visualize.curve_plot(
        fpr, tpr, 'image ROC', 'FPR', 'TPR')[None]
  if masks is not None:
    fprs, pros = metrics_lib.pro_curve(masks, pixel_maps)
    tb['curves/pro'] = visualize.curve_plot(
        fprs, pros, 'PRO curve', 'FPR', 'PRO',
        x_max=config.eval.pro_fpr_limit)[None]
  for name, img in tb.items():
    if name.startswith('curves/'):
      visualize.save_png(os.path.join(out, name.split('/')[1] + '.png'),
                         img[0])
  return tb
