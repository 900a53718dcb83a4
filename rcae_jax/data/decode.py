"""Image and mask decoding with Pillow: the one decoder both loaders use.

tf.data and the in-memory loader call these same functions, so both paths
yield bit-identical pixels (TensorFlow's own JPEG decoder and resize kernels
differ slightly from Pillow's).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, UnidentifiedImageError

from rcae_jax.common import fileio
from rcae_jax.data.folder import DataError


def _open(path: str) -> Image.Image:
  try:
    img = Image.open(fileio.image_source(path))
    img.load()  # Forces the full decode, so truncated files fail here.
  except (OSError, UnidentifiedImageError, ValueError) as e:
    raise DataError(f'cannot decode image {path!r}: {e}') from e
  return img


def to_rgb8(img: Image.Image) -> Image.Image:
  """Any mode (grey, RGBA, palette, 16-bit, float) to 8-bit RGB."""
  if img.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
    arr = np.asarray(img, dtype=np.float64)
    hi = 65535.0 if img.mode.startswith('I;16') or arr.max() > 255 else 255.0
    arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, mode='L')
  return img.convert('RGB')


def _hw(size) -> tuple[int, int]:
  """A side S or a pair (H, W) as (H, W)."""
  return (size, size) if isinstance(size, int) else tuple(size)


def load_image(path: str, size) -> np.ndarray:
  """Decodes `path` to uint8 [H, W, 3] (bilinear, antialiased) for `size`
  S (H = W = S) or (H, W), or at its own resolution when size is None."""
  img = to_rgb8(_open(path))
  if size is not None:
    h, w = _hw(size)
    if img.size != (w, h):
      img = img.resize((w, h), Image.Resampling.BILINEAR)
  return np.asarray(img, dtype=np.uint8)


def resize_image(image: np.ndarray, size) -> np.ndarray:
  """uint8 [h0, w0, 3] to [H, W, 3] (`size` S or (H, W)), the same
  resampling as load_image."""
  h, w = _hw(size)
  if image.shape[:2] == (h, w):
    return image
  return np.asarray(Image.fromarray(image).resize(
      (w, h), Image.Resampling.BILINEAR), dtype=np.uint8)


def load_mask(path: str | None, shape: tuple[int, int]) -> np.ndarray:
  """Binary mask as bool [H, W] at its original resolution.

  `shape` is the (H, W) of the image the mask belongs to: a good image has
  no mask file and gets zeros of that shape. Masks store {0,1} or {0,255};
  anything above zero is defect.
  """
  if path is None:
    return np.zeros(shape, dtype=bool)
  img = _open(path)
  mask = np.asarray(img.convert('L')) > 0
  if mask.shape != tuple(shape):
    raise DataError(f'mask {path!r} is {mask.shape[1]}x{mask.shape[0]} but '
                    f'its image is {shape[1]}x{shape[0]} (W x H)')
  return mask


def image_shape(path: str) -> tuple[int, int]:
  """(H, W) without decoding the pixels."""
  try:
    with Image.open(fileio.image_source(path)) as img:
      return img.size[1], img.size[0]
  except (OSError, UnidentifiedImageError) as e:
    raise DataError(f'cannot read image {path!r}: {e}') from e


def resize_mask(mask: np.ndarray, size) -> np.ndarray:
  """Nearest-neighbour resize of a bool mask to [H, W] (`size` S or
  (H, W))."""
  h, w = _hw(size)
  if mask.shape == (h, w):
    return mask
  img = Image.fromarray(mask.astype(np.uint8) * 255)
  return np.asarray(img.resize((w, h), Image.Resampling.NEAREST)) > 0
