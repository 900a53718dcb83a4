"""Prediction on production images: maps, overlays, scores, decisions.

`config.mode='predict'` loads the trained workdir (its latest checkpoint
and thresholds.json) and scores `config.predict.inputs` (a folder, or
comma-separated image files) of any size: each image is resized to the
model size, batches are padded to a fixed size (one compiled program for
every input, whatever its resolution), and each map is resized back to the
image's own resolution. Per image: a float32 TIFF map, an overlay PNG, the
image score and an OK/DEFECT decision at the stored image threshold,
collected in predictions.csv and predictions.json.
"""

from __future__ import annotations

import csv
import io
import logging
import os

import numpy as np

from rcae_jax import evaluate
from rcae_jax import export_maps
from rcae_jax import fileio
from rcae_jax import train
from rcae_jax import visualize
from rcae_jax.datasets import decode, folder


def list_inputs(spec: str) -> list[str]:
  """A folder (its images, sorted) or comma-separated image files."""
  paths = []
  for part in [p.strip() for p in spec.split(',') if p.strip()]:
    if fileio.isdir(part):
      paths += [os.path.join(part, n) for n in sorted(fileio.listdir(part))
                if folder.is_image(n)]
    elif fileio.exists(part):
      paths.append(part)
    else:
      raise folder.DataError(f'predict input {part!r} is neither an image '
                             'file nor a folder')
  if not paths:
    raise folder.DataError(f'no images found in predict.inputs={spec!r}')
  return paths


def load_thresholds(workdir: str) -> dict:
  path = os.path.join(workdir, 'thresholds.json')
  if not fileio.exists(path):
    raise FileNotFoundError(f'{path} is missing: evaluate the run first '
                            '(--config.mode=evaluate) to choose thresholds')
  return fileio.read_json(path)


def _batches(paths, batch_size, size):
  """(paths, uint8 images [batch_size, S, S, 3] padded, originals)."""
  for s in range(0, len(paths), batch_size):
    chunk = paths[s:s + batch_size]
    originals = [decode.load_image(p, None) for p in chunk]
    small = [decode.resize_image(o, size) for o in originals]
    pad = [np.zeros_like(small[0])] * (batch_size - len(small))
    yield chunk, np.stack(small + pad), originals


def predict_files(config, workdir: str) -> list[dict]:
  params = train.load_params(config, workdir)
  thresholds = load_thresholds(workdir)
  predict_fn = evaluate.make_predict_fn(config)
  out_dir = config.predict.output or os.path.join(workdir, 'predictions')
  paths = list_inputs(config.predict.inputs)
  rows = []
  for chunk, batch, originals in _batches(paths, config.eval.batch_size,
                                          config.data.image_size):
    out = predict_fn(params, batch)
    maps, scores = np.asarray(out['map']), np.asarray(out['score'])
    for j, (path, image) in enumerate(zip(chunk, originals)):
      stem = os.path.splitext(os.path.basename(path))[0]
      amap = evaluate.upsample(maps[j], image.shape[:2])
      export_maps.write_tiff_atomic(os.path.join(out_dir, f'{stem}.tiff'),
                                    amap)
      visualize.save_png(os.path.join(out_dir, f'{stem}_overlay.png'),
                         visualize.overlay(image, amap,
                                           thresholds['display_min'],
                                           thresholds['display_max'],
                                           threshold=thresholds['pixel']))
      score = float(scores[j])
      rows.append({'file': path, 'score': score,
                   'decision': 'DEFECT' if score >= thresholds['image']
                               else 'OK',
                   'map': os.path.join(out_dir, f'{stem}.tiff'),
                   'height': image.shape[0], 'width': image.shape[1]})
    logging.info('Predicted %d/%d images', len(rows), len(paths))
  write_reports(out_dir, rows, thresholds)
  return rows


def write_reports(out_dir: str, rows: list[dict], thresholds: dict) -> None:
  fileio.write_json_atomic(os.path.join(out_dir, 'predictions.json'),
                           {'image_threshold': thresholds['image'],
                            'pixel_threshold': thresholds['pixel'],
                            'predictions': rows})
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  fileio.write_text_atomic(os.path.join(out_dir, 'predictions.csv'),
                           buf.getvalue())
