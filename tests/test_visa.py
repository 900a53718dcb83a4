"""The raw VisA reader on a tiny fake VisA tree."""

import logging
import os

import numpy as np
import pytest

from conftest import write_image
from rcae_jax.data import decode, folder, visa

HEADER = 'object,split,label,image,mask\n'


def make_visa(root, category='capsules', n_train=3, n_good=2, n_bad=2,
              mask_scale=1, csv_rows=None):
  """A VisA-layout category and split_csv/1cls.csv; returns the CSV path."""
  rng = np.random.default_rng(0)
  cat = os.path.join(root, category, 'Data')
  rows = []
  for i in range(n_train + n_good):
    rel = f'{category}/Data/Images/Normal/{i:04d}.JPG'
    write_image(os.path.join(root, rel),
                rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    split = 'train' if i < n_train else 'test'
    rows.append(f'{category},{split},normal,{rel},')
  for i in range(n_bad):
    rel = f'{category}/Data/Images/Anomaly/{i:03d}.JPG'
    mrel = f'{category}/Data/Masks/Anomaly/{i:03d}.png'
    write_image(os.path.join(root, rel),
                rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    mask = np.zeros((12, 16), np.uint8)
    mask[2:5, 3:7] = mask_scale
    write_image(os.path.join(root, mrel), mask)
    rows.append(f'{category},test,anomaly,{rel},{mrel}')
  # Another category's rows must be skipped.
  rows.append('pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,')
  os.makedirs(os.path.join(cat, 'Images', 'Normal'), exist_ok=True)
  csv_path = os.path.join(root, 'split_csv', '1cls.csv')
  os.makedirs(os.path.dirname(csv_path), exist_ok=True)
  with open(csv_path, 'w') as f:
    f.write(HEADER + '\n'.join(rows if csv_rows is None else csv_rows) + '\n')
  return csv_path


def test_categories():
  assert len(visa.VISA_CATEGORIES) == 12
  assert 'pipe_fryum' in visa.VISA_CATEGORIES


@pytest.mark.parametrize('mask_scale', [1, 255])
def test_discover(tmp_path, mask_scale):
  root = str(tmp_path)
  make_visa(root, mask_scale=mask_scale)
  files = visa.discover_visa(root, 'capsules')
  assert isinstance(files, folder.CategoryFiles)
  assert files.category == 'capsules' and files.root == root
  assert [os.path.basename(p) for p in files.train] == [
      '0000.JPG', '0001.JPG', '0002.JPG']
  assert all(os.path.isfile(p) for p in files.train)
  # 'bad' before 'good', as folder.discover orders the converted layout.
  assert [(e.label, e.defect_type, os.path.basename(e.path))
          for e in files.test] == [
              (1, 'bad', '000.JPG'), (1, 'bad', '001.JPG'),
              (0, 'good', '0003.JPG'), (0, 'good', '0004.JPG')]
  assert files.has_masks and files.ignored == ()
  for e in files.test:
    assert (e.mask_path is None) == (e.label == 0)
  # Masks in {0,1} and {0,255} both decode to the same binary mask.
  bad = files.test[0]
  mask = decode.load_mask(bad.mask_path, decode.image_shape(bad.path))
  assert mask.sum() == 12 and mask[2:5, 3:7].all()


def test_explicit_csv_and_stray_files(tmp_path, caplog):
  root = str(tmp_path / 'visa')
  csv_path = make_visa(root)
  moved = str(tmp_path / 'my_split.csv')
  os.rename(csv_path, moved)
  stray = os.path.join(root, 'capsules', 'Data', 'Images', 'Normal',
                       'notes.txt')
  with open(stray, 'w') as f:
    f.write('x')
  with pytest.raises(folder.DataError, match='1cls.csv'):
    visa.discover_visa(root, 'capsules')
  with caplog.at_level(logging.WARNING):
    files = visa.discover_visa(root, 'capsules', split_csv=moved)
  assert len(files.train) == 3 and len(files.test) == 4
  assert files.ignored == (stray,)
  assert 'ignored 1 non-image' in caplog.text


def test_unknown_category(tmp_path):
  make_visa(str(tmp_path))
  with pytest.raises(folder.DataError) as e:
    visa.discover_visa(str(tmp_path), 'bottle')
  assert "'bottle'" in str(e.value)
  for name in visa.VISA_CATEGORIES:
    assert name in str(e.value)


def test_missing_columns(tmp_path):
  csv_path = make_visa(str(tmp_path))
  with open(csv_path, 'w') as f:
    f.write('object,split,image\ncapsules,train,a.JPG\n')
  with pytest.raises(folder.DataError, match=r"lacks column\(s\) \['label', "
                     r"'mask'\]") as e:
    visa.discover_visa(str(tmp_path), 'capsules')
  assert csv_path in str(e.value)


@pytest.mark.parametrize('folder_name,name,message', [
    ('Images', '001.JPG', 'does not exist'),
    ('Masks', '000.png', 'mask .* does not exist')])
def test_missing_image_or_mask_file(tmp_path, folder_name, name, message):
  root = str(tmp_path)
  make_visa(root)
  gone = os.path.join(root, 'capsules', 'Data', folder_name, 'Anomaly', name)
  os.remove(gone)
  with pytest.raises(folder.DataError, match=message) as e:
    visa.discover_visa(root, 'capsules')
  assert gone in str(e.value) and '1cls.csv:' in str(e.value)


def test_anomaly_without_mask(tmp_path):
  root = str(tmp_path)
  make_visa(root, n_bad=1)
  csv_path = os.path.join(root, 'split_csv', '1cls.csv')
  rows = open(csv_path).read().splitlines()
  rows = [r.rsplit(',', 1)[0] + ',' if ',anomaly,' in r else r for r in rows]
  with open(csv_path, 'w') as f:
    f.write('\n'.join(rows) + '\n')
  with pytest.raises(folder.DataError, match='has no mask') as e:
    visa.discover_visa(root, 'capsules')
  assert '000.JPG' in str(e.value)


def test_no_train_rows(tmp_path):
  root = str(tmp_path)
  make_visa(root, n_train=0)
  with pytest.raises(folder.DataError,
                     match="no train rows for category 'capsules'"):
    visa.discover_visa(root, 'capsules')


def test_anomaly_in_train(tmp_path):
  root = str(tmp_path)
  make_visa(root, n_bad=1)
  csv_path = os.path.join(root, 'split_csv', '1cls.csv')
  text = open(csv_path).read().replace('test,anomaly', 'train,anomaly')
  with open(csv_path, 'w') as f:
    f.write(text)
  with pytest.raises(folder.DataError, match='anomalous image .* in the '
                     'train split'):
    visa.discover_visa(root, 'capsules')


def test_bad_label(tmp_path):
  root = str(tmp_path)
  csv_path = make_visa(root)
  text = open(csv_path).read().replace('train,normal', 'train,ok', 1)
  with open(csv_path, 'w') as f:
    f.write(text)
  with pytest.raises(folder.DataError, match="label 'ok'"):
    visa.discover_visa(root, 'capsules')
