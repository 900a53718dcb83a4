"""validate_category on tiny MVTec-layout trees with planted problems."""

import logging
import os

import numpy as np
import pytest

from conftest import write_image
from rcae_jax.data import check, folder


def make_tree(root, n_train=3, grey=False):
  """A clean category 'cat': train/good, test/good, test/crack + masks."""
  rng = np.random.default_rng(0)
  cat = os.path.join(root, 'cat')
  shape = (16, 16) if grey else (16, 16, 3)
  for i in range(n_train):
    write_image(os.path.join(cat, 'train', 'good', f'{i:03d}.png'),
                rng.integers(0, 255, shape, dtype=np.uint8))
  write_image(os.path.join(cat, 'test', 'good', '000.jpg'),
              rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
  for i in range(2):
    write_image(os.path.join(cat, 'test', 'crack', f'{i:03d}.png'),
                rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    mask = np.zeros((16, 16), np.uint8)
    mask[3:6, 4:9] = 255
    write_image(os.path.join(cat, 'ground_truth', 'crack', f'{i:03d}_mask.png'),
                mask)
  return cat


def _validate(root, **kwargs):
  return check.validate_category(folder.discover(root, 'cat'), **kwargs)


def test_clean_tree(tmp_path):
  make_tree(str(tmp_path))
  report = _validate(str(tmp_path), workers=2)
  assert report.num_images == 6 and report.num_masks == 2
  assert report.empty_masks == 0 and report.ignored == 0
  assert report.grey == 0 and report.sixteen_bit == 0
  assert report.warnings == []


def test_truncated_png(tmp_path):
  cat = make_tree(str(tmp_path))
  path = os.path.join(cat, 'train', 'good', '001.png')
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(folder.DataError) as e:
    _validate(str(tmp_path))
  msg = str(e.value)
  assert msg.startswith("1 unusable file(s) in category 'cat'")
  assert f'{path}: truncated' in msg


def test_truncated_jpeg(tmp_path):
  cat = make_tree(str(tmp_path))
  path = os.path.join(cat, 'test', 'good', '000.jpg')
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) - 40])
  with pytest.raises(folder.DataError, match='1 unusable') as e:
    _validate(str(tmp_path))
  assert f'{path}: truncated' in str(e.value)


def test_text_file_named_png(tmp_path):
  cat = make_tree(str(tmp_path))
  path = os.path.join(cat, 'test', 'crack', '001.png')
  with open(path, 'w') as f:
    f.write('this is not a picture\n')
  with pytest.raises(folder.DataError) as e:
    _validate(str(tmp_path))
  assert f'{path}: not an image Pillow can identify' in str(e.value)


def test_mask_wrong_size(tmp_path):
  cat = make_tree(str(tmp_path))
  mask = os.path.join(cat, 'ground_truth', 'crack', '000_mask.png')
  write_image(mask, np.full((8, 10), 255, np.uint8))
  with pytest.raises(folder.DataError) as e:
    _validate(str(tmp_path))
  assert f'{mask}: mask is 10x8 but its image' in str(e.value)
  assert '16x16 (W x H)' in str(e.value)


def test_corrupt_mask(tmp_path):
  cat = make_tree(str(tmp_path))
  mask = os.path.join(cat, 'ground_truth', 'crack', '001_mask.png')
  with open(mask, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' + b'\0' * 10)
  with pytest.raises(folder.DataError, match=f'{mask}: mask: '):
    _validate(str(tmp_path))


def test_many_errors_listed_up_to_ten(tmp_path):
  cat = make_tree(str(tmp_path), n_train=14)
  for i in range(13):
    with open(os.path.join(cat, 'train', 'good', f'{i:03d}.png'), 'w') as f:
      f.write('x')
  with pytest.raises(folder.DataError) as e:
    _validate(str(tmp_path))
  msg = str(e.value)
  assert msg.startswith('13 unusable file(s)')
  assert msg.count('not an image Pillow') == 10
  assert '... and 3 more' in msg


def test_warnings_empty_mask_and_stray_file(tmp_path, caplog):
  cat = make_tree(str(tmp_path))
  mask = os.path.join(cat, 'ground_truth', 'crack', '001_mask.png')
  write_image(mask, np.zeros((16, 16), np.uint8))
  readme = os.path.join(cat, 'train', 'good', 'README.txt')
  with open(readme, 'w') as f:
    f.write('notes')
  with caplog.at_level(logging.WARNING):
    report = _validate(str(tmp_path))
  assert report.empty_masks == 1 and report.empty_mask_examples == [mask]
  assert report.ignored == 1 and report.ignored_examples == [readme]
  assert len(report.warnings) == 2
  assert '1 defective test image(s) have a mask with no foreground' in (
      caplog.text)
  assert '1 non-image file(s) ignored' in caplog.text and readme in (
      caplog.text)


def test_empty_mask_of_good_image_is_fine(tmp_path):
  cat = make_tree(str(tmp_path))
  # A mask of value 1 (VisA style) counts as foreground.
  write_image(os.path.join(cat, 'ground_truth', 'crack', '000_mask.png'),
              np.pad(np.ones((2, 2), np.uint8), 7))
  report = _validate(str(tmp_path))
  assert report.empty_masks == 0


def test_grey_and_16_bit_counted(tmp_path, caplog):
  cat = make_tree(str(tmp_path), grey=True)
  path16 = os.path.join(cat, 'test', 'good', '001.png')
  write_image(path16, (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257))
  with caplog.at_level(logging.INFO):
    report = _validate(str(tmp_path))
  assert report.grey == 4 and report.sixteen_bit == 1
  assert report.sixteen_bit_examples == [path16]
  assert report.warnings == []
  assert '4 grey and 1 16-bit image(s) of 7' in caplog.text
