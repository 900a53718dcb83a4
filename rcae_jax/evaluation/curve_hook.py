"""Learning curves while training: test metrics of the parameters so far,
scored with what the stages trained so far can be scored with."""

from __future__ import annotations

import logging
import time

import jax

from rcae_jax.common import sharding
from rcae_jax.evaluation import loops
from rcae_jax.evaluation import maps as maps_lib
from rcae_jax.evaluation import metrics as metrics_lib


CURVE_KEYS = ('image_auroc', 'pixel_auroc', 'au_pro')


def curve_config(config, stage: int):
  """What a model trained up to `stage` can be scored with: the recursion
  map without DPN after stage 1, with DPN after stage 2, CRD after 3
  (also when evaluation fuses the two or chooses)."""
  cfg = config.copy_and_resolve_references()
  if stage < 3:
    cfg.eval.scoring = 'recursion'
    cfg.train.stage3.steps = 0
  elif cfg.eval.scoring in ('fused', 'auto'):
    # Their normalisers and choice are made by the evaluation after
    # training.
    cfg.eval.scoring = 'crd'
  if stage < 2:
    cfg.train.stage2.steps = 0
  return cfg


def make_curve_hook(config, loader, minutes_before: float = 0.0):
  """The `on_eval` hook of loop.train_and_checkpoint: test metrics of the
  parameters so far, as `curve/*` scalars against the global step, with
  the wall time since the hook was made plus `minutes_before`, the wall
  time of the run's last point before a resume (learning curves;
  docs/results.md).

  Model-resolution pixel metrics and no pictures or files, to stay cheap;
  the final evaluation reports the ground-truth-resolution numbers."""
  t0 = time.time() - 60 * minutes_before
  predict_fns = {}

  def hook(stage: int, global_step: int, params, writer) -> dict:
    cfg = curve_config(config, stage)
    if stage not in predict_fns:
      predict_fns[stage] = maps_lib.make_predict_fn(
          cfg, mesh=sharding.make_mesh(cfg.mesh.num_devices))
    maps, scores, labels, masks, _ = loops.run_predictions(
        params, loader, cfg, 'test', predict_fns[stage])
    has_masks = loader.files.has_masks
    masks, maps = loops.valid_regions(masks, maps, loader.extents('test'))
    result = metrics_lib.compute_metrics(
        labels, scores, masks=masks if has_masks else None,
        maps=maps if has_masks else None,
        fpr_limit=config.eval.pro_fpr_limit)
    point = {f'curve/{k}': float(result[k]) for k in CURVE_KEYS
             if k in result}
    point.update({'curve/wall_minutes': (time.time() - t0) / 60,
                  'curve/stage': stage})
    logging.info('Curve at stage %d, global step %d: %s', stage, global_step,
                 ', '.join(f'{k}={v:.4f}' for k, v in point.items()))
    if jax.process_index() == 0:
      writer.write_scalars(global_step, point)
    return point

  return hook
