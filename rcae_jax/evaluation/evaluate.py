"""Evaluation: a jitted predict function, the eval loop, metrics.json.

Pixel map, by `config.eval.scoring`:
- 'crd': M_A = sigmoid(CRD(...)), the paper's map.
- 'recursion': M(p) = 1/N sum_n 1/C sum_c |I_D^n(p, c) - I(p, c)| (I_R^n
  when DPN is off; `eval.recursion_reduce` may take the max over depths or
  the deepest depth instead of the mean), optionally blurred with a Gaussian of
  `eval.map_sigma` px. Normal regions are rebuilt at every depth; defects
  are not rebuilt at the deeper ones, so their error accumulates.
Image score (ours, METHOD.md): the maximum of the map after `box` or
`gaussian` smoothing of `eval.smoothing_size` px, or its mean.

Pixel metrics are computed at the ground-truth resolution by default (maps
upsampled bilinearly to each mask's original size, as MVTec's official
evaluation does); `eval.pixel_resolution='model'` uses the model's size.

Tiled runs (`data.tile_size`, tiling.py) map each image at its working
resolution, blended from overlapping tiles, and everything above then uses
that stitched map: the image score is taken from it (`map_score`), and
'model' resolution means the working resolution.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from rcae_jax.common import fileio
from rcae_jax.data import folder
from rcae_jax.data import geometry
from rcae_jax.data import tiling as tiling_lib
from rcae_jax.evaluation import export_maps
from rcae_jax.evaluation import metrics as metrics_lib
from rcae_jax.evaluation import scoring
from rcae_jax.evaluation import visualize
from rcae_jax.model import inference


def gaussian_kernel(sigma: float) -> np.ndarray:
  radius = max(1, int(round(3 * sigma)))
  x = np.arange(-radius, radius + 1, dtype=np.float32)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  return k / k.sum()


def gaussian_blur(maps: jax.Array, sigma: float) -> jax.Array:
  """Separable Gaussian blur of [B, H, W] maps (edge-padded)."""
  if sigma <= 0:
    return maps
  k = jnp.asarray(gaussian_kernel(sigma))
  r = (k.shape[0] - 1) // 2
  x = jnp.pad(maps, ((0, 0), (r, r), (r, r)), mode='edge')[..., None]
  x = jax.lax.conv_general_dilated(x, k.reshape(-1, 1, 1, 1), (1, 1), 'VALID',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  x = jax.lax.conv_general_dilated(x, k.reshape(1, -1, 1, 1), (1, 1), 'VALID',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return x[..., 0]


def box_blur(maps: jax.Array, size: int) -> jax.Array:
  if size <= 1:
    return maps
  summed = jax.lax.reduce_window(maps, 0.0, jax.lax.add, (1, size, size),
                                 (1, 1, 1), 'SAME')
  return summed / (size * size)


def image_scores(maps: jax.Array, eval_cfg, valid=None) -> jax.Array:
  """[B, H, W] maps to [B] scores. `valid` (bool [B, H, W], or None for
  all): the region the score may come from. Outside it (the padding of
  data.resize='keep_aspect') the map counts as zero in the smoothing, as
  outside the image for a squashed one, and never as the maximum."""
  if valid is not None:
    maps = jnp.where(valid, maps, 0.0)
  if eval_cfg.image_score == 'mean':
    if valid is None:
      return maps.mean(axis=(1, 2))
    return maps.sum(axis=(1, 2)) / jnp.maximum(valid.sum(axis=(1, 2)), 1)
  if eval_cfg.smoothing == 'gaussian':
    smooth = gaussian_blur(maps, eval_cfg.smoothing_size / 3)
  else:
    smooth = box_blur(maps, eval_cfg.smoothing_size)
  if valid is not None:
    smooth = jnp.where(valid, smooth, -jnp.inf)
  return smooth.max(axis=(1, 2))


def _box_blur_np(amap: np.ndarray, size: int) -> np.ndarray:
  """`box_blur` of one [h, w] map in numpy (zero outside, 'SAME')."""
  if size <= 1:
    return amap
  lo = (size - 1) // 2
  padded = np.pad(amap.astype(np.float64), ((lo, size - 1 - lo),) * 2)
  summed = np.pad(padded.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
  h, w = amap.shape
  window = (summed[size:size + h, size:size + w] - summed[:h, size:size + w]
            - summed[size:size + h, :w] + summed[:h, :w])
  return window / (size * size)


def _gaussian_blur_np(amap: np.ndarray, sigma: float) -> np.ndarray:
  """`gaussian_blur` of one [h, w] map in numpy (edge-padded)."""
  if sigma <= 0:
    return amap
  k = gaussian_kernel(sigma).astype(np.float64)
  r = (len(k) - 1) // 2
  x = np.pad(amap.astype(np.float64), r, mode='edge')
  h, w = amap.shape
  x = sum(k[i] * x[i:i + h] for i in range(len(k)))
  return sum(k[i] * x[:, i:i + w] for i in range(len(k)))


def map_score(amap: np.ndarray, eval_cfg) -> float:
  """`image_scores` of one map [h, w] of any size, every pixel valid, in
  numpy: the stitched maps of tiled runs differ in size from image to
  image, and a jitted score would compile for each."""
  amap = np.asarray(amap, np.float32)
  if eval_cfg.image_score == 'mean':
    return float(amap.mean(dtype=np.float64))
  if eval_cfg.smoothing == 'gaussian':
    smooth = _gaussian_blur_np(amap, eval_cfg.smoothing_size / 3)
  else:
    smooth = _box_blur_np(amap, eval_cfg.smoothing_size)
  return float(smooth.max())


def depth_errors(ys: jax.Array, x: jax.Array) -> jax.Array:
  """Channel-mean |y^n - I| per depth: [N,B,H,W,C] -> [N,B,H,W]."""
  return jnp.abs(ys - x[None]).mean(axis=-1)


def recursion_error_map(dets: jax.Array, x: jax.Array,
                        reduce: str = 'mean') -> jax.Array:
  """Channel-mean |I_D^n - I| combined over depths: [N,B,H,W,C] -> [B,H,W].

  `reduce`: 'mean' over depths (every depth votes), 'max' over depths
  (a defect counts where any depth fails to rebuild it), or 'last' (the
  deepest depth alone, which discards most detail and so erases defects
  best, but also rebuilds normal texture worst)."""
  errors = depth_errors(dets, x)
  if reduce == 'mean':
    return errors.mean(axis=0)
  if reduce == 'max':
    return errors.max(axis=0)
  if reduce == 'last':
    return errors[-1]
  raise ValueError(f"eval.recursion_reduce must be 'mean', 'max' or 'last', "
                   f'got {reduce!r}')


def predict(params, images, extents=None, *, nets: inference.Networks, config):
  """Full inference: reconstructions, detail-restored ones, map, score.
  `extents` (int [B, 2], data.resize='keep_aspect'): each image's valid
  region, the only place its score may come from; None: all of it."""
  x = inference.to_float(images)
  recs = inference.reconstructions(nets, params, x)
  dets = inference.details(nets, params, recs, x, inference.uses_dpn(config))
  if config.eval.scoring == 'crd':
    amap = jax.nn.sigmoid(inference.crd_logits(nets, params, dets, x))[..., 0]
  elif config.eval.scoring == 'recursion':
    amap = gaussian_blur(
        recursion_error_map(dets, x,
                            config.eval.recursion_reduce),
        config.eval.map_sigma)
  else:
    raise ValueError(f"eval.scoring must be 'crd' or 'recursion', got "
                     f'{config.eval.scoring!r}')
  valid = (None if extents is None
           else geometry.valid_mask(extents, amap.shape[1:]))
  return {'recs': recs, 'details': dets, 'map': amap,
          'score': image_scores(amap, config.eval, valid)}


def make_predict_fn(config, nets=None):
  nets = nets or inference.build_networks(config.model)
  return jax.jit(functools.partial(predict, nets=nets, config=config))


def upsample(amap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of a float map to (H, W)."""
  if amap.shape == tuple(shape):
    return amap.astype(np.float32)
  img = Image.fromarray(amap.astype(np.float32), mode='F')
  return np.asarray(img.resize((shape[1], shape[0]),
                               Image.Resampling.BILINEAR))


def collect(loader, batch_size: int, fn, split: str = 'test') -> dict:
  """Runs `fn(batch, valid) -> {name: array [B, ...]}` over a split and
  returns {name: array [n, ...]} without the padding rows, plus each
  example's 'label' and 'mask'. The last batch is padded to a fixed shape
  so that jit compiles once; `valid` marks its real rows. Only what `fn`
  returns is kept for the whole split, so per-batch work that must not
  hold host memory (keeping a few pictures) belongs inside `fn`."""
  rows = {}
  for batch in loader.test_batches(batch_size, split=split):
    valid = np.asarray(batch['valid'], bool)
    out = dict(fn(batch, valid), label=batch['label'], mask=batch['mask'])
    for name, value in out.items():
      rows.setdefault(name, []).append(np.asarray(value)[valid])
  return {name: np.concatenate(parts) for name, parts in rows.items()}


def run_predictions(params, loader, config, split: str = 'test',
                    predict_fn=None, keep=()):
  """Maps [n, S, S], scores [n], labels [n], model-size masks [n, S, S],
  and {index: (recs, details, box)} for the example indices in `keep` (for
  pictures; everything else is dropped at once to bound host memory; `box`
  (y, x, h, w): the region of the map that recs and details show, here the
  valid region). Tiled loaders: `run_tiled_predictions`."""
  predict_fn = predict_fn or make_predict_fn(config)
  if loader.tiling is not None:
    return run_tiled_predictions(params, loader, config, split, predict_fn,
                                 keep)
  keep, kept, offset = set(keep), {}, 0
  # Squashed images fill the model size: the program without extents.
  padded = config.data.resize != 'squash'

  def step(batch, valid):
    nonlocal offset
    out = (predict_fn(params, batch['image'], batch['extent']) if padded
           else predict_fn(params, batch['image']))
    for j in np.flatnonzero(valid):
      if offset + j in keep:
        kept[offset + j] = (np.asarray(out['recs'][:, j]),
                            np.asarray(out['details'][:, j]),
                            (0, 0) + tuple(int(v) for v in batch['extent'][j]))
    offset += int(valid.sum())
    return {'map': out['map'], 'score': out['score']}

  rows = collect(loader, config.eval.batch_size, step, split)
  return rows['map'], rows['score'], rows['label'], rows['mask'], kept


def run_tiled_predictions(params, loader, config, split: str, predict_fn,
                          keep=()):
  """`run_predictions` of a tiled loader: maps and masks are lists of
  each image's stitched map and mask at its working resolution; scores
  come from the stitched maps; `kept[i]` holds the tile of image i whose
  map peaks highest, with its box in the stitched map.

  Tiles run through the program without extents, the one untiled squashed
  images run through: an image of one tile's size maps bit for bit as it
  does untiled."""
  keep, best, labels, masks = set(keep), {}, [], []
  tiles = 0

  def images():
    for image, mask, label in loader.tiled_examples(split):
      labels.append(label)
      masks.append(mask)
      yield image

  def predict_tiles(batch, pieces):
    nonlocal tiles
    tiles += len(pieces)
    out = predict_fn(params, batch)
    maps = np.asarray(out['map'])
    for j, p in enumerate(pieces):
      if p.image in keep:
        peak = float(maps[j, :p.extent[0], :p.extent[1]].max())
        if p.image not in best or peak > best[p.image][0]:
          best[p.image] = (peak, np.asarray(out['recs'][:, j]),
                           np.asarray(out['details'][:, j]),
                           p.origin + p.extent)
    return maps

  maps = [m for _, m in tiling_lib.stitch_stream(
      images(), predict_tiles, loader.tiling, config.eval.batch_size)]
  scores = np.asarray([map_score(m, config.eval) for m in maps], np.float32)
  t = loader.tiling
  logging.info('Tiled %s: %d images as %d tiles of %d source px (%d model '
               'px, overlap %.2f)', split, len(maps), tiles, t.tile, t.side,
               t.overlap)
  kept = {i: v[1:] for i, v in best.items()}
  return maps, scores, np.asarray(labels, np.int32), masks, kept


def choose_thresholds(params, loader, config, predict_fn) -> dict:
  """Image and pixel thresholds from held-out good training images: no
  test label is looked at. Without held-out images, the training images
  stand in (optimistic: the model has seen them)."""
  held_out = loader.val_held_out
  if not held_out:
    logging.warning('No held-out images (data.val_fraction=0): thresholds '
                    'come from training images and will be too low.')
  maps, scores, _, _, _ = run_predictions(params, loader, config, 'val',
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


def valid_regions(masks, maps, extents) -> tuple[list, list]:
  """Model-size masks and maps as lists of their valid regions (masks as
  bool)."""
  return ([geometry.crop(m, e).astype(bool) for m, e in zip(masks, extents)],
          [geometry.crop(m, e) for m, e in zip(maps, extents)])


def picture_indices(examples, per_type: int) -> list[int]:
  """The first `per_type` test images of each defect type (and of good)."""
  seen, out = {}, []
  for i, e in enumerate(examples):
    if seen.get(e.defect_type, 0) < per_type:
      seen[e.defect_type] = seen.get(e.defect_type, 0) + 1
      out.append(i)
  return out


def evaluate(params, loader, config, workdir: str, writer=None,
             step: int = 0, extra=None) -> dict:
  """Scores the test set; writes metrics.json, results.md, thresholds.json,
  TIFF maps and pictures under `workdir`; returns the metrics report."""
  scoring.check_scoring(config)
  t0 = time.time()
  predict_fn = make_predict_fn(config)
  if folder.good_only(loader.files):
    return thresholds_only(params, loader, config, workdir, predict_fn, extra)
  examples = loader.files.test
  show = picture_indices(examples, config.eval.pictures_per_type)
  maps, scores, labels, small_masks, kept = run_predictions(
      params, loader, config, 'test', predict_fn, keep=show)
  thresholds = choose_thresholds(params, loader, config, predict_fn)
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
    gt_maps = [upsample(geometry.crop(m, e), gt.shape)
               for m, e, gt in zip(maps, extents, full)]
  if loader.files.has_masks:
    if resolution == 'ground_truth':
      masks, pixel_maps = full, gt_maps
    else:
      masks, pixel_maps = valid_regions(small_masks, maps, extents)
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
    images = save_pictures(workdir, loader, examples, kept, maps, small_masks,
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
                             results_table(report))
  return report


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
                             results_table(report))
  return report


CURVE_KEYS = ('image_auroc', 'pixel_auroc', 'au_pro')


def curve_config(config, stage: int):
  """What a model trained up to `stage` can be scored with: the recursion
  map without DPN after stage 1, with DPN after stage 2, CRD after 3."""
  cfg = config.copy_and_resolve_references()
  if stage < 3:
    cfg.eval.scoring = 'recursion'
    cfg.train.stage3.steps = 0
  if stage < 2:
    cfg.train.stage2.steps = 0
  return cfg


def make_curve_hook(config, loader, minutes_before: float = 0.0):
  """The `on_eval` hook of train.train_and_checkpoint: test metrics of the
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
      predict_fns[stage] = make_predict_fn(cfg)
    maps, scores, labels, masks, _ = run_predictions(
        params, loader, cfg, 'test', predict_fns[stage])
    has_masks = loader.files.has_masks
    masks, maps = valid_regions(masks, maps, loader.extents('test'))
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


def results_table(report: dict) -> str:
  """Markdown table: one row per category (and `mean` when present)."""
  keys = ['image_auroc', 'pixel_auroc', 'au_pro', 'pixel_ap', 'image_f1_max',
          'pixel_f1_max']
  lines = ['| category | ' + ' | '.join(keys) + ' |',
           '|---|' + '---|' * len(keys)]
  for category, m in report.items():
    cells = [f'{m[k]:.4f}' if isinstance(m.get(k), float) else '-'
             for k in keys]
    lines.append(f'| {category} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'
