"""The bad-input table of docs/reliability.md, one case per test id.

Every case goes through `run.prepare`, which runs before anything is
compiled or trained: a bad file ends there in one line that names it and
its problem, or it is handled (decoded, or warned about and used).
"""

import builtins
import errno
import logging
import os
import struct
import zlib

import numpy as np
from PIL import Image
import pytest

from conftest import tiny_config
from conftest import write_image
from rcae_jax import run as run_lib
from rcae_jax import validate
from rcae_jax.data import decode
from rcae_jax.data import folder
from rcae_jax.evaluation import evaluate
from rcae_jax.evaluation import maps as maps_lib

SIZE = 32  # configs/smoke.py's image_size.


def rgb(seed, size=SIZE):
  return np.random.default_rng(seed).integers(0, 255, (size, size, 3),
                                              dtype=np.uint8)


def make_tree(root):
  """A clean category `cat` at the model size: 4 train, 1 good test,
  2 crack with masks."""
  cat = os.path.join(root, 'cat')
  for i in range(4):
    write_image(os.path.join(cat, 'train', 'good', f'{i:03d}.png'), rgb(i))
  write_image(os.path.join(cat, 'test', 'good', '000.png'), rgb(10))
  for i in range(2):
    write_image(os.path.join(cat, 'test', 'crack', f'{i:03d}.png'), rgb(20 + i))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:9, 5:12] = 255
    write_image(os.path.join(cat, 'ground_truth', 'crack', f'{i:03d}_mask.png'),
                mask)
  return cat


def prepare(root, tmp_path):
  config = tiny_config(**{'data.root': str(root), 'data.category': 'cat'})
  return run_lib.prepare(config, str(tmp_path / 'wd'))


def bomb_png(width, height) -> bytes:
  """A PNG header claiming width x height pixels (no pixel data)."""
  def chunk(kind, data):
    return (struct.pack('>I', len(data)) + kind + data +
            struct.pack('>I', zlib.crc32(kind + data)))
  ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) +
          chunk(b'IEND', b''))


# --------------------------------------------------- cases that must stop


def zero_byte(cat, monkeypatch):
  del monkeypatch
  path = os.path.join(cat, 'train', 'good', '001.png')
  open(path, 'wb').close()
  return path, 'empty file (0 bytes)'


def truncated(cat, monkeypatch):
  del monkeypatch
  path = os.path.join(cat, 'test', 'crack', '000.png')
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  return path, 'truncated file'


def not_an_image(cat, monkeypatch):
  del monkeypatch
  path = os.path.join(cat, 'train', 'good', '002.png')
  with open(path, 'w') as f:
    f.write('<html>a saved web page</html>')
  return path, 'not an image Pillow can identify'


def mask_wrong_size(cat, monkeypatch):
  del monkeypatch
  path = os.path.join(cat, 'ground_truth', 'crack', '001_mask.png')
  write_image(path, np.full((16, 24), 255, np.uint8))
  return path, 'mask is 24x16 but its image'


def broken_symlink(cat, monkeypatch):
  del monkeypatch
  path = os.path.join(cat, 'train', 'good', '003.png')
  os.remove(path)
  os.symlink('/nowhere/003.png', path)
  return path, "broken symbolic link to '/nowhere/003.png'"


def unreadable_file(cat, monkeypatch):
  """chmod 000; where that does not bite (root reads anything), the
  operating system's refusal is simulated at `open`."""
  path = os.path.join(cat, 'test', 'good', '000.png')
  os.chmod(path, 0)
  try:
    open(path, 'rb').close()
    readable = True
  except PermissionError:
    readable = False
  if readable:
    real = builtins.open

    def refusing(file, *args, **kwargs):
      if os.fspath(file) == path:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
      return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, 'open', refusing)
  return path, 'permission denied: this user cannot read it'


def unreadable_folder(cat, monkeypatch):
  """As above, for a folder that cannot be listed."""
  path = os.path.join(cat, 'test', 'crack')
  os.chmod(path, 0)
  try:
    os.listdir(path)
    readable = True
  except PermissionError:
    readable = False
  if readable:
    real = os.listdir

    def refusing(p='.'):
      if os.fspath(p) == path:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
      return real(p)

    monkeypatch.setattr(os, 'listdir', refusing)
  return path, 'permission denied'


def folder_named_like_an_image(cat, monkeypatch):
  del monkeypatch
  path = os.path.join(cat, 'train', 'good', 'extra.png')
  os.makedirs(path)
  return path, 'a folder with an image name, not an image file'


def too_many_pixels(cat, monkeypatch):
  del monkeypatch
  path = os.path.join(cat, 'train', 'good', '000.png')
  with open(path, 'wb') as f:
    f.write(bomb_png(30000, 30000))
  return path, 'too many pixels to decode safely'


def empty_train_folder(cat, monkeypatch):
  del monkeypatch
  folder_path = os.path.join(cat, 'train', 'good')
  for name in os.listdir(folder_path):
    os.remove(os.path.join(folder_path, name))
  return folder_path, 'holds no images'


def empty_test_folder(cat, monkeypatch):
  del monkeypatch
  import shutil  # pylint: disable=g-import-not-at-top
  test = os.path.join(cat, 'test')
  shutil.rmtree(test)
  os.makedirs(test)
  return test, 'holds no test images'


def defect_without_mask(cat, monkeypatch):
  del monkeypatch
  path = os.path.join(cat, 'test', 'crack', '002.png')
  write_image(path, rgb(30))
  return path, 'have no mask'


@pytest.mark.parametrize('plant', [
    zero_byte, truncated, not_an_image, mask_wrong_size, broken_symlink,
    unreadable_file, unreadable_folder, folder_named_like_an_image,
    too_many_pixels, empty_train_folder, empty_test_folder,
    defect_without_mask])
def test_bad_input_stops_before_training_in_one_line(plant, tmp_path,
                                                     monkeypatch):
  cat = make_tree(str(tmp_path / 'data'))
  path, problem = plant(cat, monkeypatch)
  with pytest.raises(folder.DataError) as e:
    prepare(tmp_path / 'data', tmp_path)
  monkeypatch.undo()
  message = str(e.value)
  assert '\n' not in message, message
  assert path in message and problem in message, message
  assert not (tmp_path / 'wd' / 'checkpoints').exists()


def test_config_whose_depth_does_not_divide_the_image_size():
  config = tiny_config(**{'model.depth': 6})  # 2**6 = 64 > 32 px.
  with pytest.raises(validate.ConfigError) as e:
    validate.validate(config)
  assert str(e.value) == ('config.data.image_size=32 must be divisible by 64 '
                          '(2**max(recursion levels, 4 U-Net levels))')


# ------------------------------------------------ cases that are handled


def test_image_modes_all_decode_to_rgb(tmp_path):
  """CMYK JPEG, 16-bit, palette (with transparency), RGBA, LA, grey."""
  cat = make_tree(str(tmp_path / 'data'))
  good = os.path.join(cat, 'train', 'good')
  base = rgb(40)
  Image.fromarray(base).convert('CMYK').save(os.path.join(good, 'cmyk.jpg'))
  write_image(os.path.join(good, 'sixteen.png'),
              np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE) * 60)
  palette = Image.fromarray(base).convert('P')
  palette.info['transparency'] = 0
  palette.save(os.path.join(good, 'palette.png'))
  write_image(os.path.join(good, 'rgba.png'),
              np.dstack([base, np.full((SIZE, SIZE), 7, np.uint8)]))
  write_image(os.path.join(good, 'la.png'),
              np.dstack([base[..., 0], base[..., 1]]))
  write_image(os.path.join(good, 'grey.png'), base[..., 0])
  loader = prepare(tmp_path / 'data', tmp_path)
  names = ('cmyk.jpg', 'sixteen.png', 'palette.png', 'rgba.png', 'la.png',
           'grey.png')
  for name in names:
    image = decode.load_image(os.path.join(good, name), SIZE)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8, name
  # The alpha channel is dropped, the colour kept.
  np.testing.assert_array_equal(
      decode.load_image(os.path.join(good, 'rgba.png'), SIZE), base)
  assert loader.num_train + len(loader.examples['val']) == 4 + len(names)


def test_masks_of_other_modes_and_values_are_read_as_above_zero(
    tmp_path, caplog):
  """RGB, 16-bit and palette masks; values {0, 1} (VisA) and anti-aliased
  0..255 masks: any value above 0 is defect; non-binary ones are warned."""
  cat = make_tree(str(tmp_path / 'data'))
  gt = os.path.join(cat, 'ground_truth', 'crack')
  region = np.zeros((SIZE, SIZE), bool)
  region[4:9, 5:12] = True
  rgb_mask = np.zeros((SIZE, SIZE, 3), np.uint8)
  rgb_mask[region] = (255, 0, 0)  # A red region on black.
  write_image(os.path.join(gt, '000_mask.png'), rgb_mask)
  write_image(os.path.join(gt, '001_mask.png'),
              region.astype(np.uint16) * 65535)
  for i, mask in ((2, Image.fromarray(region.astype(np.uint8)).convert('P')),
                  (3, Image.fromarray(region.astype(np.uint8)))):
    write_image(os.path.join(cat, 'test', 'crack', f'{i:03d}.png'), rgb(30 + i))
    mask.save(os.path.join(gt, f'{i:03d}_mask.png'))
  soft = np.where(region, 255, 0).astype(np.uint8)
  soft[4, 5:12] = 90  # An anti-aliased edge.
  write_image(os.path.join(cat, 'test', 'crack', '004.png'), rgb(34))
  write_image(os.path.join(gt, '004_mask.png'), soft)
  with caplog.at_level(logging.WARNING):
    prepare(tmp_path / 'data', tmp_path)
  assert '1 mask(s) hold more than one non-zero value' in caplog.text
  assert os.path.join(gt, '004_mask.png') in caplog.text
  for i in range(5):
    mask = decode.load_mask(os.path.join(gt, f'{i:03d}_mask.png'),
                            (SIZE, SIZE))
    np.testing.assert_array_equal(mask, region, err_msg=str(i))


def test_symlinked_files_and_folders_are_followed(tmp_path):
  cat = make_tree(str(tmp_path / 'data'))
  elsewhere = tmp_path / 'elsewhere'
  os.rename(os.path.join(cat, 'train', 'good'), elsewhere)
  os.symlink(elsewhere, os.path.join(cat, 'train', 'good'))
  os.symlink(elsewhere / '000.png', elsewhere / 'link.png')
  loader = prepare(tmp_path / 'data', tmp_path)
  assert loader.num_train + len(loader.examples['val']) == 5
  np.testing.assert_array_equal(
      decode.load_image(str(elsewhere / 'link.png'), SIZE), rgb(0))


def test_names_with_spaces_and_non_ascii_characters(tmp_path):
  cat = make_tree(str(tmp_path / 'data'))
  name = 'über kratzer № 1'
  write_image(os.path.join(cat, 'train', 'good', 'ä b ç.png'), rgb(50))
  write_image(os.path.join(cat, 'test', 'crack', f'{name}.png'), rgb(51))
  mask = np.zeros((SIZE, SIZE), np.uint8)
  mask[1:3, 1:3] = 255
  write_image(os.path.join(cat, 'ground_truth', 'crack', f'{name}_mask.png'),
              mask)
  loader = prepare(tmp_path / 'data', tmp_path)
  example, = [e for e in loader.files.test if name in e.path]
  assert example.mask_path.endswith(f'{name}_mask.png')
  assert decode.load_mask(example.mask_path, (SIZE, SIZE)).sum() == 4


def test_image_smaller_than_two_to_the_depth_is_upsampled(tmp_path, caplog):
  """3 x 2 px, smaller than 2**depth: resized to data.image_size like any
  other image (the size check is on the config, not on the files)."""
  cat = make_tree(str(tmp_path / 'data'))
  tiny = os.path.join(cat, 'train', 'good', 'tiny.png')
  write_image(tiny, rgb(60, size=3)[:2])
  with caplog.at_level(logging.WARNING):
    prepare(tmp_path / 'data', tmp_path)
  assert ('1 image(s) are smaller than data.image_size=32 px on a side and '
          'will be upsampled') in caplog.text and tiny in caplog.text
  assert decode.load_image(tiny, SIZE).shape == (SIZE, SIZE, 3)


def fake_predict_fn(config, nets=None, normalisers=None, mesh=None):
  """The predict function's outputs without a model: evaluate() runs in
  full (metrics, thresholds, maps, pictures) with nothing to compile."""
  del nets, normalisers, mesh

  def predict(params, images):
    del params
    x = np.asarray(images, np.float32) / 255.0
    recs = np.stack([x] * config.model.depth)
    amap = x.mean(-1)
    return {'recs': recs, 'details': recs, 'map': amap,
            'score': amap.max(axis=(1, 2))}

  return predict


@pytest.mark.parametrize('only', ['good', 'crack'])
def test_test_set_of_one_class_is_warned_and_evaluated(only, tmp_path,
                                                       monkeypatch, caplog):
  """Warned at the start; the evaluation after training leaves the
  undefined metrics out instead of failing."""
  import shutil  # pylint: disable=g-import-not-at-top
  cat = make_tree(str(tmp_path / 'data'))
  other = 'crack' if only == 'good' else 'good'
  shutil.rmtree(os.path.join(cat, 'test', other))
  config = tiny_config(**{'data.root': str(tmp_path / 'data'),
                          'data.category': 'cat'})
  workdir = str(tmp_path / 'wd')
  with caplog.at_level(logging.WARNING):
    loader = run_lib.prepare(config, workdir)
  kind = 'good' if only == 'good' else 'defective'
  assert f'test set has only {kind} images; AUROC is undefined' in (
      caplog.text)
  monkeypatch.setattr(maps_lib, 'make_predict_fn', fake_predict_fn)
  with caplog.at_level(logging.WARNING):
    report = evaluate.evaluate({}, loader, config, workdir)['cat']
  assert f'The test set holds {kind} images only' in caplog.text
  assert 'image_auroc' not in report
  assert ('image_ap' in report) == ('pixel_auroc' in report) == (
      only == 'crack')
  assert os.path.exists(os.path.join(workdir, 'metrics.json'))
  assert '| cat |' in open(os.path.join(workdir, 'results.md')).read()
