"""Batches for training and evaluation, from tf.data or from memory.

Both loaders serve exactly the same examples in the same order:
- the order is a pure function of (seed, step) (`batch_indices`), so a run
  resumed at step s sees the batches an uninterrupted run would have seen;
- both decode with the same Pillow code (`datasets.decode`).

Training batches: {'image': uint8 [B, H, W, 3]}, (H, W) the model size
(`data.image_size`, laid out per `data.resize`: geometry.py). Images travel
as uint8 (a quarter of the bytes of float32) and are scaled to [0, 1] on
the device. Test batches: {'image', 'mask' (uint8 {0,1} [B, H, W]),
'label', 'valid', 'extent' (int32 [B, 2]: each image's valid region)}; the
last batch is padded and 'valid' marks the real examples.

Training augmentation (`data.augment`, off by default): flips and 90-degree
rotations applied on the host in numpy by `augment_batch`, the same function
in both loaders, drawn from (seed, step, position in the global batch), so
both loaders, any process count and resumed runs see the same transforms.

Tiling (`data.tile_size`, tiling.py): a training example is one S x S tile
of an image at the working resolution, cut on the host in numpy by
`Loader.train_tile` in both loaders, at a position drawn like the
augmentation (`tile_draws`) or from the inference grid. Tiled evaluation
reads whole images at the working resolution (`Loader.tiled_examples`, the
same Pillow code for both loaders); tiling.stitch_stream batches their
tiles.

TensorFlow is imported only inside the tf.data loader, so everything else
runs where TensorFlow is not installed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
from typing import Iterator

import numpy as np

from rcae_jax.common import fileio
from rcae_jax.data import decode, folder, synthetic
from rcae_jax.data import geometry
from rcae_jax.data import tiling as tiling_lib


def resolve_files(data_cfg, seed: int = 0) -> folder.CategoryFiles:
  """The category the config points at, generating the built-in one."""
  root = data_cfg.root
  if not root:
    root = synthetic.ensure(
        cache=data_cfg.synthetic_cache, seed=seed,
        size=data_cfg.synthetic_size, n_train=data_cfg.synthetic_train,
        n_test_good=data_cfg.synthetic_test_good,
        n_per_defect=data_cfg.synthetic_test_per_defect)
    return folder.discover(root, synthetic.CATEGORY)
  root = fileio.absolute(root)
  if data_cfg.format == 'visa':
    if fileio.is_remote(root):
      # Its split CSV names ~10k files that would be checked one by one.
      raise folder.DataError(
          f'data.format=visa reads a local copy only; {root!r} is remote. '
          'Copy it first (gcloud storage cp --recursive ...).')
    from rcae_jax.data import visa  # pylint: disable=g-import-not-at-top
    return visa.discover_visa(root, data_cfg.category,
                              data_cfg.visa_split_csv or None)
  return folder.discover(root, data_cfg.category)


def split_validation(files: folder.CategoryFiles, fraction: float, seed: int
                     ) -> tuple[folder.CategoryFiles, tuple[str, ...]]:
  """Holds out `fraction` of train/good (at least one image when > 0) for
  choosing thresholds without test labels. Deterministic from the seed."""
  n = len(files.train)
  k = min(n - 1, int(np.ceil(fraction * n))) if fraction > 0 else 0
  if k <= 0:
    return files, ()
  held = set(np.random.default_rng([seed, 7]).permutation(n)[:k].tolist())
  train = tuple(p for i, p in enumerate(files.train) if i not in held)
  val = tuple(p for i, p in enumerate(files.train) if i in held)
  return dataclasses.replace(files, train=train), val


def batch_indices(step: int, batch_size: int, num_examples: int,
                  seed: int) -> np.ndarray:
  """Training example indices of global batch `step`.

  The example stream is epoch after epoch, each a permutation drawn from
  (seed, epoch); batch s is stream[s*B:(s+1)*B], so batches may straddle
  epochs and no image is ever dropped or duplicated within an epoch.
  """
  start = step * batch_size
  out = np.empty(batch_size, np.int64)
  filled = 0
  while filled < batch_size:
    epoch, offset = divmod(start + filled, num_examples)
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    take = min(batch_size - filled, num_examples - offset)
    out[filled:filled + take] = perm[offset:offset + take]
    filled += take
  return out


def host_slice(indices: np.ndarray, process_index: int,
               process_count: int) -> np.ndarray:
  """This host's contiguous share of a global batch."""
  if len(indices) % process_count:
    raise ValueError(f'global batch {len(indices)} is not divisible by the '
                     f'process count {process_count}')
  local = len(indices) // process_count
  return indices[process_index * local:(process_index + 1) * local]


def padded_test_order(num_examples: int, batch_size: int) -> np.ndarray:
  """Test indices padded (with index 0) to whole batches; -1 never used."""
  n = -(-num_examples // batch_size) * batch_size
  order = np.arange(n)
  order[num_examples:] = 0
  return order


def tile_draws(step: int, seed: int, local: int, process_index: int = 0,
               process_count: int = 1) -> np.ndarray:
  """float64 [local, 2] in [0, 1): where this host's examples of training
  batch `step` take their random tile (tiling.random_origin). Drawn for
  the whole global batch from (seed, step) and sliced by host, like
  `augment_batch`, so both loaders, any process count and a resumed run
  cut the same tiles."""
  draws = np.random.default_rng([seed, 13, step]).random(
      (local * process_count, 2))
  return draws[process_index * local:(process_index + 1) * local]


AUGMENT_OPS = ('hflip', 'vflip', 'rot90')


def parse_augment(spec) -> tuple[str, ...]:
  """`data.augment` ('' or comma-separated AUGMENT_OPS, or a sequence of
  them) to a tuple of op names in canonical order; ValueError on others."""
  if isinstance(spec, str):
    names = [n.strip() for n in spec.split(',')]
  else:
    names = [str(n).strip() for n in (spec or ())]
  names = [n for n in names if n]
  unknown = sorted(set(names) - set(AUGMENT_OPS))
  if unknown:
    raise ValueError(f'data.augment: unknown op(s) {unknown} in {spec!r}; '
                     f"use '' or a comma-separated subset of "
                     f"{', '.join(AUGMENT_OPS)}")
  return tuple(op for op in AUGMENT_OPS if op in names)


def augment_batch(images: np.ndarray, step: int, seed: int, ops,
                  process_index: int = 0, process_count: int = 1
                  ) -> np.ndarray:
  """This host's share of training batch `step`, augmented.

  images: uint8 [B_local, H, W, C], this host's slice (`host_slice`) of the
  global batch. The choices are drawn for the whole global batch from
  (seed, step) and sliced like the images, so example j of the global
  batch gets the same transform whatever the process count, loader or
  resume point. All three choices are always drawn, so enabling one op
  never changes another's draws. Per example, in this order: horizontal
  flip (p=1/2), vertical flip (p=1/2), rotation by k*90 degrees
  (k uniform in 0..3; square images only). Pure: the input is not changed.
  """
  ops = parse_augment(ops)
  if not ops:
    return images
  local = len(images)
  total = local * process_count
  rng = np.random.default_rng([seed, 11, step])
  hflip = rng.integers(0, 2, total).astype(bool)
  vflip = rng.integers(0, 2, total).astype(bool)
  rot = rng.integers(0, 4, total)
  part = slice(process_index * local, (process_index + 1) * local)
  hflip, vflip, rot = hflip[part], vflip[part], rot[part]
  if 'rot90' in ops and images.shape[1] != images.shape[2]:
    raise ValueError(f'data.augment rot90 needs square images, got '
                     f'{images.shape[1]}x{images.shape[2]}')
  # Each pixel's channels as one opaque item: the strided copies below then
  # move whole pixels, about 2x faster than 3-byte inner loops (measured:
  # 16 x 1024^2 x 3 uint8, 180 -> 390 images/s for rot90 on 1 core).
  images = np.ascontiguousarray(images)
  pixel = np.dtype((np.void, images.shape[-1] * images.itemsize))
  src = images.view(pixel)[..., 0]  # [B, H, W]
  out = np.empty_like(images)
  dst = out.view(pixel)[..., 0]
  for j in range(local):
    img = src[j]  # Views until the one copy into dst.
    if 'hflip' in ops and hflip[j]:
      img = img[:, ::-1]
    if 'vflip' in ops and vflip[j]:
      img = img[::-1]
    if 'rot90' in ops and rot[j]:
      img = np.rot90(img, int(rot[j]))
    dst[j] = img
  return out


class Loader:
  """Shared interface; subclasses implement `train_batches` and
  `test_batches`. `image_size`: S or (H, W); `resize`: 'squash' or
  'keep_aspect' (geometry.py). `augment`: training augmentation ops
  (`parse_augment`). `tiling`: a tiling.Tiling, or None (off)."""

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
    self.augment = parse_augment(augment)  # Fails at construction.
    # Evaluation splits: 'test' and the good images thresholds are set on
    # ('val'), served through the same code path. Without a held-out split
    # the training images stand in (optimistic: the model has seen them).
    self.val_held_out = bool(val)
    self.examples = {
        'test': files.test,
        'val': tuple(folder.TestExample(p, 0, folder.GOOD, None)
                     for p in (val or files.train)),
    }

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
    (two uniforms, `tile_draws`) picks."""
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
    draws = tile_draws(step, seed, len(examples), process_index,
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

  def __init__(self, files, image_size, num_workers=4, val=(), augment='',
               resize='squash', tiling=None):
    super().__init__(files, image_size, num_workers, val, augment, resize,
                     tiling)
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
      idx = host_slice(batch_indices(step, batch_size,
                                     self.num_train_examples, seed),
                       process_index, process_count)
      if self.tiling is None:
        batch = images[idx]
      else:
        batch = self.tile_batch([images[self.train_source(k)] for k in idx],
                                idx, step, seed, process_index, process_count)
      yield {'image': augment_batch(batch, step, seed, self.augment,
                                    process_index, process_count)}
      step += 1

  def test_batches(self, batch_size, split='test'):
    images, masks = self.eval_arrays(split)
    extents = self.extents(split)
    n = len(self.examples[split])
    labels = np.array([e.label for e in self.examples[split]], np.int32)
    order = padded_test_order(n, batch_size)
    valid = np.arange(len(order)) < n
    for s in range(0, len(order), batch_size):
      idx = order[s:s + batch_size]
      yield {'image': images[idx], 'mask': masks[idx], 'label': labels[idx],
             'valid': valid[s:s + batch_size], 'extent': extents[idx]}


def import_tensorflow():
  """Imports TensorFlow quietly and keeps it off GPUs/TPUs (JAX owns them)."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  try:
    tf.config.set_visible_devices([], 'TPU')
  except (ValueError, RuntimeError):
    pass
  return tf


class TFDataLoader(Loader):
  """tf.data: parallel decode (AUTOTUNE), deterministic order, prefetch.

  Decoding runs Pillow through `tf.numpy_function` in tf.data's thread pool
  (Pillow releases the GIL while decoding), so the pixels equal the
  in-memory loader's.
  """

  name = 'tfdata'

  def __init__(self, files, image_size, num_workers=4, val=(), augment='',
               resize='squash', tiling=None):
    super().__init__(files, image_size, num_workers, val, augment, resize,
                     tiling)
    self.tf = import_tensorflow()

  def _decode_map(self, paths):
    tf = self.tf

    def load(i):
      return self.load_image(paths[int(i)])

    def fn(i):
      img = tf.numpy_function(load, [i], tf.uint8, stateful=False)
      img.set_shape(self.hw + (3,))
      return img
    return fn

  def _numpy(self, ds):
    for batch in ds.as_numpy_iterator():
      yield batch

  def train_batches(self, batch_size, seed, start_step=0, process_index=0,
                    process_count=1):
    if self.tiling is not None:
      batches = self._tile_batches(batch_size, seed, start_step,
                                   process_index, process_count)
      return self._augmented(batches, seed, start_step, process_index,
                             process_count)
    tf = self.tf
    local = batch_size // process_count

    def index_stream():
      step = start_step
      while True:
        yield host_slice(batch_indices(step, batch_size, self.num_train, seed),
                         process_index, process_count)
        step += 1

    ds = tf.data.Dataset.from_generator(
        index_stream, output_signature=tf.TensorSpec([local], tf.int64))
    ds = ds.unbatch().map(self._decode_map(self.files.train),
                          num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=True)
    ds = ds.batch(local, drop_remainder=True).map(lambda x: {'image': x})
    batches = self._numpy(ds.prefetch(tf.data.AUTOTUNE))
    if not self.augment:
      return batches
    return self._augmented(batches, seed, start_step, process_index,
                           process_count)

  def _tile_batches(self, batch_size, seed, start_step, process_index,
                    process_count):
    """Tiled training batches: each example decodes its image (at the
    working resolution) and cuts its tile in tf.data's thread pool, with
    the draws `tile_draws` gives the in-memory loader."""
    tf = self.tf
    local = batch_size // process_count
    side = self.tiling.side
    if self.tiling.sampling == 'grid':
      self.train_grid()  # Reads every header once, here, not in tf.data.

    def example_stream():
      step = start_step
      while True:
        idx = host_slice(batch_indices(step, batch_size,
                                       self.num_train_examples, seed),
                         process_index, process_count)
        yield idx, tile_draws(step, seed, local, process_index, process_count)
        step += 1

    def load(k, u):
      path = self.files.train[self.train_source(int(k))]
      return self.train_tile(self.load_working(path), int(k), u)

    def fn(k, u):
      tile = tf.numpy_function(load, [k, u], tf.uint8, stateful=False)
      tile.set_shape((side, side, 3))
      return tile

    ds = tf.data.Dataset.from_generator(
        example_stream, output_signature=(
            tf.TensorSpec([local], tf.int64),
            tf.TensorSpec([local, 2], tf.float64)))
    ds = ds.unbatch().map(fn, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=True)
    ds = ds.batch(local, drop_remainder=True).map(lambda x: {'image': x})
    return self._numpy(ds.prefetch(tf.data.AUTOTUNE))

  def _augmented(self, batches, seed, start_step, process_index,
                 process_count):
    # The pipeline is ordered (deterministic=True): the k-th batch out is
    # step start_step + k, augmented exactly as the in-memory loader does.
    for step, batch in enumerate(batches, start_step):
      batch['image'] = augment_batch(batch['image'], step, seed, self.augment,
                                     process_index, process_count)
      yield batch

  def test_batches(self, batch_size, split='test'):
    tf = self.tf
    examples = self.examples[split]
    order = padded_test_order(len(examples), batch_size)
    labels = np.array([e.label for e in examples], np.int32)

    def load_mask(i):
      return self._test_mask(int(i), split)

    def mask_fn(i):
      m = tf.numpy_function(load_mask, [i], tf.uint8, stateful=False)
      m.set_shape(self.hw)
      return m

    decode_image = self._decode_map([e.path for e in examples])
    ds = tf.data.Dataset.from_tensor_slices({
        'index': order, 'label': labels[order],
        'valid': np.arange(len(order)) < len(examples),
        'extent': self.extents(split)[order]})
    ds = ds.map(lambda d: {'image': decode_image(d['index']),
                           'mask': mask_fn(d['index']), 'label': d['label'],
                           'valid': d['valid'], 'extent': d['extent']},
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return self._numpy(ds.batch(batch_size).prefetch(tf.data.AUTOTUNE))


def tensorflow_available() -> bool:
  try:
    import_tensorflow()
    return True
  except ImportError:
    return False


def make_loader(data_cfg, files: folder.CategoryFiles, val=()) -> Loader:
  """Picks the loader named by `data_cfg.loader` ('auto' prefers tf.data).
  `val`: held-out good training images (see split_validation)."""
  choice = data_cfg.loader
  augment = data_cfg.augment
  parse_augment(augment)  # Before TensorFlow is imported.
  tiling = tiling_lib.from_config(data_cfg)
  if choice == 'auto':
    choice = 'tfdata' if tensorflow_available() else 'memory'
    logging.info('data.loader=auto: using the %s loader%s', choice,
                 '' if choice == 'tfdata' else ' (TensorFlow not importable)')
  if choice == 'tfdata':
    return TFDataLoader(files, data_cfg.image_size, data_cfg.num_workers, val,
                        augment, data_cfg.resize, tiling)
  if choice == 'memory':
    return MemoryLoader(files, data_cfg.image_size, data_cfg.num_workers, val,
                        augment, data_cfg.resize, tiling)
  raise ValueError(f"data.loader must be 'auto', 'tfdata' or 'memory', got "
                   f'{choice!r}')
