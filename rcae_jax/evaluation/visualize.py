"""Pictures of reconstructions, anomaly maps and metric curves.

Drawn with numpy + Pillow only (no matplotlib dependency): a jet-like
colour map is a 256-entry lookup table, lines and text use PIL.ImageDraw
with Pillow's built-in default font (no font files needed).

Colour scales are fixed by the caller (`value_range` over all of a
category's maps), never per image: with a per-image scale a defect-free
image's faint noise would look as red as a real defect.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import scipy.ndimage
from PIL import Image, ImageDraw

from rcae_jax.evaluation import export_maps

# Jet-like ramp: dark blue, blue, cyan, yellow, red, dark red. Every one of
# the 256 entries differs from its neighbours (each segment moves a channel
# by >= 4 levels per entry), so distinct values give distinct colours. It
# contains neither magenta nor white, the contour colours below.
_RAMP_POS = (0.0, 0.125, 0.375, 0.625, 0.875, 1.0)
_RAMP_RGB = ((0.0, 0.0, 0.5), (0.0, 0.0, 1.0), (0.0, 1.0, 1.0),
             (1.0, 1.0, 0.0), (1.0, 0.0, 0.0), (0.5, 0.0, 0.0))
_LUT_SIZE = 256


def _make_lut() -> np.ndarray:
  t = np.linspace(0.0, 1.0, _LUT_SIZE)
  rgb = np.asarray(_RAMP_RGB)
  lut = np.stack([np.interp(t, _RAMP_POS, rgb[:, c]) for c in range(3)], -1)
  return np.round(lut * 255).astype(np.uint8)


LUT = _make_lut()  # [256, 3] uint8

# Ground-truth defect boundary: magenta, not green: a defect's edge is where
# the heat map passes through its cyan-green-yellow middle, on which a green
# line would vanish; jet never has red and blue high with green low.
GT_COLOR = (255, 0, 255)
PRED_COLOR = (255, 255, 255)  # predicted defect boundary: white
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)
GAP = 4  # px between panel tiles
LABEL_H = 12  # px of label bar above each tile (default font is ~10 px)
COLORBAR_W = 60  # px: 8 px gradient strip + end values ('-1.23e-05': 48)


# ---------------------------------------------------------------------------
# Maps and overlays.
# ---------------------------------------------------------------------------


def colorize(amap, vmin: float, vmax: float) -> np.ndarray:
  """[H, W] float -> [H, W, 3] uint8 on the fixed scale [vmin, vmax].

  Values outside the scale are clipped; NaN is drawn as vmin.
  """
  if not vmax > vmin:
    raise ValueError(f'colour scale needs vmax > vmin, got [{vmin}, {vmax}] '
                     '(value_range never returns an empty scale)')
  amap = np.asarray(amap, dtype=np.float64)
  t = (np.nan_to_num(amap, nan=vmin) - vmin) / (vmax - vmin)
  idx = np.round(np.clip(t, 0.0, 1.0) * (_LUT_SIZE - 1)).astype(np.intp)
  return LUT[idx]


def value_range(maps, percentile: float = 99.9,
                max_samples: int = 4_000_000) -> tuple[float, float]:
  """A fixed colour scale for a category: (vmin, vmax).

  vmin is the minimum over all maps; vmax the `percentile`-th percentile of
  all pixels of all maps, not the maximum, so that one extreme pixel does
  not squash every other map into the bottom colours (0.1% of pixels, far
  fewer than defects usually cover, saturate). Non-finite values are
  ignored. For speed and memory on many full-resolution maps (MVTec: ~100
  maps of 1024^2 px) the percentile is taken on a deterministic strided
  subsample of at most ~`max_samples` pixels. A constant (or empty) input
  still gives vmax > vmin.
  """
  maps = [np.asarray(m, dtype=np.float32).ravel() for m in maps]
  total = sum(m.size for m in maps)
  step = max(1, -(-total // max_samples))  # ceil division
  vmin = np.inf
  samples = []
  for m in maps:
    m = m[np.isfinite(m)]
    if m.size:
      vmin = min(vmin, float(m.min()))
      samples.append(m[::step])
  if not samples:
    return 0.0, 1.0
  vmax = float(np.percentile(np.concatenate(samples), percentile))
  if not vmax > vmin:
    # Constant maps (or a spike-free top 0.1%): widen by a relative epsilon
    # that stays representable for large magnitudes.
    vmax = vmin + max(abs(vmin), 1.0) * 1e-3
  return vmin, vmax


def contour(mask, width: int = 1) -> np.ndarray:
  """Boundary pixels of a binary mask: mask AND NOT eroded(mask).

  Pixels outside the image count as background, so a mask touching the
  border has its boundary drawn along the border. `width` px thick.
  """
  mask = np.asarray(mask).astype(bool)
  if not mask.any():
    return np.zeros_like(mask)
  eroded = scipy.ndimage.binary_erosion(mask, iterations=width,
                                        border_value=0)
  return mask & ~eroded


def _to_rgb_uint8(image) -> np.ndarray:
  """uint8 or float-in-[0, 1] image, [H, W], [H, W, 1] or [H, W, 3]."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = np.round(np.clip(image.astype(np.float64), 0.0, 1.0) * 255)
    image = image.astype(np.uint8)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f'expected an image [H, W], [H, W, 1] or [H, W, 3], '
                     f'got shape {image.shape}')
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image


def overlay(image, amap, vmin: float, vmax: float, gt_mask=None,
            threshold: Optional[float] = None, alpha: float = 0.5,
            contour_width: int = 1) -> np.ndarray:
  """Heat map blended on the image, with defect boundaries.

  Args:
    image: [H, W, 3] uint8 (or float in [0, 1], or grayscale).
    amap: [H, W] map at the image's size (the caller resizes, e.g. with
      `maps.upsample`): a silent resize here would hide a mix-up.
    vmin, vmax: the category's fixed colour scale.
    gt_mask: optional [H, W] ground-truth mask; its boundary is GT_COLOR.
    threshold: optional; the boundary of `amap >= threshold` is PRED_COLOR.
    alpha: weight of the heat map in the blend.
    contour_width: boundary thickness in px (thicker for large images).
  Returns:
    [H, W, 3] uint8. The ground-truth boundary is drawn last, so where both
    boundaries meet it shows in GT_COLOR.
  """
  image = _to_rgb_uint8(image)
  amap = np.asarray(amap)
  if amap.shape != image.shape[:2]:
    raise ValueError(f'map shape {amap.shape} != image size '
                     f'{image.shape[:2]}; resize the map first')
  heat = colorize(amap, vmin, vmax).astype(np.float32)
  out = (1.0 - alpha) * image.astype(np.float32) + alpha * heat
  out = np.round(np.clip(out, 0, 255)).astype(np.uint8)
  if threshold is not None:
    out[contour(amap >= threshold, contour_width)] = PRED_COLOR
  if gt_mask is not None:
    gt_mask = np.asarray(gt_mask)
    if gt_mask.shape != image.shape[:2]:
      raise ValueError(f'mask shape {gt_mask.shape} != image size '
                       f'{image.shape[:2]}')
    out[contour(gt_mask > 0, contour_width)] = GT_COLOR
  return out


# ---------------------------------------------------------------------------
# Panels.
# ---------------------------------------------------------------------------


def _fit_text(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
  """Drops trailing characters until the text fits `width` px."""
  while text and draw.textlength(text) > width:
    text = text[:-1]
  return text


def _resize_to(tile: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  if tile.shape[:2] == hw:
    return tile
  return np.asarray(Image.fromarray(tile).resize(
      (hw[1], hw[0]), Image.Resampling.BILINEAR))


def _colorbar(height: int, vmin: float, vmax: float) -> Image.Image:
  """A vertical gradient strip (vmax at the top) with its end values."""
  bar = Image.new('RGB', (COLORBAR_W, height), BACKGROUND)
  t = np.linspace(1.0, 0.0, height)
  idx = np.round(t * (_LUT_SIZE - 1)).astype(np.intp)
  strip = np.repeat(LUT[idx][:, None, :], 8, axis=1)
  bar.paste(Image.fromarray(np.ascontiguousarray(strip)), (0, 0))
  draw = ImageDraw.Draw(bar)
  draw.text((10, 0), f'{vmax:.3g}', fill=TEXT_COLOR)
  draw.text((10, max(0, height - 11)), f'{vmin:.3g}', fill=TEXT_COLOR)
  return bar


def panel(image, recs: Sequence, details: Optional[Sequence], amap,
          vmin: float, vmax: float, gt_mask=None,
          threshold: Optional[float] = None, labels: bool = True,
          alpha: float = 0.5) -> np.ndarray:
  """Side-by-side strip: input | n=1 | ... | n=N | overlay.

  Args:
    image: [H, W, 3] input, uint8 or float in [0, 1].
    recs: one reconstruction per recursion depth, [h, w, 3] uint8 or float
      in [0, 1]; resized to the image's size if needed.
    details: None, or the detail-restored reconstructions (same count as
      recs), drawn in a second row under their depth.
    amap, vmin, vmax, gt_mask, threshold, alpha: as for `overlay` (amap at
      the image's size).
    labels: draw a label bar above each tile and a colour bar with the scale
      on the right.
  Returns:
    [rows * (label_h + H) + (rows - 1) * GAP,
     cols * W + (cols - 1) * GAP (+ GAP + COLORBAR_W), 3] uint8,
    with cols = len(recs) + 2, rows = 2 with details, else 1.
  """
  image = _to_rgb_uint8(image)
  hw = image.shape[:2]
  h, w = hw
  recs = [_resize_to(_to_rgb_uint8(r), hw) for r in recs]
  if details is not None:
    if len(details) != len(recs):
      raise ValueError(f'{len(details)} detail-restored images for '
                       f'{len(recs)} reconstructions')
    details = [_resize_to(_to_rgb_uint8(d), hw) for d in details]
  over = overlay(image, amap, vmin, vmax, gt_mask=gt_mask,
                 threshold=threshold, alpha=alpha)

  # (tile, label) per cell; None leaves the cell blank.
  rows = [[(image, 'input')]
          + [(r, f'n={i + 1}') for i, r in enumerate(recs)]
          + [(over, 'map')]]
  if details is not None:
    rows.append([None] + [(d, f'det n={i + 1}') for i, d in enumerate(details)]
                + [None])

  label_h = LABEL_H if labels else 0
  cols = len(rows[0])
  width = cols * w + (cols - 1) * GAP
  if labels:
    width += GAP + COLORBAR_W
  row_h = label_h + h
  height = len(rows) * row_h + (len(rows) - 1) * GAP
  canvas = Image.new('RGB', (width, height), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  for r, row in enumerate(rows):
    y = r * (row_h + GAP)
    for c, cell in enumerate(row):
      if cell is None:
        continue
      tile, label = cell
      x = c * (w + GAP)
      canvas.paste(Image.fromarray(np.ascontiguousarray(tile)),
                   (x, y + label_h))
      if labels:
        draw.text((x + 1, y), _fit_text(draw, label, w - 1), fill=TEXT_COLOR)
  if labels:
    # The scale next to the overlay, in the first row.
    canvas.paste(_colorbar(h, vmin, vmax), (cols * (w + GAP), label_h))
  return np.asarray(canvas)


# ---------------------------------------------------------------------------
# Curves.
# ---------------------------------------------------------------------------


def _clip_polyline(xs: np.ndarray, ys: np.ndarray,
                   x_max: float) -> list[list[tuple[float, float]]]:
  """Splits a polyline into pieces with x <= x_max (cut at x_max)."""
  pieces: list[list[tuple[float, float]]] = []
  current: list[tuple[float, float]] = []
  for i in range(len(xs)):
    x, y = float(xs[i]), float(ys[i])
    if x <= x_max:
      if not current and i > 0 and xs[i - 1] > x_max:
        # Re-entering: start at the crossing.
        x0, y0 = float(xs[i - 1]), float(ys[i - 1])
        current.append((x_max, y0 + (y - y0) * (x_max - x0) / (x - x0)))
      current.append((x, y))
    elif current:
      # Leaving: end at the crossing.
      x0, y0 = current[-1]
      current.append((x_max, y0 + (y - y0) * (x_max - x0) / (x - x0)))
      pieces.append(current)
      current = []
  if current:
    pieces.append(current)
  return pieces


def curve_plot(xs, ys, title: str, xlabel: str, ylabel: str,
               x_max: Optional[float] = None,
               size: tuple[int, int] = (320, 240)) -> np.ndarray:
  """A line plot of y in [0, 1] against x in [0, x_max] (default 1).

  Used for ROC curves and PRO curves (x_max=0.3, as AU-PRO integrates up to
  a false positive rate of 0.3). The curve is cut at x_max; y is clipped to
  [0, 1]; non-finite points are dropped.

  Args:
    size: (width, height) in px, PIL's order; the result is [height, width,
      3] uint8.
  """
  x_max = 1.0 if x_max is None else float(x_max)
  if not x_max > 0:
    raise ValueError(f'x_max must be > 0, got {x_max}')
  xs = np.asarray(xs, dtype=np.float64).ravel()
  ys = np.asarray(ys, dtype=np.float64).ravel()
  if xs.shape != ys.shape:
    raise ValueError(f'{xs.size} x values but {ys.size} y values')
  keep = np.isfinite(xs) & np.isfinite(ys)
  xs, ys = xs[keep], np.clip(ys[keep], 0.0, 1.0)

  w, h = size
  left, right, top, bottom = 34, 10, 18, 28
  pw, ph = w - left - right, h - top - bottom
  if pw < 10 or ph < 10:
    raise ValueError(f'plot size {size} is too small')

  def to_px(x: float, y: float) -> tuple[float, float]:
    return left + x / x_max * pw, top + (1.0 - y) * ph

  canvas = Image.new('RGB', (w, h), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  grid, axis = (225, 225, 225), (0, 0, 0)
  for frac in (0.0, 0.5, 1.0):
    # Vertical and horizontal grid lines + tick labels at 0, mid, max.
    gx, _ = to_px(frac * x_max, 0.0)
    _, gy = to_px(0.0, frac)
    draw.line([(gx, top), (gx, top + ph)], fill=grid)
    draw.line([(left, gy), (left + pw, gy)], fill=grid)
    draw.line([(gx, top + ph), (gx, top + ph + 3)], fill=axis)
    draw.line([(left - 3, gy), (left, gy)], fill=axis)
    xt = f'{frac * x_max:g}'
    draw.text((gx - draw.textlength(xt) / 2, top + ph + 4), xt, fill=axis)
    yt = f'{frac:g}'
    draw.text((left - 5 - draw.textlength(yt), gy - 6), yt, fill=axis)
  draw.line([(left, top), (left, top + ph), (left + pw, top + ph)],
            fill=axis)

  for piece in _clip_polyline(np.maximum(xs, 0.0), ys, x_max):
    pts = [to_px(x, y) for x, y in piece]
    if len(pts) == 1:
      draw.point(pts, fill=(31, 90, 200))
    else:
      draw.line(pts, fill=(31, 90, 200), width=2, joint='curve')

  draw.text(((w - draw.textlength(title)) / 2, 2), title, fill=axis)
  draw.text((left + (pw - draw.textlength(xlabel)) / 2, h - 13), xlabel,
            fill=axis)
  # Vertical y label: drawn on its own strip, rotated, pasted left.
  if ylabel:
    tw = int(np.ceil(draw.textlength(ylabel))) + 2
    strip = Image.new('L', (tw, 12), 0)
    ImageDraw.Draw(strip).text((1, 0), ylabel, fill=255)
    strip = strip.rotate(90, expand=True)
    y0 = int(top + max(0, (ph - strip.height) / 2))
    canvas.paste(Image.new('RGB', strip.size, axis), (0, y0), strip)
  return np.asarray(canvas)


# ---------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------


def save_png(path: str, array) -> None:
  """Saves a uint8 [H, W, 3] / [H, W] array as PNG, atomically.

  Through fileio (local temp file + rename, or one gs:// upload), creating
  folders: a crash never leaves a half-written picture.
  """
  array = np.ascontiguousarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f'save_png wants uint8, got {array.dtype}')
  export_maps.save_image_atomic(path, Image.fromarray(array), 'PNG')
