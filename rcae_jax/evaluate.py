"""Evaluation: a jitted predict function, the eval loop, metrics.json.

Pixel map, by `config.eval.scoring`:
- 'crd': M_A = sigmoid(CRD(...)), the paper's map.
- 'recursion': M(p) = 1/N sum_n 1/C sum_c |I_D^n(p, c) - I(p, c)| (I_R^n
  when DPN is off), optionally blurred with a Gaussian of
  `eval.map_sigma` px. Normal regions are rebuilt at every depth; defects
  are not rebuilt at the deeper ones, so their error accumulates.
Image score (ours, METHOD.md): the maximum of the map after `box` or
`gaussian` smoothing of `eval.smoothing_size` px, or its mean.

Pixel metrics are computed at the ground-truth resolution by default (maps
upsampled bilinearly to each mask's original size, as MVTec's official
evaluation does); `eval.pixel_resolution='model'` uses the model's size.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from rcae_jax import metrics as metrics_lib
from rcae_jax import train


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


def image_scores(maps: jax.Array, eval_cfg) -> jax.Array:
  if eval_cfg.image_score == 'mean':
    return maps.mean(axis=(1, 2))
  if eval_cfg.smoothing == 'gaussian':
    smooth = gaussian_blur(maps, eval_cfg.smoothing_size / 3)
  else:
    smooth = box_blur(maps, eval_cfg.smoothing_size)
  return smooth.max(axis=(1, 2))


def recursion_error_map(dets: jax.Array, x: jax.Array) -> jax.Array:
  """Mean over depths and channels of |I_D^n - I|: [N,B,H,W,C] -> [B,H,W]."""
  return jnp.abs(dets - x[None]).mean(axis=(0, -1))


def predict(params, images, *, nets: train.Networks, config):
  """Full inference: reconstructions, detail-restored ones, map, score."""
  x = train.to_float(images)
  recs = train.reconstructions(nets, params, x)
  dets = train.details(nets, params, recs, x, train.uses_dpn(config))
  if config.eval.scoring == 'crd':
    amap = jax.nn.sigmoid(train.crd_logits(nets, params, dets, x))[..., 0]
  elif config.eval.scoring == 'recursion':
    amap = gaussian_blur(recursion_error_map(dets, x),
                         config.eval.get('map_sigma', 0.0))
  else:
    raise ValueError(f"eval.scoring must be 'crd' or 'recursion', got "
                     f'{config.eval.scoring!r}')
  return {'recs': recs, 'details': dets, 'map': amap,
          'score': image_scores(amap, config.eval)}


def make_predict_fn(config, nets=None):
  nets = nets or train.build_networks(config.model)
  return jax.jit(functools.partial(predict, nets=nets, config=config))


def check_scoring(config) -> None:
  if config.eval.scoring == 'crd' and not train.uses_crd(config):
    raise ValueError("eval.scoring='crd' needs stage 3 (CRD): set "
                     "train.stage3.steps > 0 or eval.scoring='recursion'")


def upsample(amap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of a float map to (H, W)."""
  if amap.shape == tuple(shape):
    return amap.astype(np.float32)
  img = Image.fromarray(amap.astype(np.float32), mode='F')
  return np.asarray(img.resize((shape[1], shape[0]),
                               Image.Resampling.BILINEAR))


def run_predictions(params, loader, config, predict_fn=None):
  """Maps [n, S, S], scores [n], labels [n], model-size masks [n, S, S]."""
  predict_fn = predict_fn or make_predict_fn(config)
  maps, scores, labels, masks = [], [], [], []
  for batch in loader.test_batches(config.eval.batch_size):
    out = predict_fn(params, batch['image'])
    keep = np.asarray(batch['valid'], bool)
    maps.append(np.asarray(out['map'])[keep])
    scores.append(np.asarray(out['score'])[keep])
    labels.append(np.asarray(batch['label'])[keep])
    masks.append(np.asarray(batch['mask'])[keep])
  return (np.concatenate(maps), np.concatenate(scores),
          np.concatenate(labels), np.concatenate(masks))


def evaluate(params, loader, config, workdir: str, writer=None,
             step: int = 0) -> dict:
  """Scores the test set, writes `<workdir>/metrics.json`, returns it."""
  check_scoring(config)
  t0 = time.time()
  maps, scores, labels, small_masks = run_predictions(params, loader, config)
  resolution = config.eval.get('pixel_resolution', 'ground_truth')
  masks = None
  if loader.files.has_masks:
    if resolution == 'ground_truth':
      masks = loader.full_masks()
      maps = [upsample(m, gt.shape) for m, gt in zip(maps, masks)]
    else:
      masks = list(small_masks.astype(bool))
      maps = list(maps)
  result = metrics_lib.compute_metrics(
      labels, scores, masks=masks, maps=maps if masks is not None else None)
  result = {k: float(v) for k, v in result.items()}
  logging.info('Evaluation of %d test images in %.1f s: %s', len(labels),
               time.time() - t0,
               ', '.join(f'{k}={v:.4f}' for k, v in sorted(result.items())))
  if writer is not None:
    writer.write_scalars(step, {f'eval/{k}': v for k, v in result.items()})
    writer.flush()
  category = loader.files.category
  report = {category: dict(result, pixel_resolution=resolution,
                           scoring=config.eval.scoring,
                           num_test_images=int(len(labels)))}
  write_json_atomic(os.path.join(workdir, 'metrics.json'), report)
  return report


def write_json_atomic(path: str, obj) -> None:
  """Temp file + rename: a crash never leaves a half-written file."""
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
