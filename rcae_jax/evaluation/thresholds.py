"""Decision thresholds, the fused map's normalisers (eval.scoring='fused',
fusion.py), and the evaluation of a good-only category, which
is thresholds alone.

How they are set (`eval.threshold`; thresholds.json's 'method' says which):
- 'quantile' (default): the `eval.image_quantile` of held-out good training
  images' scores and the `eval.pixel_quantile` of their map values. No
  label is looked at; the share of good images flagged is about
  1 - image_quantile.
- 'f1': the F1-optimal image (and, with masks, pixel) threshold on a
  labelled validation split: `eval.f1_val_fraction` of the test images of
  each label, held out by run.prepare so that the reported metrics never
  include an image a threshold was tuned on.
- 'fixed': `eval.fixed_image_threshold` (and `eval.fixed_pixel_threshold`
  when > 0, else the quantile's pixel threshold), e.g. a value read off a
  previous run's scores.
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
from rcae_jax.evaluation import metrics as metrics_lib
from rcae_jax.evaluation import report as report_lib


# Loader split of the labelled test images that run.prepare holds out for
# 'f1' (Loader.examples[LABELLED_VAL]).
LABELLED_VAL = 'labelled_val'


def choose_thresholds(params, loader, config, predict_fn) -> dict:
  """Image and pixel thresholds by `config.eval.threshold` (module
  docstring). The held-out good images always set the overlay colour scale
  and the label-free quantiles; without held-out images the training
  images stand in (optimistic: the model has seen them)."""
  thresholds = quantile_thresholds(params, loader, config, predict_fn)
  method = config.eval.threshold
  if method == 'f1':
    thresholds.update(f1_thresholds(params, loader, config, predict_fn))
  elif method == 'fixed':
    thresholds.update(fixed_thresholds(config.eval))
  thresholds['method'] = method
  thresholds.setdefault('pixel_method', method)
  # The overlays' colour scale keeps the pixel threshold mid-scale.
  thresholds['display_max'] = thresholds['pixel'] + max(
      thresholds['pixel'] - thresholds['display_min'], 1e-6)
  logging.info('Thresholds (%s): image %.6g, pixel %.6g (%s)', method,
               thresholds['image'], thresholds['pixel'],
               thresholds['source'])
  return thresholds


def fixed_thresholds(eval_cfg) -> dict:
  """The user's values; the pixel one stays the quantile's unless given."""
  out = {'image': float(eval_cfg.fixed_image_threshold),
         'source': 'fixed by eval.fixed_image_threshold'}
  if eval_cfg.fixed_pixel_threshold > 0:
    out['pixel'] = float(eval_cfg.fixed_pixel_threshold)
  else:
    out['pixel_method'] = 'quantile'
  return out


def f1_thresholds(params, loader, config, predict_fn) -> dict:
  """F1-optimal thresholds on the labelled validation split (a threshold t
  flags scores >= t; metrics.f1_max). The pixel threshold is F1-optimal
  over the split's mask pixels at the model size when the category has
  masks, else it stays the quantile's."""
  if LABELLED_VAL not in loader.examples:
    raise ValueError("eval.threshold='f1' needs the labelled split that "
                     'run.prepare holds out')
  maps, scores, labels, masks, _ = loops.run_predictions(
      params, loader, config, LABELLED_VAL, predict_fn)
  f1, image = metrics_lib.f1_max(labels, scores)
  out = {'image': image, 'validation_images': int(len(labels)),
         'validation_image_f1': f1,
         'source': (f'F1-optimal on {len(labels)} labelled test images held '
                    'out of the reported metrics')}
  if loader.files.has_masks and labels.any():
    masks, maps = loops.valid_regions(masks, maps, loader.extents(
        LABELLED_VAL))
    f1, out['pixel'] = metrics_lib.f1_max(
        np.concatenate([m.ravel() for m in masks]),
        np.concatenate([m.ravel() for m in maps]))
    out['validation_pixel_f1'] = f1
  else:
    out['pixel_method'] = 'quantile'
  return out


def quantile_thresholds(params, loader, config, predict_fn) -> dict:
  """The label-free thresholds from held-out good training images."""
  held_out = loader.val_held_out
  if not held_out:
    logging.warning('No held-out images (data.val_fraction=0): thresholds '
                    'come from training images and will be too low.')
  maps, scores, _, _, _ = loops.run_predictions(params, loader, config,
                                                'val', predict_fn)
  # Valid pixels only (the whole map when squashed).
  maps = np.concatenate([geometry.crop(m, e).ravel()
                         for m, e in zip(maps, loader.extents('val'))])
  pixel = float(np.quantile(maps, config.eval.pixel_quantile))
  median = float(np.median(maps))
  return {'image': float(np.quantile(scores, config.eval.image_quantile)),
          'pixel': pixel,
          # Colour scale for overlays of new images: typical normal pixels
          # at the bottom (choose_thresholds puts the threshold mid-scale).
          'display_min': median,
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
