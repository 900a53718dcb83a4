"""The tf.data loader. TensorFlow is imported here only, when a TFDataLoader
is built (or `tensorflow_available` asks), so that the rest of the package
runs where TensorFlow is not installed."""

from __future__ import annotations

import os

import numpy as np

from rcae_jax.data import augment as augment_lib
from rcae_jax.data import loader as loader_lib
from rcae_jax.data import order as order_lib


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


class TFDataLoader(loader_lib.Loader):
  """tf.data: parallel decode (AUTOTUNE), deterministic order, prefetch.

  Decoding runs Pillow through `tf.numpy_function` in tf.data's thread pool
  (Pillow releases the GIL while decoding), so the pixels equal the
  in-memory loader's.
  """

  name = 'tfdata'

  def _setup(self):
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
        yield order_lib.host_slice(
            order_lib.batch_indices(step, batch_size, self.num_train, seed),
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
    the draws `order.tile_draws` gives the in-memory loader."""
    tf = self.tf
    local = batch_size // process_count
    side = self.tiling.side
    if self.tiling.sampling == 'grid':
      self.train_grid()  # Reads every header once, here, not in tf.data.

    def example_stream():
      step = start_step
      while True:
        idx = order_lib.host_slice(
            order_lib.batch_indices(step, batch_size, self.num_train_examples,
                                    seed), process_index, process_count)
        yield idx, order_lib.tile_draws(step, seed, local, process_index,
                                        process_count)
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
      batch['image'] = augment_lib.augment_batch(
          batch['image'], step, seed, self.augment, process_index,
          process_count)
      yield batch

  def test_batches(self, batch_size, split='test'):
    tf = self.tf
    examples = self.examples[split]
    order = order_lib.padded_test_order(len(examples), batch_size)
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
