"""Pseudo-anomaly synthesis for RcAE stage 3 (training the CRD detector).

Stage 3 only sees defect-free images, so anomalies are synthesised on the fly:

* ``patch``      -- a solid-colour axis-aligned rectangle or ellipse,
* ``line``       -- a straight segment of random width (a scratch),
* ``copy_paste`` -- a rectangle cut from the same image and pasted elsewhere,
                    optionally flipped, rotated by 90 degrees and re-brightened.

Every shape is alpha-blended with an opacity in ``[min_opacity, 1]``.  A
fraction of the samples is left clean (all-zero mask) so the detector also
learns to answer "nothing here".

Everything is written as pure, jittable JAX: all randomness comes from
``jax.random``, every array has a static shape, and choices between kinds are
made by computing every enabled kind and selecting with ``jnp.where`` (no
Python control flow on traced values).  The config is read in Python at trace
time, so it is static.  ``synthesize`` vmaps ``synthesize_one`` over the batch
and can run inside the jitted stage-3 train step on the accelerator.

Mask contract: the returned mask is exactly the set of pixels that differ from
the input.  Pixels outside the mask are bit-identical to the input, pixels
inside differ by more than ``CHANGE_EPS`` in at least one channel.

That is ``style='paper'`` (the default).  ``style='realistic'`` (ours, after
DRAEM, CutPaste, NSA and MemSeg; ``realistic_one``) makes anomalies that look
like defects rather than stickers, so that the detector cannot find them from
the look of the input alone: one irregular blob (thresholded smooth noise
around a random elongated centre), thin scar at any angle, or rotated
rectangle per anomalous sample, of 0.1 % to 5 % of the image; filled with a
colour of the image's own palette, with the same image visibly changed
(rotated by any angle, rescaled, shifted, gamma or inversion), or by a smooth
local warp; opacity down to 0.2 and soft edges; grey on grey images; about
half the samples clean.  Its mask contract is stricter: a pixel is labelled
only where it changed by more than ``realistic.visible_change`` in some
channel, and every pixel that changed less is reset to the input, so nothing
invisible is labelled and nothing outside the mask differs.  With
``realistic.label='region'`` the label is instead the whole outline when the
change averaged over it is visible (the sample is clean otherwise); pixels
outside it are still reset to the input.
"""

from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

# The settings' defaults (configs/default.py reads them without JAX).
from rcae_jax.training.anomaly_config import default_config  # pylint: disable=unused-import

# A pixel counts as changed when some channel moved by more than this.
CHANGE_EPS = 1e-6

KINDS = ('patch', 'line', 'copy_paste')
STYLES = ('paper', 'realistic')
SHAPES = ('blob', 'scar', 'rect')
FILLS = ('palette', 'self', 'warp')


def _validate(config) -> Tuple[Tuple[str, ...], Tuple[float, ...]]:
  """Checks the static config; returns (kinds, weights) as tuples."""
  kinds = tuple(config.kinds)
  weights = tuple(float(w) for w in config.kind_weights)
  if not kinds:
    raise ValueError('config.kinds must name at least one kind')
  for k in kinds:
    if k not in KINDS:
      raise ValueError(f'unknown anomaly kind {k!r}; expected one of {KINDS}')
  if len(set(kinds)) != len(kinds):
    raise ValueError(f'duplicate kinds in {kinds}')
  if len(weights) != len(kinds):
    raise ValueError(
        f'kind_weights has {len(weights)} entries for {len(kinds)} kinds')
  if any(w < 0 for w in weights) or sum(weights) <= 0:
    raise ValueError(f'kind_weights must be >= 0 with a positive sum: {weights}')
  if not 0.0 <= config.clean_fraction <= 1.0:
    raise ValueError('clean_fraction must lie in [0, 1]')
  if not 0.0 < config.min_size <= config.max_size <= 1.0:
    raise ValueError('need 0 < min_size <= max_size <= 1')
  if int(config.max_patches) < 1:
    raise ValueError('max_patches must be >= 1')
  if not 0.0 < config.min_opacity <= 1.0:
    raise ValueError('min_opacity must lie in (0, 1]')
  if config.min_contrast < 0:
    raise ValueError('min_contrast must be >= 0')
  if not 0.0 <= config.noise_fraction <= 1.0:
    raise ValueError('noise_fraction must lie in [0, 1]')
  if not 0.0 < config.noise_min_cell <= config.noise_max_cell <= 1.0:
    raise ValueError('need 0 < noise_min_cell <= noise_max_cell <= 1')
  style = config.style
  if style not in STYLES:
    raise ValueError(f'anomalies.style must be one of {STYLES}, got '
                     f'{style!r}')
  if style == 'realistic':
    _validate_realistic(config.realistic)
  return kinds, weights


def _check_weighted(names, weights, allowed, what):
  names, weights = tuple(names), tuple(float(w) for w in weights)
  if not names or any(n not in allowed for n in names) or len(
      set(names)) != len(names):
    raise ValueError(f'anomalies.realistic.{what} must name distinct '
                     f'entries of {allowed}, got {names}')
  if len(weights) != len(names) or any(w < 0 for w in weights) or (
      sum(weights) <= 0):
    raise ValueError(f'anomalies.realistic.{what[:-1]}_weights needs one '
                     f'weight >= 0 per entry, with a positive sum: {weights}')
  return names, weights


def _validate_realistic(r):
  """Checks `realistic.*`; returns ((shapes, weights), (fills, weights))."""
  shapes = _check_weighted(r.shapes, r.shape_weights, SHAPES, 'shapes')
  fills = _check_weighted(r.fills, r.fill_weights, FILLS, 'fills')
  if not 0.0 <= r.clean_fraction < 1.0:
    raise ValueError('anomalies.realistic.clean_fraction must lie in [0, 1)')
  if not 0.0 < r.min_area <= r.max_area <= 1.0:
    raise ValueError('anomalies.realistic: need 0 < min_area <= max_area '
                     '<= 1')
  lo, hi = r.scar_length
  if not 0.0 < lo <= hi <= 2.0:
    raise ValueError('anomalies.realistic.scar_length must be (lo, hi) with '
                     '0 < lo <= hi')
  if not 0.0 < r.min_opacity <= 1.0:
    raise ValueError('anomalies.realistic.min_opacity must lie in (0, 1]')
  if not 0.0 <= r.visible_change < 1.0:
    raise ValueError('anomalies.realistic.visible_change must lie in [0, 1)')
  if r.label not in ('pixel', 'region'):
    raise ValueError("anomalies.realistic.label must be 'pixel' or 'region', "
                     f'got {r.label!r}')
  if (r.edge_sigma < 0 or r.scar_width < 0 or r.warp_max < 0 or
      r.palette_jitter < 0 or not 0.0 <= r.invert_prob <= 1.0 or
      not 0.0 < r.scale[0] <= r.scale[1] or
      not 0.0 < r.gamma[0] <= r.gamma[1]):
    raise ValueError('anomalies.realistic: edge_sigma, scar_width, warp_max, '
                     'palette_jitter must be >= 0, invert_prob in [0, 1], '
                     'scale and gamma (lo, hi) with 0 < lo <= hi')
  return shapes, fills


def check_config(config) -> None:
  """Raises ValueError (one line) if the anomaly config is invalid."""
  _validate(config)


# ---------------------------------------------------------------------------
# Helpers (all operate on one image [H, W, C]).
#
# All random numbers of all shapes come from one jax.random.uniform call and
# are sliced out here, and shapes are drawn in a lax.fori_loop rather than an
# unrolled Python loop.  Both keep XLA compile time low (about 1.5 s instead
# of about 9 s on CPU), which matters because the config is static and every
# new config recompiles.
# ---------------------------------------------------------------------------


class _Draws:
  """Hands out consecutive entries of a pre-drawn uniform [0, 1) vector."""

  def __init__(self, u):
    self._u = u
    self._i = 0

  def uniform(self, lo=0.0, hi=1.0, n=None):
    size = 1 if n is None else n
    v = self._u[self._i:self._i + size]
    self._i += size
    if self._i > self._u.shape[0]:  # static check at trace time
      raise ValueError('ran out of pre-drawn random numbers')
    v = lo + (hi - lo) * v
    return v[0] if n is None else v

  def randint(self, lo, hi):
    """Integer in [lo, hi) (hi may be traced; requires hi > lo)."""
    span = hi - lo
    k = jnp.floor(self.uniform() * span).astype(jnp.int32)
    return lo + jnp.clip(k, 0, span - 1)

  def bernoulli(self, p):
    return self.uniform() < p


def _draws_per_shape(c):
  """Random numbers per shape: kind+opacity, patch, line, copy-paste."""
  return 2 + (5 + c) + (5 + c) + 10


def _side_px(r, frac_lo, frac_hi, side):
  """Random integer side length in [1, side] from a fraction range."""
  frac = r.uniform(frac_lo, frac_hi)
  return jnp.clip(jnp.round(frac * side).astype(jnp.int32), 1, side)


def _region_mean(region, image):
  """Per-channel mean of image over a boolean [H, W] region -> [C]."""
  w = region.astype(image.dtype)[..., None]
  return jnp.sum(w * image, axis=(0, 1)) / jnp.maximum(jnp.sum(w), 1.0)


def _push_colour(colour, mean, required):
  """Moves each channel of colour at least `required` away from mean.

  Channels already far enough keep their colour.  Otherwise the colour is set
  to mean +- required, preferring the side the colour was already on, then the
  other side; if neither fits in [0, 1] (required > 0.5) it goes to the far
  end of the range, which is the largest achievable change.
  """
  d = colour - mean
  up, down = mean + required, mean - required
  prefer_up = d >= 0
  pref = jnp.where(prefer_up, up, down)
  other = jnp.where(prefer_up, down, up)
  ok = lambda v: (v >= 0.0) & (v <= 1.0)
  fallback = jnp.where(mean < 0.5, 1.0, 0.0)
  pushed = jnp.where(ok(pref), pref, jnp.where(ok(other), other, fallback))
  return jnp.where(jnp.abs(d) >= required, colour, pushed)


def _patch(r, cur, yy, xx, config):
  """Solid-colour rectangle or ellipse. Returns (region [H,W], colour [C])."""
  h_img, w_img, c = cur.shape
  h = _side_px(r, config.min_size, config.max_size, h_img)
  w = _side_px(r, config.min_size, config.max_size, w_img)
  y0 = r.randint(0, h_img - h + 1)
  x0 = r.randint(0, w_img - w + 1)
  rect = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
  # Ellipse inscribed in the rectangle, tested at pixel centres; a 1-px side
  # gives semi-axis 0.5 and still covers the centre row/column.
  cy = y0.astype(jnp.float32) + h / 2.0
  cx = x0.astype(jnp.float32) + w / 2.0
  ry = h / 2.0
  rx = w / 2.0
  ell = (((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2) <= 1.0
  use_ellipse = r.bernoulli(config.ellipse_prob)
  region = jnp.where(use_ellipse, ell & rect, rect)
  colour = r.uniform(n=c)
  return region, colour


def _line(r, cur, yy, xx, config):
  """Straight segment with width. Returns (region [H,W], colour [C])."""
  h_img, w_img, c = cur.shape
  # First endpoint on a pixel centre, so the segment always covers a pixel.
  y1 = r.randint(0, h_img).astype(jnp.float32) + 0.5
  x1 = r.randint(0, w_img).astype(jnp.float32) + 0.5
  y2 = r.uniform(0.0, float(h_img))
  x2 = r.uniform(0.0, float(w_img))
  max_w = max(1.0, float(config.line_width_max) * min(h_img, w_img))
  width = r.uniform(1.0, max_w)
  py = yy.astype(jnp.float32) + 0.5
  px = xx.astype(jnp.float32) + 0.5
  dy, dx = y2 - y1, x2 - x1
  len2 = dy * dy + dx * dx
  t = ((py - y1) * dy + (px - x1) * dx) / jnp.maximum(len2, 1e-12)
  t = jnp.clip(t, 0.0, 1.0)
  dist2 = (py - (y1 + t * dy)) ** 2 + (px - (x1 + t * dx)) ** 2
  region = dist2 <= (width / 2.0) ** 2
  colour = r.uniform(n=c)
  return region, colour


def _copy_paste(r, cur, yy, xx, opacity, config):
  """Region cut from `cur`, transformed, pasted elsewhere.

  Returns (region [H,W], fill [H,W,C]) with region = destination rectangle.
  """
  h_img, w_img, _ = cur.shape
  h = _side_px(r, config.min_size, config.max_size, h_img)
  w = _side_px(r, config.min_size, config.max_size, w_img)
  rotate = r.bernoulli(config.rotate_prob)
  # A 90-degree rotation maps an s x s square onto itself.
  s = jnp.minimum(h, w)
  h = jnp.where(rotate, s, h)
  w = jnp.where(rotate, s, w)
  sy0 = r.randint(0, h_img - h + 1)
  sx0 = r.randint(0, w_img - w + 1)
  dy0 = r.randint(0, h_img - h + 1)
  dx0 = r.randint(0, w_img - w + 1)
  region = (yy >= dy0) & (yy < dy0 + h) & (xx >= dx0) & (xx < dx0 + w)

  # Source coordinates for every destination pixel (only used inside region).
  u = jnp.clip(yy - dy0, 0, h - 1)
  v = jnp.clip(xx - dx0, 0, w - 1)
  u = jnp.where(r.bernoulli(config.flip_prob), h - 1 - u, u)
  v = jnp.where(r.bernoulli(config.flip_prob), w - 1 - v, v)
  u, v = jnp.where(rotate, v, u), jnp.where(rotate, s - 1 - u, v)
  src_y = jnp.clip(sy0 + u, 0, h_img - 1)
  src_x = jnp.clip(sx0 + v, 0, w_img - 1)
  pasted = cur[src_y, src_x]  # [H, W, C]

  b = r.uniform(-config.brightness_max, config.brightness_max)
  pasted = jnp.clip(pasted * (1.0 + b), 0.0, 1.0)

  # If the paste barely changes what it covers (e.g. uniform texture), shift
  # its brightness per channel so that its mean moves `min_contrast /
  # opacity` away from the mean of the covered pixels; since mean|x| >=
  # |mean x|, the mean absolute change then reaches min_contrast (up to
  # clipping).  Pastes that already differ enough are left as they are.
  required = config.min_contrast / opacity
  wmask = region.astype(cur.dtype)[..., None]
  n = jnp.maximum(jnp.sum(wmask), 1.0)
  change = jnp.sum(wmask * jnp.abs(pasted - cur), axis=(0, 1)) / n  # [C]
  p_mean = jnp.sum(wmask * pasted, axis=(0, 1)) / n
  c_mean = jnp.sum(wmask * cur, axis=(0, 1)) / n
  shift = _push_colour(p_mean, c_mean, required) - p_mean
  shifted = jnp.clip(pasted + shift, 0.0, 1.0)
  pasted = jnp.where(change < required, shifted, pasted)
  return region, pasted


# ---------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------


def synthesize_one(key: jax.Array, image: jax.Array, config
                   ) -> Tuple[jax.Array, jax.Array]:
  """Synthesises pseudo-anomalies on one image.

  Args:
    key: PRNG key.
    image: float [H, W, C] in [0, 1], C = 1 or 3 (any C works).
    config: ConfigDict like `default_config()` (static).

  Returns:
    (anomalous [H, W, C] float32 in [0, 1], mask [H, W, 1] float32 in {0, 1}),
    where the mask is exactly the set of changed pixels.
  """
  kinds, weights = _validate(config)
  image = jnp.asarray(image, jnp.float32)
  if image.ndim != 3:
    raise ValueError(f'expected image [H, W, C], got shape {image.shape}')
  h_img, w_img, c = image.shape
  yy = jnp.arange(h_img, dtype=jnp.int32)[:, None]
  xx = jnp.arange(w_img, dtype=jnp.int32)[None, :]
  yy, xx = jnp.broadcast_arrays(yy, xx)

  max_patches = int(config.max_patches)
  n_draws = _draws_per_shape(c)
  k_sample, k_shapes = jax.random.split(key)
  # [0]: clean?, [1]: number of shapes.
  sample_u = jax.random.uniform(k_sample, (2,))
  n_shapes = 1 + jnp.clip(jnp.floor(sample_u[1] * max_patches).astype(
      jnp.int32), 0, max_patches - 1)
  # Kind index = first bin of the normalised cumulative weights above u.
  cum = jnp.cumsum(jnp.asarray(weights, jnp.float32))
  cum = cum / cum[-1]
  shape_u = jax.random.uniform(k_shapes, (max_patches, n_draws))

  def add_shape(i, carry):
    """Draws shape i (if i < n_shapes) onto the carried image."""
    cur, touched = carry
    r = _Draws(shape_u[i])
    kind_u = r.uniform()
    # Number of cumulative bin edges at or below u; a zero-weight kind has an
    # empty bin and is never chosen.
    kind_idx = jnp.minimum(jnp.sum(kind_u >= cum), len(kinds) - 1)
    opacity = r.uniform(config.min_opacity, 1.0)
    required = config.min_contrast / opacity

    # Compute every enabled kind, then select (static shapes, no branching).
    # Draw slices are fixed per kind whether or not the kind is enabled, so a
    # kind's randomness does not depend on which other kinds are enabled.
    r_patch, r_line, r_cp = (_Draws(shape_u[i, 2:7 + c]),
                             _Draws(shape_u[i, 7 + c:12 + 2 * c]),
                             _Draws(shape_u[i, 12 + 2 * c:]))
    regions, fills = [], []
    for kind in kinds:
      if kind == 'patch':
        region, colour = _patch(r_patch, cur, yy, xx, config)
      elif kind == 'line':
        region, colour = _line(r_line, cur, yy, xx, config)
      else:
        region, fill = _copy_paste(r_cp, cur, yy, xx, opacity, config)
      if kind in ('patch', 'line'):
        colour = _push_colour(colour, _region_mean(region, cur), required)
        fill = jnp.broadcast_to(colour, cur.shape)
      regions.append(region)
      fills.append(fill)
    if len(kinds) == 1:
      region, fill = regions[0], fills[0]
    else:
      region = jnp.stack(regions)[kind_idx]
      fill = jnp.stack(fills)[kind_idx]

    region = region & (i < n_shapes)
    blended = (1.0 - opacity) * cur + opacity * fill
    cur = jnp.where(region[..., None], blended, cur)
    return cur, touched | region

  cur, touched = jax.lax.fori_loop(
      0, max_patches, add_shape,
      (image, jnp.zeros((h_img, w_img), bool)))

  cur = jnp.clip(cur, 0.0, 1.0)
  is_clean = sample_u[0] < config.clean_fraction
  changed = jnp.any(jnp.abs(cur - image) > CHANGE_EPS, axis=-1)
  mask = touched & changed & ~is_clean
  # Undo sub-threshold changes so "outside the mask" means bit-identical.
  out = jnp.where(mask[..., None], cur, image)
  return out, mask[..., None].astype(jnp.float32)


# Noise cell sizes are drawn from these octaves (fractions of the side);
# a static list keeps every array shape static under jit.
_OCTAVES = tuple(2.0 ** -k for k in range(0, 8))


def smooth_noise(key: jax.Array, h: int, w: int, cell: float) -> jax.Array:
  """[H, W] zero-mean, unit-variance smooth noise: Gaussian values on a grid
  of `cell`-sized cells (a fraction of the side), bicubically upsampled."""
  side = max(2, round(1 / cell) + 1)  # Grid points per side.
  grid = jax.random.normal(key, (side, side))
  field = jax.image.resize(grid, (h, w), method='cubic')
  return (field - field.mean()) / jnp.maximum(field.std(), 1e-6)


def noise_texture_one(key: jax.Array, image: jax.Array, source: jax.Array,
                      config) -> Tuple[jax.Array, jax.Array]:
  """One noise-texture anomaly (see `noise_fraction`): blobs where smooth
  noise exceeds a random threshold, filled with `source` (another training
  image) rolled by a random offset, maybe flipped, re-brightened, and
  blended in with a random opacity. Same mask contract as the shapes."""
  h, w, _ = image.shape
  k_noise, k_u = jax.random.split(key)
  octaves = [c for c in _OCTAVES
             if config.noise_min_cell <= c <= config.noise_max_cell] or [
                 config.noise_max_cell]
  u = jax.random.uniform(k_u, (7,))
  fields = jnp.stack([smooth_noise(k_noise, h, w, c) for c in octaves])
  field = fields[jnp.minimum((u[0] * len(octaves)).astype(jnp.int32),
                             len(octaves) - 1)]
  lo, hi = config.noise_threshold
  region = field > lo + (hi - lo) * u[1]
  shifted = jnp.roll(source, (jnp.floor(u[2] * h).astype(jnp.int32),
                              jnp.floor(u[3] * w).astype(jnp.int32)), (0, 1))
  shifted = jnp.where(u[4] < config.flip_prob, shifted[:, ::-1], shifted)
  scale = 1.0 + config.brightness_max * (2.0 * u[5] - 1.0)
  fill = jnp.clip(shifted * scale, 0.0, 1.0)
  opacity = config.min_opacity + (1.0 - config.min_opacity) * u[6]
  blended = jnp.clip((1.0 - opacity) * image + opacity * fill, 0.0, 1.0)
  changed = jnp.any(jnp.abs(blended - image) > CHANGE_EPS, axis=-1)
  mask = region & changed
  return (jnp.where(mask[..., None], blended, image),
          mask[..., None].astype(jnp.float32))


# ---------------------------------------------------------------------------
# The realistic style (ours).
# ---------------------------------------------------------------------------

# Noise cells of the blob outlines and warps (fractions of the side); the
# one nearest the defect's diameter is used.
_REAL_OCTAVES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)


def _pick(u, weights):
  """Index into `weights` (static, >= 0, positive sum) drawn by u in [0, 1):
  a zero weight is never picked."""
  cum = jnp.cumsum(jnp.asarray(weights, jnp.float32))
  return jnp.minimum(jnp.sum(u * cum[-1] >= cum), len(weights) - 1)


def _select(index, options):
  return options[0] if len(options) == 1 else jnp.stack(options)[index]


def _blur2d(x, sigma, radius: int):
  """Separable Gaussian blur of [H, W] with a traced sigma (>= 0; ~0 is
  the identity) and a static kernel radius, edge-padded."""
  t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  k = jnp.exp(-t * t / (2.0 * jnp.maximum(sigma, 1e-3) ** 2))
  k = k / k.sum()
  xp = jnp.pad(x, radius, mode='edge')[None, :, :, None]
  dn = ('NHWC', 'HWIO', 'NHWC')
  y = jax.lax.conv_general_dilated(xp, k.reshape(-1, 1, 1, 1), (1, 1),
                                   'VALID', dimension_numbers=dn)
  y = jax.lax.conv_general_dilated(y, k.reshape(1, -1, 1, 1), (1, 1),
                                   'VALID', dimension_numbers=dn)
  return y[0, :, :, 0]


def _sample(image, ys, xs):
  """Bilinear samples of image [H, W, C] at float coordinates [H, W]
  (pixel indices), edges clamped."""
  return jnp.stack([jax.scipy.ndimage.map_coordinates(
      image[..., ch], [ys, xs], order=1, mode='nearest')
                    for ch in range(image.shape[-1])], axis=-1)


def _octave_noise(key, h, w, index):
  """Smooth noise [H, W] at `_REAL_OCTAVES[index]` (index traced)."""
  keys = jax.random.split(key, len(_REAL_OCTAVES))
  return _select(index, [smooth_noise(k, h, w, c)
                         for k, c in zip(keys, _REAL_OCTAVES)])


def realistic_one(key: jax.Array, image: jax.Array, config
                  ) -> Tuple[jax.Array, jax.Array]:
  """One sample of `style='realistic'` (see the module docstring and
  `default_config().realistic`). Same signature as `synthesize_one`."""
  r = config.realistic
  (shapes, shape_w), (fills, fill_w) = _validate_realistic(r)
  image = jnp.asarray(image, jnp.float32)
  h, w, c = image.shape
  side = float(min(h, w))
  k_u, k_blob, k_wy, k_wx = jax.random.split(key, 4)
  u = iter(jax.random.uniform(k_u, (40,)))  # Consumed in a fixed order.
  lerp = lambda lo, hi: lo + (hi - lo) * next(u)
  log_lerp = lambda lo, hi: jnp.exp(lerp(jnp.log(lo), jnp.log(hi)))
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                        jnp.arange(w, dtype=jnp.float32), indexing='ij')

  # Where and how big: a centre, an orientation, an area and an aspect.
  cy, cx = lerp(0.0, h - 1.0), lerp(0.0, w - 1.0)
  theta = lerp(0.0, jnp.pi)
  area = log_lerp(r.min_area, r.max_area) * h * w  # Pixels.
  aspect = log_lerp(1 / 3, 3.0)
  along = (yy - cy) * jnp.sin(theta) + (xx - cx) * jnp.cos(theta)
  across = (yy - cy) * jnp.cos(theta) - (xx - cx) * jnp.sin(theta)
  radius = jnp.sqrt(area / jnp.pi)
  # Noise cell nearest the diameter (as a fraction of the side): a cell
  # much smaller than the blob would break its outline into specks.
  octave = jnp.argmin(jnp.abs(jnp.log2(jnp.asarray(_REAL_OCTAVES)) -
                              jnp.log2(2 * radius / side)))

  outlines = []
  for shape in shapes:
    if shape == 'blob':
      # log of an elongated Gaussian bump plus noise: its top `area` pixels
      # form one irregular blob of exactly that area.
      d2 = (along / jnp.sqrt(aspect)) ** 2 + (across * jnp.sqrt(aspect)) ** 2
      g = -d2 / (2 * radius ** 2) + lerp(0.2, 0.8) * _octave_noise(
          k_blob, h, w, octave)
      k = jnp.clip(jnp.round(area).astype(jnp.int32), 1, h * w)
      outlines.append(g >= jnp.sort(g.ravel())[h * w - k])
    elif shape == 'scar':
      length = lerp(*r.scar_length) * side
      width = lerp(1.0, max(1.0, r.scar_width * side))
      wave = (lerp(0.0, 0.08) * length *
              jnp.sin(2 * jnp.pi * lerp(0.3, 1.5) * along / length +
                      lerp(0.0, 2 * jnp.pi)))
      outlines.append((jnp.abs(along) <= length / 2) &
                      (jnp.abs(across - wave) <= width / 2))
    else:  # 'rect'
      half_a = jnp.sqrt(area * aspect) / 2
      half_b = jnp.sqrt(area / aspect) / 2
      outlines.append((jnp.abs(along) <= jnp.maximum(half_a, 0.5)) &
                      (jnp.abs(across) <= jnp.maximum(half_b, 0.5)))
  region = _select(_pick(next(u), shape_w), outlines)
  soft = _blur2d(region.astype(jnp.float32), lerp(0.0, r.edge_sigma),
                 max(1, int(np.ceil(3 * r.edge_sigma))))
  opacity = lerp(r.min_opacity, 1.0)

  candidates, alphas = [], []
  for fill in fills:
    if fill == 'palette':
      # 8 of the image's own pixels; the one farthest from what is covered.
      iy = jnp.floor(jax.random.uniform(jax.random.fold_in(k_u, 1), (8,))
                     * h).astype(jnp.int32)
      ix = jnp.floor(jax.random.uniform(jax.random.fold_in(k_u, 2), (8,))
                     * w).astype(jnp.int32)
      palette = image[jnp.clip(iy, 0, h - 1), jnp.clip(ix, 0, w - 1)]
      covered = _region_mean(region, image)
      colour = palette[jnp.argmax(jnp.sum(jnp.abs(palette - covered), -1))]
      colour = jnp.clip(colour + lerp(-r.palette_jitter, r.palette_jitter),
                        0.0, 1.0)  # One shift for every channel: grey stays.
      candidates.append(jnp.broadcast_to(colour, image.shape))
      alphas.append(opacity * soft)
    elif fill == 'self':
      # The image around another point, rotated by any angle and rescaled.
      sy, sx = lerp(0.0, h - 1.0), lerp(0.0, w - 1.0)
      phi, scale = lerp(0.0, 2 * jnp.pi), log_lerp(*r.scale)
      dy, dx = yy - cy, xx - cx
      src_y = sy + scale * (jnp.cos(phi) * dy - jnp.sin(phi) * dx)
      src_x = sx + scale * (jnp.sin(phi) * dy + jnp.cos(phi) * dx)
      moved = jnp.clip(_sample(image, src_y, src_x), 0.0, 1.0)
      gamma = log_lerp(*r.gamma)
      moved = jnp.where(next(u) < 0.5, moved ** gamma, moved)
      moved = jnp.where(next(u) < r.invert_prob, 1.0 - moved, moved)
      candidates.append(moved)
      alphas.append(opacity * soft)
    else:  # 'warp': a smooth displacement field, tapered by the outline.
      amp = lerp(0.5, 1.0) * max(1.0, r.warp_max * side)
      # Tapered over a few px so the field is smooth (no tearing).
      window = _blur2d(region.astype(jnp.float32),
                       jnp.clip(radius / 3, 0.5, 4.0), 12)
      wy = amp * window * _octave_noise(k_wy, h, w, octave)
      wx = amp * window * _octave_noise(k_wx, h, w, octave)
      candidates.append(_sample(image, yy + wy, xx + wx))
      alphas.append(jnp.ones_like(soft))
  fill_idx = _pick(next(u), fill_w)
  fill, alpha = _select(fill_idx, candidates), _select(fill_idx, alphas)

  out = jnp.clip(image + alpha[..., None] * (fill - image), 0.0, 1.0)
  # Grey images get grey defects: real pixels there have no chroma.
  grey = jnp.max(jnp.abs(image - image.mean(-1, keepdims=True))) < 1e-3
  out = jnp.where(grey, jnp.broadcast_to(out.mean(-1, keepdims=True),
                                         out.shape), out)
  clean = next(u) < r.clean_fraction
  change = jnp.max(jnp.abs(out - image), axis=-1)
  if r.label == 'region':
    seen = _region_mean(region, change[..., None])[0] > max(
        r.visible_change, CHANGE_EPS)
    mask = region & seen & ~clean
  else:
    mask = (change > max(r.visible_change, CHANGE_EPS)) & ~clean
  return (jnp.where(mask[..., None], out, image),
          mask[..., None].astype(jnp.float32))


def synthesize(key: jax.Array, images: jax.Array, config
               ) -> Tuple[jax.Array, jax.Array]:
  """Batched `synthesize_one` (vmapped; one independent key per sample).

  Args:
    key: PRNG key.
    images: float [B, H, W, C] in [0, 1].
    config: ConfigDict like `default_config()` (static, read at trace time).

  Returns:
    (anomalous [B, H, W, C] float32 in [0, 1], masks [B, H, W, 1] float32).
  """
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4:
    raise ValueError(f'expected images [B, H, W, C], got shape {images.shape}')
  _validate(config)
  keys = jax.random.split(key, images.shape[0])
  if config.style == 'realistic':
    return jax.vmap(functools.partial(realistic_one, config=config))(
        keys, images)
  fn = functools.partial(synthesize_one, config=config)
  out, masks = jax.vmap(fn)(keys, images)
  if not config.noise_fraction:
    return out, masks
  # Texture comes from the next image of the batch (itself at batch 1,
  # then shifted): other defect-free images, no external texture set.
  sources = jnp.roll(images, 1, axis=0)
  noise_fn = functools.partial(noise_texture_one, config=config)
  n_out, n_masks = jax.vmap(noise_fn)(
      jax.random.split(jax.random.fold_in(key, 1), images.shape[0]), images,
      sources)
  # Clean samples (the shapes path drew them) stay clean.
  clean = jnp.all(masks == 0, axis=(1, 2, 3), keepdims=True)
  use_noise = (jax.random.uniform(jax.random.fold_in(key, 2),
                                  (images.shape[0], 1, 1, 1))
               < config.noise_fraction) & ~clean
  return (jnp.where(use_noise, n_out, out),
          jnp.where(use_noise, n_masks, masks))
