"""The loader interface and the in-memory loader.

`Loader` holds what every loader shares: the splits (test, and the good
images thresholds are chosen on), the layout at the model size
(geometry.py), tiled training and evaluation (tiling.py) read with the same
Pillow code. Subclasses serve `train_batches` and `test_batches`; the
in-memory loader here, the tf.data one in tfdata_loader.py.

Training batches: {'image': uint8 [B, H, W, 3]}, (H, W) the model size
(`data.image_size`, laid out per `data.resize`). Images travel as uint8 (a
quarter of the bytes of float32) and are scaled to [0, 1] on the device.
Test batches: {'image', 'mask' (uint8 {0,1} [B, H, W]), 'label', 'valid',
'extent' (int32 [B, 2]: each image's valid region)}; the last batch is
padded and 'valid' marks the real examples.

Tiling (`data.tile_size`): a training example is one S x S tile of an image
at the working resolution, cut on the host in numpy by `Loader.train_tile`
in every loader, at a position drawn like the augmentation
(`order.tile_draws`) or from the inference grid. Tiled evaluation reads
whole images at the working resolution (`Loader.tiled_examples`);
tiling.stitch_stream batches their tiles.
"""

from __future__ import annotations

import concurrent.futures
from typing import Iterator

import numpy as np

from rcae_jax.data import augment as augment_lib
from rcae_jax.data import decode, folder
from rcae_jax.data import geometry
from rcae_jax.data import order as order_lib
from rcae_jax.data import tiling as tiling_lib


class Loader:
  """Shared interface; subclasses implement `train_batches` and
  `test_batches`. `image_size`: S or (H, W); `resize`: 'squash' or
  'keep_aspect' (geometry.py). `augment`: training augmentation ops
  (augment.parse_augment). `tiling`: a tiling.Tiling, or None (off).
  Every loader takes these arguments: subclasses add their own state in
  `_setup`, not in an `__init__` of their own."""

  name = 'base'

  def __init__(self, files: folder.CategoryFiles, image_size,
               num_workers: int = 4, val: tuple[str, ...] = (),
               augment='', resize: str = 'squash',
               tiling: tiling_lib.Tiling | None = None):
    self.files = files
    self.image_size = image_size
    self.hw = geometry.as_hw(image_size)
    self.resize = resize
    self.tiling = tiling
    self._extents = {}
    self._grid = None
    self.num_workers = num_workers
    # Fails at construction, before a subclass imports anything.
    self.augment = augment_lib.parse_augment(augment)
    # Evaluation splits: 'test' and the good images thresholds are set on
    # ('val'), served through the same code path. Without a held-out split
    # the training images stand in (optimistic: the model has seen them).
    self.val_held_out = bool(val)
    self.examples = {
        'test': files.test,
        'val': tuple(folder.TestExample(p, 0, folder.GOOD, None)
                     for p in (val or files.train)),
    }
    self._setup()

  def _setup(self) -> None:
    """A subclass's own state (caches, TensorFlow), after the shared."""

  @property
  def num_train(self) -> int:
    return len(self.files.train)

  @property
  def num_train_examples(self) -> int:
    """Length of an epoch: images, or every grid tile of every image
    (data.tile_sampling='grid')."""
    if self.tiling is not None and self.tiling.sampling == 'grid':
      return len(self.train_grid())
    return self.num_train

  def train_grid(self) -> list[tuple[int, tuple[int, int]]]:
    """(image index, tile origin) of every inference-grid tile of every
    training image (the sizes come from the files' headers)."""
    if self._grid is None:
      self._grid = [
          (i, tuple(int(v) for v in origin))
          for i, path in enumerate(self.files.train)
          for origin in tiling_lib.grid(
              tiling_lib.working_hw(decode.image_shape(path), self.tiling),
              self.tiling)]
    return self._grid

  def train_source(self, example: int) -> int:
    """The training image that example `example` of the stream is cut
    from."""
    if self.tiling is not None and self.tiling.sampling == 'grid':
      return self.train_grid()[example][0]
    return int(example)

  def train_tile(self, image: np.ndarray, example: int, draw) -> np.ndarray:
    """The S x S training tile of example `example` from its image at the
    working resolution: at its grid origin, or at the position `draw`
    (two uniforms, `order.tile_draws`) picks."""
    side = self.tiling.side
    if self.tiling.sampling == 'grid':
      origin = self.train_grid()[example][1]
    else:
      origin = tiling_lib.random_origin(image.shape[:2], side, draw)
    return tiling_lib.cut(image, origin, side)[0]

  def load_working(self, path: str) -> np.ndarray:
    """One image at the tiling's working resolution."""
    return tiling_lib.to_working(decode.load_image(path, None), self.tiling)

  def tiled_examples(self, split: str = 'test'
                     ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(image uint8 [h, w, 3], mask bool [h, w], label) of each example of
    `split` at the working resolution, in order; the next few are decoded
    on `num_workers` threads meanwhile. The same Pillow code for every
    loader, so their tiled maps agree."""
    examples = self.examples[split]

    def load(i):
      ex = examples[i]
      image = decode.load_image(ex.path, None)
      mask = decode.load_mask(ex.mask_path, image.shape[:2])
      return (tiling_lib.to_working(image, self.tiling),
              tiling_lib.mask_to_working(mask, self.tiling), ex.label)

    workers = max(1, self.num_workers)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      ahead = [pool.submit(load, i) for i in range(min(workers,
                                                       len(examples)))]
      for i in range(len(examples)):
        item = ahead.pop(0).result()
        if i + workers < len(examples):
          ahead.append(pool.submit(load, i + workers))
        yield item

  @property
  def num_test(self) -> int:
    return len(self.files.test)

  def load_image(self, path: str) -> np.ndarray:
    """One image as the model input uint8 [H, W, 3]."""
    return geometry.load_image(path, self.hw, self.resize)

  def tile_batch(self, images, examples, step: int, seed: int,
                 process_index: int, process_count: int) -> np.ndarray:
    """uint8 [B_local, S, S, 3]: each example's tile, from its image at
    the working resolution (`images[j]` for `examples[j]`)."""
    draws = order_lib.tile_draws(step, seed, len(examples), process_index,
                                 process_count)
    return np.stack([self.train_tile(image, int(k), u)
                     for image, k, u in zip(images, examples, draws)])

  def _test_mask(self, i: int, split: str = 'test') -> np.ndarray:
    ex = self.examples[split][i]
    shape = decode.image_shape(ex.path)
    mask = decode.load_mask(ex.mask_path, shape)
    return geometry.layout_mask(mask, self.hw, self.resize).astype(np.uint8)

  def extents(self, split: str = 'test') -> np.ndarray:
    """int32 [n, 2]: each example's valid region at the model size (all
    of it when squashed; then no file is opened), or, tiled, its size at
    the working resolution (its stitched map's size)."""
    if split not in self._extents:
      examples = self.examples[split]
      if self.tiling is not None:
        ext = np.asarray([tiling_lib.working_hw(decode.image_shape(e.path),
                                                self.tiling)
                          for e in examples], np.int32).reshape(-1, 2)
      elif self.resize == 'squash':
        ext = np.tile(np.asarray(self.hw, np.int32), (len(examples), 1))
      else:
        ext = np.asarray([geometry.extent(decode.image_shape(e.path), self.hw,
                                          self.resize) for e in examples],
                         np.int32).reshape(-1, 2)
      self._extents[split] = ext
    return self._extents[split]

  def eval_image(self, i: int, split: str = 'test') -> np.ndarray:
    """One evaluation image at the model size, or, tiled, at the working
    resolution (for pictures)."""
    path = self.examples[split][i].path
    if self.tiling is not None:
      return self.load_working(path)
    return self.load_image(path)

  def full_masks(self) -> list[np.ndarray]:
    """Ground-truth masks at their original resolution, in test order."""
    out = []
    for ex in self.files.test:
      out.append(decode.load_mask(ex.mask_path, decode.image_shape(ex.path)))
    return out

  def train_batches(self, batch_size: int, seed: int, start_step: int = 0,
                    process_index: int = 0, process_count: int = 1
                    ) -> Iterator[dict]:
    raise NotImplementedError

  def test_batches(self, batch_size: int, split: str = 'test'
                   ) -> Iterator[dict]:
    raise NotImplementedError


class MemoryLoader(Loader):
  """Decodes the whole category once with Pillow into uint8 arrays.

  MVTec-AD / VisA categories are a few hundred images: at 256 px that is
  tens of MB, so holding them is cheaper than decoding every epoch.
  """

  name = 'memory'

  def _setup(self):
    self._train = None
    self._eval = {}

  def _decode_all(self, fn, items):
    with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
      return np.stack(list(pool.map(fn, items)))

  def train_images(self):
    """uint8 [n, H, W, 3] at the model size, or, tiled, a list of the
    images at the working resolution (their sizes may differ)."""
    if self._train is None:
      if self.tiling is not None:
        with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
          self._train = list(pool.map(self.load_working, self.files.train))
      else:
        self._train = self._decode_all(self.load_image, self.files.train)
    return self._train

  def eval_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in self._eval:
      examples = self.examples[split]
      images = self._decode_all(lambda e: self.load_image(e.path), examples)
      masks = self._decode_all(lambda i: self._test_mask(i, split),
                               range(len(examples)))
      self._eval[split] = images, masks
    return self._eval[split]

  def train_batches(self, batch_size, seed, start_step=0, process_index=0,
                    process_count=1):
    images = self.train_images()
    step = start_step
    while True:
      idx = order_lib.host_slice(
          order_lib.batch_indices(step, batch_size, self.num_train_examples,
                                  seed), process_index, process_count)
      if self.tiling is None:
        batch = images[idx]
      else:
        batch = self.tile_batch([images[self.train_source(k)] for k in idx],
                                idx, step, seed, process_index, process_count)
      yield {'image': augment_lib.augment_batch(
          batch, step, seed, self.augment, process_index, process_count)}
      step += 1

  def test_batches(self, batch_size, split='test'):
    images, masks = self.eval_arrays(split)
    extents = self.extents(split)
    n = len(self.examples[split])
    labels = np.array([e.label for e in self.examples[split]], np.int32)
    order = order_lib.padded_test_order(n, batch_size)
    valid = np.arange(len(order)) < n
    for s in range(0, len(order), batch_size):
      idx = order[s:s + batch_size]
      yield {'image': images[idx], 'mask': masks[idx], 'label': labels[idx],
             'valid': valid[s:s + batch_size], 'extent': extents[idx]}
