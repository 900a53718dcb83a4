"""The jitted function every evaluation runs: images to reconstructions,
detail-restored reconstructions, the anomaly map and the image score.

Pixel map, by `config.eval.scoring`:
- 'crd': M_A = sigmoid(CRD(...)), the paper's map, optionally blurred
  with a Gaussian of `eval.crd_sigma` px (ours; 0 = none).
- 'recursion': M(p) = 1/N sum_n 1/C sum_c |I_D^n(p, c) - I(p, c)| (I_R^n
  when DPN is off; `eval.recursion_reduce` may take the max over depths or
  the deepest depth instead of the mean), optionally blurred with a Gaussian of
  `eval.map_sigma` px. Normal regions are rebuilt at every depth; defects
  are not rebuilt at the deeper ones, so their error accumulates.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from PIL import Image

from rcae_jax.data import geometry
from rcae_jax.evaluation import scoring
from rcae_jax.model import inference


def predict(params, images, extents=None, *, nets: inference.Networks, config):
  """Full inference: reconstructions, detail-restored ones, map, score.
  `extents` (int [B, 2], data.resize='keep_aspect'): each image's valid
  region, the only place its score may come from; None: all of it."""
  x = inference.to_float(images)
  recs = inference.reconstructions(nets, params, x)
  dets = inference.details(nets, params, recs, x, inference.uses_dpn(config))
  if config.eval.scoring == 'crd':
    amap = scoring.gaussian_blur(
        jax.nn.sigmoid(inference.crd_logits(nets, params, dets, x))[..., 0],
        config.eval.get('crd_sigma', 0.0))
  elif config.eval.scoring == 'recursion':
    amap = scoring.gaussian_blur(
        scoring.recursion_error_map(dets, x,
                            config.eval.recursion_reduce),
        config.eval.map_sigma)
  else:
    raise ValueError(f"eval.scoring must be 'crd' or 'recursion', got "
                     f'{config.eval.scoring!r}')
  valid = (None if extents is None
           else geometry.valid_mask(extents, amap.shape[1:]))
  return {'recs': recs, 'details': dets, 'map': amap,
          'score': scoring.image_scores(amap, config.eval, valid)}


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
