"""How maps and scores are made from a model's outputs, as one jnp
implementation for every caller: the map smoothing, the image score (ours:
the maximum of the map after `box`, `box_valid` or `gaussian` smoothing of
`eval.smoothing_size` px, the mean of its top `eval.top_fraction`, or its
mean) and the recursion error map. The
config checks of the choice of map are in scoring_checks.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


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


def box_blur_valid(maps: jax.Array, size: int, valid=None) -> jax.Array:
  """The box average over the pixels under the box that lie inside the
  image (and `valid`), not over size x size: the zero padding of
  `box_blur` lowers the map along its border (ours, `smoothing='box_valid'`)."""
  if size <= 1:
    return maps
  inside = (jnp.ones_like(maps) if valid is None
            else valid.astype(maps.dtype))
  window = lambda m: jax.lax.reduce_window(m, 0.0, jax.lax.add,
                                           (1, size, size), (1, 1, 1), 'SAME')
  return window(maps * inside) / jnp.maximum(window(inside), 1.0)


def top_mean(maps: jax.Array, fraction: float, valid=None) -> jax.Array:
  """[B] means of the highest `fraction` of each map's pixels (at least
  one), outside `valid` never among them: a defect of that size scores
  its own mean, wherever it lies (ours, `image_score='top_mean'`)."""
  flat = maps.reshape(maps.shape[0], -1)
  if valid is not None:
    flat = jnp.where(valid.reshape(flat.shape), flat, -jnp.inf)
  k = max(1, int(round(fraction * flat.shape[1])))
  top = jax.lax.top_k(flat, k)[0]
  return jnp.where(jnp.isfinite(top), top, 0.0).mean(axis=1)


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
  if eval_cfg.image_score == 'top_mean':
    return top_mean(maps, eval_cfg.top_fraction, valid)
  if eval_cfg.smoothing == 'gaussian':
    smooth = gaussian_blur(maps, eval_cfg.smoothing_size / 3)
  elif eval_cfg.smoothing == 'box_valid':
    smooth = box_blur_valid(maps, eval_cfg.smoothing_size, valid)
  else:
    smooth = box_blur(maps, eval_cfg.smoothing_size)
  if valid is not None:
    smooth = jnp.where(valid, smooth, -jnp.inf)
  return smooth.max(axis=(1, 2))


def map_score(amap: np.ndarray, eval_cfg) -> float:
  """`image_scores` of one map [h, w] of any size, every pixel valid.

  The stitched maps of tiled runs differ in size from image to image. This
  runs the jitted path's ops one by one (eagerly): each op still compiles
  once per new map size (small programs, cached), so a stream of images of
  many different sizes pays that once per size."""
  maps = jnp.asarray(amap, jnp.float32)[None]
  return float(image_scores(maps, eval_cfg)[0])


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
