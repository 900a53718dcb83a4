"""Built-in category, folder discovery, decoding and both loaders."""

import os

import numpy as np
import pytest
from PIL import Image

from conftest import write_image
from rcae_jax.data import decode, folder, synthetic
from rcae_jax.data import augment as augment_lib
from rcae_jax.data import input_pipeline
from rcae_jax.data import loader as loader_lib
from rcae_jax.data import order as order_lib
from rcae_jax.data import tfdata_loader


@pytest.fixture(scope='module')
def category(tmp_path_factory):
  root = synthetic.ensure(str(tmp_path_factory.mktemp('syn')), seed=3,
                          size=32, n_train=6, n_test_good=3, n_per_defect=2)
  return folder.discover(root, synthetic.CATEGORY)


def test_synthetic_layout_and_counts(category):
  assert len(category.train) == 6
  labels = [e.label for e in category.test]
  assert labels.count(0) == 3 and labels.count(1) == 2 * len(synthetic.DEFECTS)
  assert category.has_masks
  kinds = {e.defect_type for e in category.test if e.label}
  assert kinds == set(synthetic.DEFECTS) and len(kinds) >= 3


def test_synthetic_is_deterministic_and_cached(tmp_path):
  a = synthetic.ensure(str(tmp_path / 'a'), seed=1, size=32, n_train=2,
                       n_test_good=1, n_per_defect=1)
  b = synthetic.ensure(str(tmp_path / 'b'), seed=1, size=32, n_train=2,
                       n_test_good=1, n_per_defect=1)
  for rel in ('synthetic/train/good/001.png', 'synthetic/test/crack/000.png'):
    np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(a, rel))),
                                  np.asarray(Image.open(os.path.join(b, rel))))
  mtime = os.path.getmtime(a)
  assert synthetic.ensure(str(tmp_path / 'a'), seed=1, size=32, n_train=2,
                          n_test_good=1, n_per_defect=1) == a
  assert os.path.getmtime(a) == mtime  # Not regenerated.


@pytest.mark.parametrize('kind', synthetic.DEFECTS)
def test_defect_masks_are_exact(kind):
  rng = np.random.default_rng(0)
  img = synthetic.texture(rng, 64)
  out, mask = synthetic.add_defect(rng, img, kind)
  changed = np.any(np.abs(out - img) > 1 / 255, axis=-1)
  assert mask.any()
  np.testing.assert_array_equal(mask, changed)


def test_texture_is_not_flat():
  img = synthetic.texture(np.random.default_rng(0), 64)
  assert img.std() > 0.05


def test_missing_root_names_the_path(tmp_path):
  with pytest.raises(folder.DataError, match='does not exist'):
    folder.discover(str(tmp_path / 'nope'), 'x')


def test_unknown_category_lists_what_exists(tmp_path):
  (tmp_path / 'bottle').mkdir()
  with pytest.raises(folder.DataError, match="'cable' not found.*bottle"):
    folder.discover(str(tmp_path), 'cable')


def test_category_without_train_good(tmp_path):
  (tmp_path / 'cat' / 'test' / 'good').mkdir(parents=True)
  with pytest.raises(folder.DataError, match='train/good'):
    folder.discover(str(tmp_path), 'cat')


def test_empty_train_good(tmp_path):
  (tmp_path / 'cat' / 'train' / 'good').mkdir(parents=True)
  with pytest.raises(folder.DataError, match='holds no images'):
    folder.discover(str(tmp_path), 'cat')


def test_mixed_extensions_grey_and_missing_mask(tmp_path):
  grey = np.full((20, 30), 128, np.uint8)
  write_image(str(tmp_path / 'c/train/good/a.JPG'), grey)
  write_image(str(tmp_path / 'c/train/good/b.png'),
              np.zeros((20, 30, 4), np.uint8))
  (tmp_path / 'c/train/good/notes.txt').write_text('x')
  write_image(str(tmp_path / 'c/test/good/g.png'), grey)
  write_image(str(tmp_path / 'c/test/bad/d1.png'), grey)
  write_image(str(tmp_path / 'c/test/bad/d2.png'), grey)
  write_image(str(tmp_path / 'c/ground_truth/bad/d1_mask.png'), grey)
  with pytest.raises(folder.DataError, match='have no mask.*d2.png'):
    folder.discover(str(tmp_path), 'c')
  write_image(str(tmp_path / 'c/ground_truth/bad/d2_mask.png'), grey)
  files = folder.discover(str(tmp_path), 'c')
  assert len(files.train) == 2 and files.ignored[0].endswith('notes.txt')
  # Grey and RGBA both come out as RGB at the model size.
  assert decode.load_image(files.train[0], 16).shape == (16, 16, 3)
  assert decode.load_image(files.train[1], 16).shape == (16, 16, 3)


def test_corrupt_image_and_mismatched_mask(tmp_path):
  bad = tmp_path / 'broken.png'
  bad.write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 20)
  with pytest.raises(folder.DataError, match='broken.png'):
    decode.load_image(str(bad), 16)
  mask = tmp_path / 'm.png'
  write_image(str(mask), np.zeros((10, 10), np.uint8))
  with pytest.raises(folder.DataError, match='10x10 but its image is 30x20'):
    decode.load_mask(str(mask), (20, 30))


def test_sixteen_bit_images(tmp_path):
  arr = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 256)
  path = tmp_path / 'sixteen.png'
  Image.fromarray(arr).save(path)
  img = decode.load_image(str(path), 16)
  assert img.dtype == np.uint8 and img.max() > 200 and img.min() == 0


def test_batch_indices_cover_each_epoch_once():
  n, b = 10, 4
  stream = np.concatenate([order_lib.batch_indices(s, b, n, seed=0)
                           for s in range(5)])  # 20 examples = 2 epochs.
  assert sorted(stream[:10]) == list(range(10))
  assert sorted(stream[10:]) == list(range(10))
  # Resuming at step 3 yields what step 3 was in the straight run.
  np.testing.assert_array_equal(order_lib.batch_indices(3, b, n, 0),
                                stream[12:16])


@pytest.mark.parametrize('processes', [1, 2, 3])
def test_host_slices_partition_the_batch(processes):
  idx = order_lib.batch_indices(0, 6, 20, seed=1)
  parts = [order_lib.host_slice(idx, p, processes)
           for p in range(processes)]
  np.testing.assert_array_equal(np.concatenate(parts), idx)


def test_loaders_yield_identical_batches(category):
  memory = loader_lib.MemoryLoader(category, 16)
  tfdata = tfdata_loader.TFDataLoader(category, 16)
  m_it = memory.train_batches(4, seed=5, start_step=2)
  t_it = tfdata.train_batches(4, seed=5, start_step=2)
  for _ in range(3):
    m, t = next(m_it), next(t_it)
    assert m['image'].dtype == np.uint8 and m['image'].shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(m['image'], t['image'])
  m_test = list(memory.test_batches(4))
  t_test = list(tfdata.test_batches(4))
  assert len(m_test) == len(t_test) == 3  # 11 test images, padded to 12.
  for m, t in zip(m_test, t_test):
    for key in ('image', 'mask', 'label', 'valid'):
      np.testing.assert_array_equal(m[key], t[key])
  valid = np.concatenate([b['valid'] for b in m_test])
  assert valid.sum() == len(category.test)


# ------------------------------------------------------------ augmentation

def test_augmentation_is_off_by_default(category):
  import default  # configs/default.py  # pylint: disable=g-import-not-at-top
  assert default.get_config().data.augment == ''
  assert augment_lib.parse_augment('') == ()
  images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
  assert augment_lib.augment_batch(images, 0, 0, '') is images
  plain = loader_lib.MemoryLoader(category, 16)
  explicit = loader_lib.MemoryLoader(category, 16, augment='')
  assert plain.augment == ()
  a = next(plain.train_batches(4, seed=5, start_step=1))['image']
  b = next(explicit.train_batches(4, seed=5, start_step=1))['image']
  idx = order_lib.batch_indices(1, 4, len(category.train), 5)
  np.testing.assert_array_equal(a, plain.train_images()[idx])
  np.testing.assert_array_equal(a, b)


def test_unknown_augment_op_names_the_field(category, make_config):
  with pytest.raises(ValueError, match=r"data\.augment.*'shear'"):
    loader_lib.MemoryLoader(category, 16, augment='hflip,shear')
  with pytest.raises(ValueError, match=r'data\.augment'):
    input_pipeline.make_loader(
        make_config(**{'data.augment': 'rot45',
                       'data.loader': 'tfdata'}).data, category)
  assert augment_lib.parse_augment(' rot90, hflip ') == ('hflip', 'rot90')


def test_augment_batch_ops_and_shapes():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (32, 8, 8, 3), dtype=np.uint8)
  before = images.copy()
  for ops in ('hflip', 'vflip', 'rot90', 'hflip,vflip,rot90'):
    out = augment_lib.augment_batch(images, 3, 1, ops)
    assert out.shape == images.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(images, before)  # Pure.
    changed = 0
    for o, i in zip(out, images):
      # Every output is one of the 8 symmetries of its input square.
      variants = [np.rot90(v, k, axes=(0, 1)) for v in (i, i[:, ::-1])
                  for k in range(4)]
      assert any(np.array_equal(o, v) for v in variants)
      changed += not np.array_equal(o, i)
    assert 0 < changed < 32  # Per-example choices, not all or nothing.
  # hflip alone only flips columns.
  out = augment_lib.augment_batch(images, 3, 1, 'hflip')
  for o, i in zip(out, images):
    assert np.array_equal(o, i) or np.array_equal(o, i[:, ::-1])
  # Deterministic in (seed, step); differs across steps.
  np.testing.assert_array_equal(
      augment_lib.augment_batch(images, 3, 1, 'hflip,vflip,rot90'),
      augment_lib.augment_batch(images, 3, 1, 'hflip,vflip,rot90'))
  assert not np.array_equal(
      augment_lib.augment_batch(images, 3, 1, 'hflip,vflip,rot90'),
      augment_lib.augment_batch(images, 4, 1, 'hflip,vflip,rot90'))
  with pytest.raises(ValueError, match='square'):
    augment_lib.augment_batch(images[:, :, :6], 0, 0, 'rot90')


@pytest.mark.parametrize('processes', [2, 4])
def test_augmentation_is_the_same_across_process_counts(processes):
  images = np.random.default_rng(1).integers(0, 256, (8, 6, 6, 3),
                                             dtype=np.uint8)
  ops = 'hflip,vflip,rot90'
  whole = augment_lib.augment_batch(images, 7, 2, ops)
  local = len(images) // processes
  parts = [augment_lib.augment_batch(images[p * local:(p + 1) * local], 7,
                                     2, ops, p, processes)
           for p in range(processes)]
  np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_loaders_yield_identical_augmented_batches(category):
  ops = 'hflip,vflip,rot90'
  memory = loader_lib.MemoryLoader(category, 16, augment=ops)
  tfdata = tfdata_loader.TFDataLoader(category, 16, augment=ops)
  plain = loader_lib.MemoryLoader(category, 16)
  m_it = memory.train_batches(4, seed=5, start_step=2)
  t_it = tfdata.train_batches(4, seed=5, start_step=2)
  p_it = plain.train_batches(4, seed=5, start_step=2)
  differs = False
  for step in range(2, 5):
    m, t, p = next(m_it), next(t_it), next(p_it)
    assert m['image'].shape == (4, 16, 16, 3) and m['image'].dtype == np.uint8
    np.testing.assert_array_equal(m['image'], t['image'])
    np.testing.assert_array_equal(
        m['image'], augment_lib.augment_batch(p['image'], step, 5, ops))
    differs |= not np.array_equal(m['image'], p['image'])
  assert differs
  # A resumed run (start_step=3) sees what the straight run saw at step 3.
  resumed = next(memory.train_batches(4, seed=5, start_step=3))['image']
  straight = memory.train_batches(4, seed=5, start_step=2)
  next(straight)
  np.testing.assert_array_equal(resumed, next(straight)['image'])
  # Test batches are never augmented.
  for a, b in zip(memory.test_batches(4), plain.test_batches(4)):
    np.testing.assert_array_equal(a['image'], b['image'])
