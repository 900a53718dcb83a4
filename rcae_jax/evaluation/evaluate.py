"""Evaluation of a trained model on a category's test set: metrics.json,
results.md, thresholds.json, TIFF maps and pictures.

Pixel metrics are computed at the ground-truth resolution by default (maps
upsampled bilinearly to each mask's original size, as MVTec's official
evaluation does); `eval.pixel_resolution='model'` uses the model's size.
The pieces live beside it: maps.py (the jitted predict), scoring.py,
loops.py, thresholds.py, pictures.py, curve_hook.py.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import numpy as np

from rcae_jax.common import fileio
from rcae_jax.common import sharding
from rcae_jax.data import folder
from rcae_jax.data import geometry
from rcae_jax.evaluation import export_maps
from rcae_jax.evaluation import loops
from rcae_jax.evaluation import maps as maps_lib
from rcae_jax.evaluation import metrics as metrics_lib
from rcae_jax.evaluation import pictures
from rcae_jax.evaluation import report as report_lib
from rcae_jax.evaluation import scoring_checks
from rcae_jax.evaluation import thresholds as thresholds_lib


def evaluate(params, loader, config, workdir: str, writer=None,
             step: int = 0, extra=None) -> dict:
  """Scores the test set; writes metrics.json, results.md, thresholds.json,
  TIFF maps and pictures under `workdir`; returns the metrics report."""
  scoring_checks.check_scoring(config)
  t0 = time.time()
  # On the device once: every batch's jitted call reuses them.
  params = jax.device_put(params)
  # 'fused' scoring needs its normalisers (held-out good images) first.
  normalisers = thresholds_lib.fusion_normalisers(params, loader, config,
                                                  workdir)
  # Every batch split over the devices of the mesh.
  predict_fn = maps_lib.make_predict_fn(
      config, normalisers=normalisers,
      mesh=sharding.make_mesh(config.mesh.num_devices))
  params = maps_lib.place_params(predict_fn, params)
  if folder.good_only(loader.files):
    return thresholds_lib.thresholds_only(params, loader, config, workdir,
                                          predict_fn, extra)
  examples = loader.files.test
  show = pictures.picture_indices(examples, config.eval.pictures_per_type)
  maps, scores, labels, small_masks, kept = loops.run_predictions(
      params, loader, config, 'test', predict_fn, keep=show)
  thresholds = thresholds_lib.choose_thresholds(params, loader, config,
                                                predict_fn)
  primary = jax.process_index() == 0  # Every process computes; one writes.
  if primary:
    fileio.write_json_atomic(os.path.join(workdir, 'thresholds.json'),
                             thresholds)
  resolution = config.eval.pixel_resolution
  masks = gt_maps = None
  # Each map's valid region (all of it when squashed) goes back to its
  # image's own size: the padding never reaches a metric or a file.
  extents = loader.extents('test')
  if loader.files.has_masks or config.eval.export_maps:
    full = loader.full_masks()
    gt_maps = [maps_lib.upsample(geometry.crop(m, e), gt.shape)
               for m, e, gt in zip(maps, extents, full)]
  if loader.files.has_masks:
    if resolution == 'ground_truth':
      masks, pixel_maps = full, gt_maps
    else:
      masks, pixel_maps = loops.valid_regions(small_masks, maps, extents)
  result = metrics_lib.compute_metrics(
      labels, scores, masks=masks, maps=pixel_maps if masks else None,
      fpr_limit=config.eval.pro_fpr_limit)
  result['image_f1_at_threshold'] = metrics_lib.f1_at(
      labels, scores, thresholds['image'])
  if masks is not None:
    result['pixel_f1_at_threshold'] = metrics_lib.f1_at(
        np.concatenate([m.ravel() for m in masks]),
        np.concatenate([m.ravel() for m in pixel_maps]), thresholds['pixel'])
  result = {k: float(v) for k, v in result.items()}
  if 'image_auroc' not in result:
    logging.warning('The test set holds %s images only: image AUROC (and '
                    'without defective images AP and F1) is undefined and '
                    'left out of metrics.json.',
                    'defective' if labels.all() else 'good')
  logging.info('Evaluation of %d test images in %.1f s: %s', len(labels),
               time.time() - t0,
               ', '.join(f'{k}={v:.4f}' for k, v in sorted(result.items())))
  category = loader.files.category
  if primary:
    if config.eval.export_maps:
      n = export_maps.export(workdir, category, examples, gt_maps)
      logging.info('Wrote %d anomaly maps under %s/anomaly_maps', n, workdir)
    images = pictures.save_pictures(workdir, loader, examples, kept, maps, small_masks,
                           labels, scores, masks, pixel_maps if masks else None,
                           thresholds, config)
    if writer is not None:
      writer.write_scalars(step, {f'eval/{k}': v for k, v in result.items()})
      if images:
        writer.write_images(step, images)
      writer.flush()
  report = {category: dict(result, pixel_resolution=resolution,
                           scoring=config.eval.scoring,
                           num_test_images=int(len(labels)),
                           **(extra or {}))}
  if primary:
    fileio.write_json_atomic(os.path.join(workdir, 'metrics.json'), report)
    fileio.write_text_atomic(os.path.join(workdir, 'results.md'),
                             report_lib.results_table(report))
  return report
