"""Writes anomaly maps as float32 TIFFs in MVTec AD's evaluation layout.

MVTec AD's official evaluation script (`evaluate_experiment.py`) reads one
map per test image from

    <anomaly_maps_dir>/<category>/test/<defect_type>/<stem>.tiff

so passing `<out_root>/anomaly_maps` as its `--anomaly_maps_dir` scores our
maps with the reference implementation of AU-PRO. Maps are written at the
ground-truth (original image) resolution, as that script compares them with
the masks pixel by pixel; the caller upsamples (`evaluate.upsample`).

Files are written atomically (temp file in the same folder + `os.replace`):
an interrupted export never leaves a truncated TIFF that a later evaluation
would read as a valid, wrong map.
"""

from __future__ import annotations

import os
import tempfile
from typing import Sequence

import numpy as np
from PIL import Image

MAPS_FOLDER = 'anomaly_maps'


def map_path(out_root: str, category: str, example_path: str,
             defect_type: str) -> str:
  """`<out_root>/anomaly_maps/<category>/test/<defect_type>/<stem>.tiff`."""
  stem = os.path.splitext(os.path.basename(example_path))[0]
  return os.path.join(out_root, MAPS_FOLDER, category, 'test', defect_type,
                      f'{stem}.tiff')


def save_image_atomic(path: str, image: Image.Image, fmt: str) -> None:
  """Saves a PIL image via a temp file in the same folder + os.replace.

  The temp file lives next to the target so the rename stays on one file
  system (atomic on POSIX and Windows); it is removed if saving fails.
  """
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path),
                             suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      image.save(f, format=fmt)
    os.replace(tmp, path)
  except BaseException:
    # Also on KeyboardInterrupt: never leave the temp file behind.
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_tiff_atomic(path: str, amap) -> None:
  """Writes a 2-D map as a single-channel float32 TIFF (PIL mode 'F')."""
  amap = np.asarray(amap)
  if amap.ndim != 2:
    raise ValueError(f'an anomaly map must be 2-D [H, W], got shape '
                     f'{amap.shape} for {path!r}')
  # Pillow infers mode 'F' from a float32 array (passing `mode=` to
  # fromarray is deprecated). ascontiguousarray: fromarray needs C order.
  image = Image.fromarray(np.ascontiguousarray(amap, dtype=np.float32))
  # Uncompressed TIFF: readable by tifffile (used by MVTec's script) and
  # bit-exact, so the exported values are the ones we evaluated.
  save_image_atomic(path, image, 'TIFF')


def export(out_root: str, category: str, examples: Sequence,
           maps: Sequence) -> int:
  """Writes one TIFF per test example; returns the number written.

  Args:
    out_root: output folder; TIFFs go under `<out_root>/anomaly_maps/`.
    category: category name (MVTec object name).
    examples: test examples with `.path` and `.defect_type`
      (`datasets.folder.TestExample`), in the same order as `maps`.
    maps: 2-D float maps, each already at its example's ground-truth
      resolution.
  """
  if len(examples) != len(maps):
    raise ValueError(f'{len(examples)} examples but {len(maps)} maps')
  paths = [map_path(out_root, category, e.path, e.defect_type)
           for e in examples]
  # Two images with one stem in one defect folder (e.g. 000.png, 000.jpg)
  # would silently overwrite each other's map: refuse before writing.
  seen: dict[str, str] = {}
  for e, p in zip(examples, paths):
    if p in seen:
      raise ValueError(f'{e.path!r} and {seen[p]!r} would both be exported '
                       f'to {p!r}')
    seen[p] = e.path
  for p, amap in zip(paths, maps):
    write_tiff_atomic(p, amap)
  return len(paths)
