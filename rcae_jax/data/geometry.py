"""Model input geometry: `data.image_size` as (H, W), and `data.resize`.

`data.image_size` is a side S (square model input, as before) or a pair
(H, W). Every image of a run is laid out on that one shape, because the
jitted programs are compiled for one shape. `data.resize` says how:

- 'squash' (default): resized to exactly (H, W), whatever its aspect ratio
  (what the code always did; KolektorSDD's 203 x 512 parts lose 4x along
  their length in a square).
- 'keep_aspect': scaled, aspect ratio kept, to the largest size that fits
  inside (H, W), placed at the top left and edge-padded to (H, W). The
  valid region, its `extent` (h, w), is what the maps are cropped to
  before they go back to the image's own size, so the padding never
  reaches a metric, a threshold or an exported map, and image scores
  ignore it (scoring.image_scores).

Edge padding, not a constant: a constant border makes a step edge at the
image boundary that the autoencoders rebuild badly, and convolutions and
score smoothing would carry that error into the valid pixels next to it.
Replicated edge pixels continue the image with no step; the model sees the
same padding on every training image, and it is cropped away afterwards.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp
import numpy as np

from rcae_jax.common import errors
from rcae_jax.data import decode

RESIZE_MODES = ('squash', 'keep_aspect')


def as_hw(image_size) -> tuple[int, int]:
  """`data.image_size` (S or (H, W)) as (H, W)."""
  if isinstance(image_size, numbers.Integral) and not isinstance(
      image_size, bool):
    return int(image_size), int(image_size)
  if (isinstance(image_size, (tuple, list)) and len(image_size) == 2 and
      all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
          for v in image_size)):
    return int(image_size[0]), int(image_size[1])
  raise errors.ConfigError(
      'config.data.image_size must be a side S or a pair (H, W) of ints, '
      f'e.g. 256 or "(128,320)", got {image_size!r}')


def model_hw(data_cfg) -> tuple[int, int]:
  """The model input (H, W) of a `config.data`."""
  return as_hw(data_cfg.image_size)


def fitted_hw(image_hw, hw) -> tuple[int, int]:
  """(h, w) of an image of `image_hw` scaled to fit inside `hw` with its
  aspect ratio kept: one side fills, the other is at most its bound."""
  (h0, w0), (height, width) = image_hw, hw
  scale = min(height / h0, width / w0)
  return (min(height, max(1, round(h0 * scale))),
          min(width, max(1, round(w0 * scale))))


def extent(image_hw, hw, resize: str) -> tuple[int, int]:
  """The valid region (h, w) of an image of `image_hw` at the model size:
  all of it when squashed."""
  return tuple(hw) if resize == 'squash' else fitted_hw(image_hw, hw)


def layout_image(image: np.ndarray, hw, resize: str) -> np.ndarray:
  """uint8 [h0, w0, 3] to the model input uint8 [H, W, 3]."""
  if resize == 'squash':
    return decode.resize_image(image, hw)
  h, w = fitted_hw(image.shape[:2], hw)
  small = decode.resize_image(image, (h, w))
  return np.pad(small, ((0, hw[0] - h), (0, hw[1] - w), (0, 0)), mode='edge')


def load_image(path: str, hw, resize: str) -> np.ndarray:
  """Decodes `path` to the model input uint8 [H, W, 3]."""
  if resize == 'squash':  # One resize of the decoded image, as always.
    return decode.load_image(path, hw)
  return layout_image(decode.load_image(path, None), hw, resize)


def layout_mask(mask: np.ndarray, hw, resize: str) -> np.ndarray:
  """bool [h0, w0] to bool [H, W], laid out like its image (nearest
  neighbour; the padding is not defect)."""
  if resize == 'squash':
    return decode.resize_mask(mask, hw)
  h, w = fitted_hw(mask.shape, hw)
  small = decode.resize_mask(mask, (h, w))
  return np.pad(small, ((0, hw[0] - h), (0, hw[1] - w)))


def crop(array: np.ndarray, ext) -> np.ndarray:
  """The valid region of a model-size [H, W, ...] array."""
  return array[:ext[0], :ext[1]]


def valid_mask(extents: jnp.ndarray, hw) -> jnp.ndarray:
  """bool [B, H, W]: True inside each row's extent (int [B, 2])."""
  rows = jnp.arange(hw[0])[None, :, None] < extents[:, 0, None, None]
  cols = jnp.arange(hw[1])[None, None, :] < extents[:, 1, None, None]
  return rows & cols
