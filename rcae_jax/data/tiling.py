"""Tiling of high-resolution images (`data.tile_size`, `data.tile_overlap`).

Shrinking a 4k px image to a 256 px model erases a defect of a few pixels.
With tiling, each image is scaled once by S / T (S = data.image_size, T =
data.tile_size; no scaling when T = S) to its *working resolution*, and cut
there into S x S tiles, the model's input: the jitted programs keep their
one shape for any image size, and a defect keeps T / S of its source pixels
per model pixel whatever the image's size.

- Training draws one tile per example: at a random position drawn from
  (seed, step, position in the global batch) ('random'), or every tile of
  the inference grid in turn ('grid').
- Inference covers the image with a grid of tiles that overlap by
  `tile_overlap` of their side, the last one flush with the image's edge;
  tiles of all images are batched (the last batch padded) through the same
  predict function, and the tile maps are blended back into one map at the
  working resolution. Thresholds, image scores and pixel metrics use that
  map (or it resized to the source size, as untiled maps are).
- An image smaller than a tile along a side is edge-padded there (as
  data.resize='keep_aspect' pads; the padding never reaches a map), not
  enlarged: its pixels keep the scale of every other image's.
- Blending: a weighted mean whose weight falls off linearly towards a
  tile's borders *inside* the image, where a neighbour's tile sees the same
  pixels away from its own border (convolutions pad at tile borders, so
  their outputs are least reliable there). Borders on the image's edge are
  not tapered: no other tile covers those pixels. Weights are integers and
  sums are float64, so a pixel covered by one tile gets that tile's value
  bit for bit: an image of one tile's size maps exactly as without tiling.

Numpy (and Pillow through `decode` for the one resize): no JAX computation
here; the model is a callable passed to `stitch_stream`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Iterator, NamedTuple, Optional

import numpy as np

from rcae_jax.data import decode
from rcae_jax.data import geometry

SAMPLINGS = ('random', 'grid')


@dataclasses.dataclass(frozen=True)
class Tiling:
  """tile: T, tile side in source pixels; side: S, the model's side (the
  tile side at the working resolution); overlap: fraction of a tile's side
  that neighbouring inference tiles share; sampling: training tiles."""
  tile: int
  side: int
  overlap: float
  sampling: str

  @property
  def overlap_px(self) -> int:
    """Overlap in working pixels; below S whenever overlap < 1."""
    return int(self.overlap * self.side)


def from_config(data_cfg) -> Optional[Tiling]:
  """The tiling of a `config.data`, or None when `tile_size` is 0 (off).
  Validated settings only (validate.py checks them first)."""
  if not data_cfg.tile_size:
    return None
  return Tiling(tile=int(data_cfg.tile_size),
                # S, or a square (S, S): validated.
                side=geometry.model_hw(data_cfg)[0],
                overlap=float(data_cfg.tile_overlap),
                sampling=data_cfg.tile_sampling)


def working_hw(image_hw, tiling: Tiling) -> tuple[int, int]:
  """(h, w) of an image of `image_hw` scaled by S / T."""
  scale = tiling.side / tiling.tile
  return tuple(max(1, round(n * scale)) for n in image_hw)


def to_working(image: np.ndarray, tiling: Tiling) -> np.ndarray:
  """uint8 [h0, w0, 3] at the working resolution (the same Pillow bilinear
  resize as every other layout; none when T = S)."""
  return decode.resize_image(image, working_hw(image.shape[:2], tiling))


def mask_to_working(mask: np.ndarray, tiling: Tiling) -> np.ndarray:
  """bool [h0, w0] at the working resolution (nearest neighbour)."""
  return decode.resize_mask(mask, working_hw(mask.shape, tiling))


def origins(length: int, side: int, overlap_px: int) -> np.ndarray:
  """Start positions of tiles of `side` covering [0, length): evenly
  spread, neighbours sharing at least `overlap_px`, the first at 0 and the
  last flush with the end. One tile at 0 when length <= side.

  The count is ceil((length - o) / (side - o)), o = overlap_px."""
  if length <= side:
    return np.zeros(1, np.int64)
  stride = side - overlap_px
  n = math.ceil((length - side) / stride) + 1
  # Rounded gaps are at most ceil((length - side) / (n - 1)) <= stride.
  return np.round(np.linspace(0, length - side, n)).astype(np.int64)


def grid(hw, tiling: Tiling) -> np.ndarray:
  """int64 [n, 2]: (y, x) origins of the inference tiles of a working-
  resolution image of `hw`, row by row."""
  ys = origins(hw[0], tiling.side, tiling.overlap_px)
  xs = origins(hw[1], tiling.side, tiling.overlap_px)
  return np.stack(np.meshgrid(ys, xs, indexing='ij'), -1).reshape(-1, 2)


def count(hw, tiling: Tiling) -> int:
  """Tiles (forward passes) per working-resolution image of `hw`."""
  return (len(origins(hw[0], tiling.side, tiling.overlap_px)) *
          len(origins(hw[1], tiling.side, tiling.overlap_px)))


def random_origin(hw, side: int, u) -> tuple[int, int]:
  """A tile origin from two uniform draws `u` in [0, 1): every position
  that keeps the tile inside the image equally likely (0 along a side
  shorter than the tile)."""
  return tuple(min(int(v * (max(n - side, 0) + 1)), max(n - side, 0))
               for n, v in zip(hw, u))


def cut(image: np.ndarray, origin, side: int
        ) -> tuple[np.ndarray, tuple[int, int]]:
  """(the side x side tile of `image` at `origin`, edge-padded where the
  image ends, and its valid extent (h, w))."""
  y, x = (int(v) for v in origin)
  part = image[y:y + side, x:x + side]
  ext = part.shape[:2]
  if ext != (side, side):
    pad = ((0, side - ext[0]), (0, side - ext[1])) + ((0, 0),) * (
        image.ndim - 2)
    part = np.pad(part, pad, mode='edge')
  return part, ext


def _ramp(start: int, size: int, length: int) -> np.ndarray:
  """1-D blending weights of a tile's valid span [start, start + size) of
  [0, length): distance (+1) to its nearest border that lies inside the
  image, `size` where neither does."""
  d = np.arange(size)
  w = np.full(size, size, np.int64)
  if start > 0:
    w = np.minimum(w, d + 1)
  if start + size < length:
    w = np.minimum(w, size - d)
  return w


def window(origin, ext, hw) -> np.ndarray:
  """int64 [h, w] blending weights (>= 1) of a tile's valid region."""
  return np.minimum.outer(_ramp(int(origin[0]), ext[0], hw[0]),
                          _ramp(int(origin[1]), ext[1], hw[1]))


class Canvas:
  """Accumulates tile maps into one map of `hw` (weighted mean)."""

  def __init__(self, hw):
    self.hw = tuple(int(n) for n in hw)
    self._sum = np.zeros(self.hw, np.float64)
    self._weight = np.zeros(self.hw, np.int64)

  def add(self, part: np.ndarray, origin) -> None:
    """`part`: a tile map's valid region [h, w] placed at `origin`."""
    y, x = (int(v) for v in origin)
    h, w = part.shape
    weight = window(origin, (h, w), self.hw)
    self._sum[y:y + h, x:x + w] += weight * np.asarray(part, np.float64)
    self._weight[y:y + h, x:x + w] += weight

  def result(self) -> np.ndarray:
    if not self._weight.all():
      raise ValueError('tiles do not cover the whole map')
    return (self._sum / self._weight).astype(np.float32)


def stitch(parts, tile_origins, hw) -> np.ndarray:
  """One float32 [h, w] map from tile maps' valid regions and origins."""
  canvas = Canvas(hw)
  for part, origin in zip(parts, tile_origins):
    canvas.add(part, origin)
  return canvas.result()


class Piece(NamedTuple):
  """Where a batch row's tile comes from: the image's number in the
  stream, the tile's origin and its valid extent (working pixels)."""
  image: int
  origin: tuple[int, int]
  extent: tuple[int, int]


def tile_stream(images: Iterable[np.ndarray], tiling: Tiling
                ) -> Iterator[tuple[int, tuple[int, int], Optional[tuple],
                                    Optional[np.ndarray]]]:
  """Per image (n, hw) once, then per tile (n, hw, Piece, tile)."""
  for n, image in enumerate(images):
    hw = image.shape[:2]
    yield n, hw, None, None
    for origin in grid(hw, tiling):
      tile, ext = cut(image, origin, tiling.side)
      yield n, hw, Piece(n, tuple(int(v) for v in origin), ext), tile


def stitch_stream(images: Iterable[np.ndarray],
                  predict_tiles: Callable[[np.ndarray, list], np.ndarray],
                  tiling: Tiling, batch_size: int
                  ) -> Iterator[tuple[int, np.ndarray]]:
  """Yields (n, float32 [h, w] stitched map) for each working-resolution
  image of `images`, in order.

  Tiles of consecutive images share batches of exactly `batch_size` rows
  (the last one zero-padded), so the model compiles once.
  `predict_tiles(tiles uint8 [batch_size, S, S, 3], pieces)` returns maps
  [batch_size, S, S]; `pieces` (a list of Piece) describes the real rows,
  which come first. Images are read lazily: a few at a time are held."""
  side = tiling.side
  canvases, left = {}, {}
  # A fresh batch each time: the callable may hold on to its input.
  new_batch = lambda: np.zeros((batch_size, side, side, 3), np.uint8)
  batch, pieces = new_batch(), []
  done = 0

  def run():
    nonlocal batch
    maps = np.asarray(predict_tiles(batch, list(pieces)))
    batch = new_batch()
    for amap, p in zip(maps, pieces):
      canvases[p.image].add(amap[:p.extent[0], :p.extent[1]], p.origin)
      left[p.image] -= 1
    pieces.clear()

  def finished():
    nonlocal done
    while done in left and not left[done]:
      del left[done]
      yield done, canvases.pop(done).result()
      done += 1

  for n, hw, piece, tile in tile_stream(images, tiling):
    if piece is None:
      canvases[n], left[n] = Canvas(hw), count(hw, tiling)
      continue
    batch[len(pieces)] = tile
    pieces.append(piece)
    if len(pieces) == batch_size:
      run()
      yield from finished()
  if pieces:
    run()
  yield from finished()
