"""Writes anomaly maps as float32 TIFFs in MVTec AD's evaluation layout.

MVTec AD's official evaluation script (`evaluate_experiment.py`) reads one
map per test image from

    <anomaly_maps_dir>/<category>/test/<defect_type>/<stem>.tiff

so passing `<out_root>/anomaly_maps` as its `--anomaly_maps_dir` scores our
maps with the reference implementation of AU-PRO. Maps are written at the
ground-truth (original image) resolution, as that script compares them with
the masks pixel by pixel; the caller upsamples (`maps.upsample`).

Files are written atomically (`fileio.write_bytes_atomic`; `out_root` may be
a gs:// URL): an interrupted export never leaves a truncated TIFF that a later evaluation
would read as a valid, wrong map.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
from PIL import Image

from rcae_jax.common import fileio

MAPS_FOLDER = 'anomaly_maps'


def map_path(out_root: str, category: str, example_path: str,
             defect_type: str) -> str:
  """`<out_root>/anomaly_maps/<category>/test/<defect_type>/<stem>.tiff`."""
  stem = os.path.splitext(os.path.basename(example_path))[0]
  return os.path.join(out_root, MAPS_FOLDER, category, 'test', defect_type,
                      f'{stem}.tiff')


def save_image_atomic(path: str, image: Image.Image, fmt: str) -> None:
  """Encodes a PIL image in memory, then writes it atomically (local temp
  file + rename, or one object upload for gs://: fileio)."""
  buf = io.BytesIO()
  image.save(buf, format=fmt)
  fileio.write_bytes_atomic(path, buf.getvalue())


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
