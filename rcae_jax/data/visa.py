"""The raw VisA layout (Zou et al., ECCV 2022) read through its split CSV.

VisA as downloaded is not in the MVTec-AD layout:

    <root>/<category>/Data/Images/Normal/*.JPG
    <root>/<category>/Data/Images/Anomaly/*.JPG
    <root>/<category>/Data/Masks/Anomaly/*.png     ({0,1} or {0,255})
    <root>/split_csv/1cls.csv                      (the official 1-class split)

The CSV has the header `object,split,label,image,mask`; `split` is train or
test, `label` normal or anomaly, and `image`/`mask` are paths relative to
<root> (`mask` empty for normal images).

`discover_visa` turns one category into the same `folder.CategoryFiles` that
`folder.discover` returns for an MVTec-layout folder (defect type 'bad' for
anomalies, 'good' for normal images), so every loader and metric works on it
unchanged. Like `folder`, this is plain Python on file names: no decoding.

The order matches `folder.discover` on the same category converted to the
MVTec layout (train sorted by file name; test grouped by defect type in
alphabetical order, 'bad' before 'good', each sorted by file name), so both
routes give identical example order.
"""

from __future__ import annotations

import csv
import logging
import os
from typing import Optional

from rcae_jax.data import folder

VISA_CATEGORIES = ('candle', 'capsules', 'cashew', 'chewinggum', 'fryum',
                   'macaroni1', 'macaroni2', 'pcb1', 'pcb2', 'pcb3', 'pcb4',
                   'pipe_fryum')
CSV_COLUMNS = ('object', 'split', 'label', 'image', 'mask')
DEFAULT_SPLIT_CSV = os.path.join('split_csv', '1cls.csv')
ANOMALY_DEFECT = 'bad'
_LABELS = {'normal': 0, 'anomaly': 1}
_SPLITS = ('train', 'test')
_IMAGE_DIRS = (os.path.join('Data', 'Images', 'Normal'),
               os.path.join('Data', 'Images', 'Anomaly'),
               os.path.join('Data', 'Masks', 'Anomaly'))


def _sort_key(path: str) -> tuple[str, str]:
  return os.path.basename(path), path


def _read_rows(split_csv: str) -> list[tuple[int, dict[str, str]]]:
  """(line number, row) for every data row; checks the header."""
  try:
    with open(split_csv, newline='', encoding='utf-8-sig') as f:
      reader = csv.DictReader(f)
      header = [(h or '').strip() for h in (reader.fieldnames or [])]
      missing = [c for c in CSV_COLUMNS if c not in header]
      if missing:
        raise folder.DataError(
            f'split CSV {split_csv!r} lacks column(s) {missing}: the header '
            f'must be {",".join(CSV_COLUMNS)} (found {header or "no header"})')
      reader.fieldnames = header
      rows = []
      for row in reader:
        rows.append((reader.line_num,
                     {k: (row.get(k) or '').strip() for k in CSV_COLUMNS}))
      return rows
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise folder.DataError(f'cannot read split CSV {split_csv!r}: {e}') from e


def _stray_files(cat_dir: str) -> list[str]:
  """Non-image files in the category's image and mask folders."""
  stray = []
  for sub in _IMAGE_DIRS:
    d = os.path.join(cat_dir, sub)
    if not os.path.isdir(d):
      continue
    for name in sorted(os.listdir(d)):
      path = os.path.join(d, name)
      if (not name.startswith('.') and not os.path.isdir(path)
          and not folder.is_image(name)):
        stray.append(path)
  return stray


def discover_visa(root: str, category: str,
                  split_csv: Optional[str] = None) -> folder.CategoryFiles:
  """Lists one VisA category via the split CSV; DataError names the problem.

  Args:
    root: the VisA root, holding one folder per category (and, by default,
      split_csv/1cls.csv).
    category: one of VISA_CATEGORIES.
    split_csv: the split file; default <root>/split_csv/1cls.csv.
  """
  if category not in VISA_CATEGORIES:
    raise folder.DataError(f'unknown VisA category {category!r}; the VisA '
                           f'categories are: {", ".join(VISA_CATEGORIES)}')
  if not root or not os.path.isdir(root):
    raise folder.DataError(f'VisA root {root!r} does not exist or is not a '
                           'folder (it should hold one folder per category)')
  if split_csv is None:
    split_csv = os.path.join(root, DEFAULT_SPLIT_CSV)
  if not os.path.isfile(split_csv):
    raise folder.DataError(
        f'VisA split CSV {split_csv!r} not found: VisA ships it as '
        f'split_csv/1cls.csv (header {",".join(CSV_COLUMNS)}); pass its path '
        'explicitly if it lives elsewhere')

  train: list[str] = []
  test: list[folder.TestExample] = []
  seen: dict[str, str] = {}  # image path -> where it was first listed
  for line, row in _read_rows(split_csv):
    if row['object'] != category:
      continue
    where = f'{split_csv}:{line}'
    split, label_name = row['split'].lower(), row['label'].lower()
    if split not in _SPLITS:
      raise folder.DataError(f'{where}: split {row["split"]!r} is neither '
                             'train nor test')
    if label_name not in _LABELS:
      raise folder.DataError(f'{where}: label {row["label"]!r} is neither '
                             'normal nor anomaly')
    if not row['image']:
      raise folder.DataError(f'{where}: empty image column')
    image = os.path.normpath(os.path.join(root, row['image']))
    if not folder.is_image(image):
      raise folder.DataError(
          f'{where}: {image!r} does not have an image extension '
          f'({", ".join(folder.IMAGE_EXTENSIONS)}, any case)')
    if not os.path.isfile(image):
      raise folder.DataError(f'{where}: image {image!r} does not exist')
    if image in seen:
      raise folder.DataError(f'{where}: image {image!r} is listed twice '
                             f'(first at {seen[image]})')
    seen[image] = where
    label = _LABELS[label_name]
    if split == 'train':
      if label:
        raise folder.DataError(
            f'{where}: anomalous image {image!r} in the train split; the '
            'one-class setting trains on normal images only')
      train.append(image)
      continue
    if not label:
      # Normal images have no mask file; an all-zero mask is implied.
      test.append(folder.TestExample(image, 0, folder.GOOD, None))
      continue
    if not row['mask']:
      raise folder.DataError(f'{where}: anomalous image {image!r} has no mask '
                             '(the mask column is empty)')
    mask = os.path.normpath(os.path.join(root, row['mask']))
    if not os.path.isfile(mask):
      raise folder.DataError(f'{where}: mask {mask!r} of {image!r} does not '
                             'exist')
    test.append(folder.TestExample(image, 1, ANOMALY_DEFECT, mask))

  if not train:
    raise folder.DataError(f'split CSV {split_csv!r} has no train rows for '
                           f'category {category!r}')
  if not test:
    raise folder.DataError(f'split CSV {split_csv!r} has no test rows for '
                           f'category {category!r}')
  train.sort(key=_sort_key)
  test.sort(key=lambda e: (e.defect_type, _sort_key(e.path)))
  labels = {e.label for e in test}
  if labels != {0, 1}:
    logging.warning('VisA %s: test set has only %s images; AUROC is '
                    'undefined', category,
                    'normal' if labels == {0} else 'anomalous')
  ignored = _stray_files(os.path.join(root, category))
  if ignored:
    logging.warning('VisA %s: ignored %d non-image files, e.g. %s', category,
                    len(ignored), ignored[0])
  return folder.CategoryFiles(
      root=root, category=category, train=tuple(train), test=tuple(test),
      has_masks=any(e.mask_path is not None for e in test),
      ignored=tuple(ignored))
