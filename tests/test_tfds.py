"""The MVTec-AD TFDS builder on a tiny fake MVTec tree."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

tfds = pytest.importorskip('tensorflow_datasets')

from conftest import write_image  # pylint: disable=g-import-not-at-top
from rcae_jax.data import folder, mvtec_tfds  # pylint: disable=g-import-not-at-top


def make_mvtec(root, category='bottle'):
  rng = np.random.default_rng(0)
  cat = os.path.join(root, category)
  for i in range(3):
    write_image(os.path.join(cat, 'train', 'good', f'{i:03d}.png'),
                rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
  for i in range(2):
    write_image(os.path.join(cat, 'test', 'good', f'{i:03d}.png'),
                rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
  # One grey defective image: stored as RGB, like the folder loaders do.
  write_image(os.path.join(cat, 'test', 'broken_large', '000.png'),
              rng.integers(0, 255, (16, 16), dtype=np.uint8))
  write_image(os.path.join(cat, 'test', 'broken_large', '001.png'),
              rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
  for i in range(2):
    mask = np.zeros((16, 16), np.uint8)
    mask[i:i + 4, 2:9] = 255
    write_image(os.path.join(cat, 'ground_truth', 'broken_large',
                f'{i:03d}_mask.png'), mask)


def _read(builder, split):
  rows = list(tfds.as_numpy(
      builder.as_dataset(split=split, shuffle_files=False)))
  return sorted(rows, key=lambda r: r['file_name'])


def test_configs():
  names = [c.name for c in mvtec_tfds.MVTecAD.BUILDER_CONFIGS]
  assert len(names) == 15 and names[0] == 'bottle' and 'metal_nut' in names
  assert 'train/good' in mvtec_tfds.MVTecAD.MANUAL_DOWNLOAD_INSTRUCTIONS


def test_unknown_category(tmp_path):
  with pytest.raises(folder.DataError, match="'bottel'.*zipper"):
    mvtec_tfds.build(str(tmp_path), str(tmp_path), 'bottel')


def test_missing_manual_dir(tmp_path):
  with pytest.raises(folder.DataError, match='mvtec.com'):
    mvtec_tfds.build(str(tmp_path / 'nowhere'), str(tmp_path / 'tfds'),
                     'bottle')


def test_build_and_read(tmp_path):
  manual = str(tmp_path / 'mvtec')
  make_mvtec(manual)
  builder = mvtec_tfds.build(manual, str(tmp_path / 'tfds'), 'bottle')
  assert builder.info.splits['train'].num_examples == 3
  assert builder.info.splits['test'].num_examples == 4
  files = folder.discover(manual, 'bottle')
  cat_dir = os.path.join(manual, 'bottle')

  def pillow(path):
    return np.asarray(Image.open(path).convert('RGB'))

  train = _read(builder, 'train')
  assert [r['file_name'].decode() for r in train] == [
      'train/good/000.png', 'train/good/001.png', 'train/good/002.png']
  for row, path in zip(train, sorted(files.train)):
    assert row['label'] == 0 and row['defect_type'] == b'good'
    assert row['image'].dtype == np.uint8 and row['image'].shape == (16, 16, 3)
    np.testing.assert_array_equal(row['image'], pillow(path))
    assert row['mask'].shape == (16, 16, 1) and not row['mask'].any()

  test = _read(builder, 'test')
  expected = sorted(files.test,
                    key=lambda e: os.path.relpath(e.path, cat_dir))
  assert [r['file_name'].decode() for r in test] == [
      'test/broken_large/000.png', 'test/broken_large/001.png',
      'test/good/000.png', 'test/good/001.png']
  for row, ex in zip(test, expected):
    assert row['label'] == ex.label
    assert row['defect_type'].decode() == ex.defect_type
    np.testing.assert_array_equal(row['image'], pillow(ex.path))
    if ex.mask_path is None:
      assert not row['mask'].any()
    else:
      want = np.asarray(Image.open(ex.mask_path))[..., None]
      np.testing.assert_array_equal(row['mask'], want)
      assert set(np.unique(row['mask'])) == {0, 255}
  # Same pixels as the module's own decode, which the folder loaders share.
  image, mask = mvtec_tfds.decode_example(expected[0])
  np.testing.assert_array_equal(test[0]['image'], image)
  np.testing.assert_array_equal(test[0]['mask'], mask)

  # Prepared once: a second build reuses the files.
  again = mvtec_tfds.build(manual, str(tmp_path / 'tfds'), 'bottle')
  assert again.info.splits['test'].num_examples == 4
