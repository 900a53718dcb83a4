"""Decision thresholds from held-out good images (no test label is looked
at), the fused map's normalisers (eval.scoring='fused', fusion.py), and the
evaluation of a good-only category, which is thresholds alone.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from rcae_jax.common import fileio
from rcae_jax.data import geometry
from rcae_jax.evaluation import fusion
from rcae_jax.evaluation import loops
from rcae_jax.evaluation import maps as maps_lib
from rcae_jax.evaluation import report as report_lib


def choose_thresholds(params, loader, config, predict_fn) -> dict:
  """Image and pixel thresholds from held-out good training images: no
  test label is looked at. Without held-out images, the training images
  stand in (optimistic: the model has seen them)."""
  held_out = loader.val_held_out
  if not held_out:
    logging.warning('No held-out images (data.val_fraction=0): thresholds '
                    'come from training images and will be too low.')
  maps, scores, _, _, _ = loops.run_predictions(params, loader, config, 'val',
                                          predict_fn)
  # Valid pixels only (the whole map when squashed).
  maps = np.concatenate([geometry.crop(m, e).ravel()
                         for m, e in zip(maps, loader.extents('val'))])
  pixel = float(np.quantile(maps, config.eval.pixel_quantile))
  median = float(np.median(maps))
  return {'image': float(np.quantile(scores, config.eval.image_quantile)),
          'pixel': pixel,
          # Colour scale for overlays of new images: the pixel threshold sits
          # mid-scale, typical normal pixels at the bottom.
          'display_min': median,
          'display_max': pixel + max(pixel - median, 1e-6),
          'num_images': int(len(scores)),
          'source': ('held-out good training images' if held_out
                     else 'training images (no held-out split)')}


def thresholds_only(params, loader, config, workdir: str, predict_fn,
                    extra=None) -> dict:
  """Evaluation of a good-only category (no test/ folder): thresholds.json
  from the held-out good images, so that `predict` works, and a metrics.json
  without metrics (it marks the category finished for multi-category runs
  and says why it is empty)."""
  thresholds = choose_thresholds(params, loader, config, predict_fn)
  category = loader.files.category
  logging.warning(
      '%s: no test/ folder (good-only category): thresholds.json set from %d '
      '%s; test metrics, maps, pictures and learning curves skipped. Add '
      'test/good, test/<defect> and ground_truth/<defect> to measure '
      'accuracy.', os.path.join(loader.files.root, category),
      thresholds['num_images'], thresholds['source'])
  report = {category: dict(scoring=config.eval.scoring, num_test_images=0,
                           test_metrics='skipped: no test/ folder',
                           **(extra or {}))}
  if jax.process_index() == 0:
    fileio.write_json_atomic(os.path.join(workdir, 'thresholds.json'),
                             thresholds)
    fileio.write_json_atomic(os.path.join(workdir, 'metrics.json'), report)
    fileio.write_text_atomic(os.path.join(workdir, 'results.md'),
                             report_lib.results_table(report))
  return report


def fusion_normalisers(params, loader, config, workdir: str):
  """eval.scoring='fused': the medians of CRD's map and of the recursion
  map over the held-out good images' valid pixels (fusion.py), written to
  <workdir>/fusion_normalisers.json; None for any other scoring."""
  if config.eval.scoring != 'fused':
    return None
  pixels = {}
  for part in ('crd', 'recursion'):
    cfg = config.copy_and_resolve_references()
    cfg.eval.scoring = part
    maps = loops.run_predictions(params, loader, cfg, 'val',
                                 maps_lib.make_predict_fn(cfg))[0]
    pixels[part] = np.concatenate([geometry.crop(m, e).ravel() for m, e in
                                   zip(maps, loader.extents('val'))])
  normalisers = fusion.normalisers_from(pixels['crd'], pixels['recursion'])
  stored = dict(normalisers, quantile=fusion.QUANTILE,
                num_images=len(loader.extents('val')),
                source=('held-out good training images' if
                        loader.val_held_out else
                        'training images (no held-out split)'))
  if jax.process_index() == 0:
    fileio.write_json_atomic(fusion.path(workdir), stored)
  logging.info('Fused map normalisers (medians over %d %s): %s', stored[
      'num_images'], stored['source'], normalisers)
  return normalisers
