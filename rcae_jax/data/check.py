"""Fast validation of a category's files before training starts.

`validate_category` opens every image and mask once, in a thread pool, and
reads only as much as it needs to find broken files quickly:

- PNG: `Image.verify()` walks every chunk and checks its CRC, so truncated
  or corrupted files fail without decompressing the pixels;
- JPEG: a decode at 1/8 scale (`Image.draft`) still reads the whole
  entropy-coded stream, so truncation is caught at a fraction of the cost;
- other formats (BMP, TIFF): a full decode;
- masks: a full decode (they are small), needed anyway to see whether a
  defective image's mask has any foreground.

Errors (empty, unreadable, truncated or non-image files, broken links,
masks whose size differs from their image) raise one `folder.DataError`:
one line naming the file and the problem when there is one, else the
count and up to 10 of them. Warnings (empty masks of defective images,
masks that are not binary, images smaller than the model input, ignored
non-image files) are logged with counts and returned in the `Report`,
never dropped. docs/reliability.md tabulates every case and its test.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import logging
import os
from typing import Any, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from rcae_jax.common import fileio
from rcae_jax.data import folder

MAX_LISTED = 10
_GREY_MODES = ('1', 'L', 'LA', 'La', 'I', 'F', 'I;16', 'I;16L', 'I;16B',
               'I;16N')
_SIXTEEN_BIT_MODES = ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N')
_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError,
           EOFError, Image.DecompressionBombError)


@dataclasses.dataclass
class Report:
  """What validation found; counts plus up to MAX_LISTED example paths."""
  category: str
  num_images: int = 0  # train + test images opened
  num_masks: int = 0
  grey: int = 0  # single-channel images (fine: converted to RGB)
  sixteen_bit: int = 0  # 16/32-bit integer images (fine: scaled to 8 bit)
  grey_examples: list[str] = dataclasses.field(default_factory=list)
  sixteen_bit_examples: list[str] = dataclasses.field(default_factory=list)
  # Warnings.
  empty_masks: int = 0  # defective test images whose mask is all zero
  empty_mask_examples: list[str] = dataclasses.field(default_factory=list)
  ignored: int = 0  # non-image files found in the category folders
  ignored_examples: list[str] = dataclasses.field(default_factory=list)
  # Masks with more than one non-zero value (anti-aliased, JPEG-compressed):
  # every value above zero counts as defect, which may widen the defect.
  non_binary_masks: int = 0
  non_binary_mask_examples: list[str] = dataclasses.field(
      default_factory=list)
  # Images smaller than the model input (`image_size`): upsampled.
  small: int = 0
  small_examples: list[str] = dataclasses.field(default_factory=list)
  image_size: Any = None  # S or (H, W)

  @property
  def warnings(self) -> list[str]:
    out = []
    if self.empty_masks:
      out.append(f'{self.empty_masks} defective test image(s) have a mask '
                 'with no foreground (they add nothing to pixel metrics), '
                 f'e.g. {", ".join(self.empty_mask_examples)}')
    if self.ignored:
      out.append(f'{self.ignored} non-image file(s) ignored, e.g. '
                 f'{", ".join(self.ignored_examples)}')
    if self.non_binary_masks:
      out.append(f'{self.non_binary_masks} mask(s) hold more than one '
                 'non-zero value (anti-aliased or JPEG-compressed?); every '
                 'value above 0 counts as defect, e.g. '
                 f'{", ".join(self.non_binary_mask_examples)}')
    if self.small:
      size = self.image_size
      if not isinstance(size, int) and size[0] == size[1]:
        size = size[0]
      where = (f'{size} px on a side' if isinstance(size, int)
               else f'({size[0]}, {size[1]}) px (H, W)')
      out.append(f'{self.small} image(s) are smaller than data.image_size='
                 f'{where} and will be upsampled, e.g. '
                 f'{", ".join(self.small_examples)}')
    return out


def _note(examples: list[str], path: str) -> None:
  if len(examples) < MAX_LISTED:
    examples.append(path)


@dataclasses.dataclass
class _Result:
  path: str
  size: Optional[tuple[int, int]] = None  # (W, H)
  mode: str = ''
  error: Optional[str] = None
  has_foreground: bool = True
  binary: bool = True


def _is_empty(path: str, source) -> bool:
  if isinstance(source, io.BytesIO):
    return not source.getbuffer().nbytes
  try:
    return os.path.getsize(path) == 0
  except OSError:
    return False


def _describe(e: BaseException, path: str, source=None) -> str:
  """The problem with `path`, in words a user can act on."""
  if isinstance(e, PermissionError):
    return 'permission denied: this user cannot read it'
  if isinstance(e, IsADirectoryError):
    return 'a folder with an image name, not an image file'
  if isinstance(e, FileNotFoundError):
    if not fileio.is_remote(path) and os.path.islink(path):
      return (f'broken symbolic link to {os.readlink(path)!r}, which does '
              'not exist')
    return 'file does not exist'
  if isinstance(e, Image.DecompressionBombError):
    return f'too many pixels to decode safely ({e})'
  if isinstance(e, UnidentifiedImageError):
    if _is_empty(path, source):
      return 'empty file (0 bytes)'
    return 'not an image Pillow can identify (wrong extension or corrupt)'
  text = str(e) or type(e).__name__
  if 'truncat' in text.lower():
    return f'truncated file ({text})'
  return f'corrupt or unreadable ({type(e).__name__}: {text})'


def _check_image(path: str) -> _Result:
  res = _Result(path)
  source = None
  try:
    source = fileio.image_source(path)
    with Image.open(source) as img:
      res.size, res.mode = img.size, img.mode
      if img.format == 'PNG':
        img.verify()
      else:
        if img.format in ('JPEG', 'MPO'):
          img.draft(img.mode, (1, 1))  # Smallest DCT scale: reads all data.
        img.load()
  except _ERRORS as e:
    res.error = _describe(e, path, source)
  return res


def _check_mask(path: str) -> _Result:
  res = _Result(path)
  source = None
  try:
    source = fileio.image_source(path)
    with Image.open(source) as img:
      res.size, res.mode = img.size, img.mode
      img.load()
      # The same reading as decode.load_mask: any value above 0 is defect.
      counts = np.bincount(np.asarray(img.convert('L')).ravel(),
                           minlength=256)[1:]  # O(pixels), no sort.
      res.has_foreground = bool(counts.any())
      res.binary = np.count_nonzero(counts) <= 1
  except _ERRORS as e:
    res.error = _describe(e, path, source)
  return res


def _check_test(ex: folder.TestExample) -> tuple[_Result, Optional[_Result]]:
  image = _check_image(ex.path)
  mask = _check_mask(ex.mask_path) if ex.mask_path is not None else None
  return image, mask


def upsampled(size_wh, image_size, resize: str = 'squash') -> bool:
  """Whether an image of Pillow size (W, H) is enlarged on the way to the
  model input `image_size` (S or (H, W)), laid out by `resize`."""
  hw = (image_size, image_size) if isinstance(image_size, int) else tuple(
      image_size)
  w0, h0 = size_wh
  if resize == 'squash':
    return h0 < hw[0] or w0 < hw[1]
  return min(hw[0] / h0, hw[1] / w0) > 1


def validate_category(files: folder.CategoryFiles, workers: int = 4,
                      image_size=None, resize: str = 'squash') -> Report:
  """Checks every file of `files` once; DataError lists the broken ones.

  `image_size`: the model input (S or (H, W)), `resize` how images are laid
  out on it (geometry.py); images it enlarges are reported (upsampled)."""
  report = Report(category=files.category, image_size=image_size)
  errors: list[tuple[str, str]] = []

  def add_image(res: _Result) -> None:
    report.num_images += 1
    if res.error is not None:
      errors.append((res.path, res.error))
      return
    if image_size and upsampled(res.size, image_size, resize):
      report.small += 1
      _note(report.small_examples, res.path)
    if res.mode in _GREY_MODES:
      report.grey += 1
      _note(report.grey_examples, res.path)
    if res.mode in _SIXTEEN_BIT_MODES:
      report.sixteen_bit += 1
      _note(report.sixteen_bit_examples, res.path)

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    train = pool.map(_check_image, files.train)
    test = pool.map(_check_test, files.test)
    for res in train:
      add_image(res)
    for ex, (image, mask) in zip(files.test, test):
      add_image(image)
      if mask is None:
        continue
      report.num_masks += 1
      if mask.error is not None:
        errors.append((mask.path, f'mask: {mask.error}'))
        continue
      if image.error is None and mask.size != image.size:
        errors.append((mask.path, (
            f'mask is {mask.size[0]}x{mask.size[1]} but its image '
            f'{ex.path!r} is {image.size[0]}x{image.size[1]} (W x H)')))
      if ex.label and not mask.has_foreground:
        report.empty_masks += 1
        _note(report.empty_mask_examples, mask.path)
      if not mask.binary:
        report.non_binary_masks += 1
        _note(report.non_binary_mask_examples, mask.path)

  for path in files.ignored:
    report.ignored += 1
    _note(report.ignored_examples, path)

  for message in report.warnings:
    logging.warning('%s: %s', files.category, message)
  if report.grey or report.sixteen_bit:
    logging.info('%s: %d grey and %d 16-bit image(s) of %d (converted to '
                 '8-bit RGB when loaded)', files.category, report.grey,
                 report.sixteen_bit, report.num_images)

  if errors:
    head = (f'{len(errors)} unusable file(s) in category {files.category!r} '
            f'under {files.root!r}:')
    if len(errors) == 1:  # One line, as every other bad-input message.
      raise folder.DataError(f'{head} {errors[0][0]}: {errors[0][1]}')
    lines = [f'  {path}: {problem}' for path, problem in errors[:MAX_LISTED]]
    more = len(errors) - MAX_LISTED
    if more > 0:
      lines.append(f'  ... and {more} more')
    raise folder.DataError(head + '\n' + '\n'.join(lines))
  return report
