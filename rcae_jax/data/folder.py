"""Discovery and validation of an MVTec-AD-layout category folder.

Layout (MVTec-AD, also used for the built-in category and users' folders):

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

Only train/good is required: a category without test/ is good-only (it
trains and sets thresholds; there is nothing to measure accuracy on).

Everything here is plain Python on file names: no decoding, no TensorFlow,
so a bad folder fails in milliseconds with a message naming the path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

from rcae_jax.common import fileio

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
GOOD = 'good'


class DataError(ValueError):
  """A dataset folder or file that cannot be used; the message names it."""


@dataclasses.dataclass(frozen=True)
class TestExample:
  path: str
  label: int  # 0 good, 1 defective
  defect_type: str
  mask_path: Optional[str]  # None for good images (all-zero mask)


@dataclasses.dataclass(frozen=True)
class CategoryFiles:
  root: str
  category: str
  train: tuple[str, ...]
  test: tuple[TestExample, ...]
  # True when every defective test image has a mask: pixel metrics possible.
  has_masks: bool
  # Non-image files that were found and ignored (reported, never silent).
  ignored: tuple[str, ...] = ()


def good_only(files: CategoryFiles) -> bool:
  """True for a category without test/ (see `discover`)."""
  return not files.test


def is_image(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _listdir(folder: str) -> list[str]:
  """fileio.listdir, with an unreadable folder as one clear line."""
  try:
    return fileio.listdir(folder)
  except PermissionError as e:
    raise DataError(f'cannot list {folder!r}: permission denied (this user '
                    'cannot read the folder)') from e
  except OSError as e:
    raise DataError(f'cannot list {folder!r}: {e}') from e


def _list_images(folder: str) -> tuple[list[str], list[str]]:
  images, ignored = [], []
  for name in sorted(_listdir(folder)):
    path = os.path.join(folder, name)
    if name.startswith('.'):
      continue
    # Decide by the name first: on gs:// every isdir is a round trip.
    if is_image(name):
      images.append(path)
    elif not fileio.isdir(path):
      ignored.append(path)
  return images, ignored


def _mask_index(gt_dir: str) -> dict[str, str]:
  """Maps an image stem to its mask file in one ground-truth folder."""
  index = {}
  if not fileio.isdir(gt_dir):
    return index
  for name in _listdir(gt_dir):
    if not is_image(name):
      continue
    stem = os.path.splitext(name)[0]
    # MVTec names masks <stem>_mask.png; accept a bare <stem>.png too.
    key = stem[:-len('_mask')] if stem.endswith('_mask') else stem
    index[key] = os.path.join(gt_dir, name)
  return index


def discover(root: str, category: str) -> CategoryFiles:
  """Lists a category's files; raises DataError naming what is wrong."""
  if not root or not fileio.isdir(root):
    raise DataError(f'data root {root!r} does not exist or is not a folder '
                    '(set --config.data.root to the folder that holds the '
                    'category folders)')
  cat_dir = os.path.join(root, category)
  if not fileio.isdir(cat_dir):
    found = sorted(d for d in _listdir(root)
                   if fileio.isdir(os.path.join(root, d)))
    raise DataError(f'category {category!r} not found in {root!r}; '
                    f'folders there: {found or "none"}')
  train_dir = os.path.join(cat_dir, 'train', GOOD)
  if not fileio.isdir(train_dir):
    raise DataError(f'{train_dir!r} is missing: a category folder needs '
                    'train/good with defect-free training images')
  train, ignored = _list_images(train_dir)
  if not train:
    raise DataError(f'{train_dir!r} holds no images (extensions: '
                    f'{", ".join(IMAGE_EXTENSIONS)}, any case)')
  test_dir = os.path.join(cat_dir, 'test')
  if not fileio.isdir(test_dir):
    # A good-only category (a new line has no defects yet): it trains and
    # sets thresholds on held-out good images; evaluation says, once, that
    # the test metrics are skipped. An existing but empty test/ is still
    # refused below: that is more likely a mistake than a choice.
    if ignored:
      logging.warning('%s: ignored %d non-image entries, e.g. %s', cat_dir,
                      len(ignored), ignored[0])
    return CategoryFiles(root=root, category=category, train=tuple(train),
                         test=(), has_masks=False, ignored=tuple(ignored))
  test: list[TestExample] = []
  missing_masks: list[str] = []
  any_mask = False
  for defect in sorted(_listdir(test_dir)):
    defect_dir = os.path.join(test_dir, defect)
    if not fileio.isdir(defect_dir):
      ignored.append(defect_dir)
      continue
    images, skipped = _list_images(defect_dir)
    ignored.extend(skipped)
    masks = _mask_index(os.path.join(cat_dir, 'ground_truth', defect))
    for path in images:
      if defect == GOOD:
        test.append(TestExample(path, 0, defect, None))
        continue
      mask = masks.get(os.path.splitext(os.path.basename(path))[0])
      any_mask |= mask is not None
      if mask is None:
        missing_masks.append(path)
      test.append(TestExample(path, 1, defect, mask))
  if not test:
    raise DataError(f'{test_dir!r} holds no test images')
  labels = {e.label for e in test}
  if labels != {0, 1}:
    logging.warning('%s: test set has only %s images; AUROC is undefined',
                    test_dir, 'good' if labels == {0} else 'defective')
  if any_mask and missing_masks:
    raise DataError(
        f'{len(missing_masks)} defective test image(s) have no mask under '
        f'{os.path.join(cat_dir, "ground_truth")!r}, e.g. {missing_masks[0]!r}'
        ' (expected ground_truth/<defect>/<stem>_mask.png)')
  if not any_mask:
    logging.warning('%s: no ground-truth masks; only image-level metrics '
                    'will be computed', cat_dir)
  if ignored:
    logging.warning('%s: ignored %d non-image entries, e.g. %s', cat_dir,
                    len(ignored), ignored[0])
  return CategoryFiles(root=root, category=category, train=tuple(train),
                       test=tuple(test), has_masks=any_mask,
                       ignored=tuple(ignored))
