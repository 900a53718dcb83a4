#!/usr/bin/env python3
"""Scores images with an exported RcAE model, using jax, numpy, Pillow only.

`python -m rcae_jax.main ... --config.mode=export` writes <workdir>/export/:
predict.stablehlo (the trained inference function, weights included),
model.json (input size, thresholds, platforms, jax version) and a copy of
this script. Copy that folder to the production machine, install
`jax numpy pillow` there (jax at least model.json's `jax_version`, on one of
its `platforms`), and run

    python export/serve_export.py export/ /line/camera/today --output scores

It writes scores/scores.csv (file, name, decision OK / DEFECT / ERROR,
score, error) and scores/<name>.tiff, each image's float32 anomaly map at
the image's own size, where <name> is the image's path relative to the
folder given. An image that cannot be read becomes an ERROR row; the exit
status is then 3.

Decoding, resizing and map upsampling repeat rcae_jax/data/decode.py
and evaluation/maps.py upsample exactly: tests check that maps and scores equal
`--config.mode=predict`'s. This file must not import rcae_jax: it runs
where only the export folder is.
"""

import argparse
import csv
import json
import os
import sys

import jax
import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
PARTIAL_FAILURE_EXIT = 3


def to_rgb8(img):
  """Any mode (grey, RGBA, palette, 16-bit, float) to 8-bit RGB."""
  if img.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
    arr = np.asarray(img, dtype=np.float64)
    hi = 65535.0 if img.mode.startswith('I;16') or arr.max() > 255 else 255.0
    arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)  # 2-D uint8: mode 'L'.
  return img.convert('RGB')


def load(path, size):
  """(uint8 [H, W, 3] as stored, uint8 [size, size, 3] model input)."""
  img = Image.open(path)
  img.load()  # Decodes everything now, so a truncated file fails here.
  image = np.asarray(to_rgb8(img), dtype=np.uint8)
  if image.shape[:2] == (size, size):
    return image, image
  small = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
  return image, np.asarray(small, dtype=np.uint8)


def upsample(amap, shape):
  """Bilinear resize of a float32 map to (H, W)."""
  if amap.shape == tuple(shape):
    return amap.astype(np.float32)
  img = Image.fromarray(np.ascontiguousarray(amap, dtype=np.float32))
  return np.asarray(img.resize((shape[1], shape[0]),
                               Image.Resampling.BILINEAR))


def list_images(inputs):
  """[(path, name)]: a folder's images recursively (name: the path
  relative to it), or image files (name: the file name)."""
  if not os.path.isdir(inputs):
    return [(p, os.path.basename(p)) for p in inputs.split(',') if p]
  found = []
  for here, dirs, files in os.walk(inputs):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    for name in sorted(files):
      if (not name.startswith('.') and
          os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS):
        path = os.path.join(here, name)
        found.append((path, os.path.relpath(path, inputs)))
  return found


def version(text):
  return tuple(int(p) for p in text.split('.')[:3] if p.isdigit())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('export_dir', help='the export folder (model.json)')
  parser.add_argument('inputs', help='a folder, or comma-separated images')
  parser.add_argument('--output', default='scores', help='output folder')
  parser.add_argument('--batch-size', type=int, default=8,
                      help='images per call (each new size compiles once)')
  args = parser.parse_args(argv)
  with open(os.path.join(args.export_dir, 'model.json')) as f:
    meta = json.load(f)
  if version(jax.__version__) < version(meta['jax_version']):
    print(f'warning: exported with jax {meta["jax_version"]}, running jax '
          f'{jax.__version__}: use the same or a newer jax', file=sys.stderr)
  with open(os.path.join(args.export_dir, meta['function']), 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  predict = jax.jit(exported.call)
  size, threshold = meta['image_size'], meta['thresholds']['image']
  images = list_images(args.inputs)
  rows = []
  for s in range(0, len(images), args.batch_size):
    chunk, loaded = images[s:s + args.batch_size], []
    for path, name in chunk:
      try:
        loaded.append((path, name) + load(path, size))
      except Exception as e:  # pylint: disable=broad-except
        # One bad frame must not cost the rest their scores.
        rows.append({'file': path, 'name': name, 'decision': 'ERROR',
                     'error': ' '.join(f'{type(e).__name__}: {e}'.split())})
    if not loaded:
      continue
    batch = np.stack([x[3] for x in loaded] + [np.zeros(
        (size, size, 3), np.uint8)] * (args.batch_size - len(loaded)))
    out = predict(batch)
    maps, scores = np.asarray(out['map']), np.asarray(out['score'])
    for k, (path, name, image, _) in enumerate(loaded):
      target = os.path.join(args.output, name + '.tiff')
      os.makedirs(os.path.dirname(target), exist_ok=True)
      Image.fromarray(upsample(maps[k], image.shape[:2])).save(target,
                                                                'TIFF')
      score = float(scores[k])
      rows.append({'file': path, 'name': name, 'score': score,
                   'decision': 'DEFECT' if score >= threshold else 'OK'})
    print(f'{len(rows)}/{len(images)} images', file=sys.stderr)
  order = {name: i for i, (_, name) in enumerate(images)}
  rows.sort(key=lambda r: order[r['name']])
  os.makedirs(args.output, exist_ok=True)
  with open(os.path.join(args.output, 'scores.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, ['file', 'name', 'decision', 'score', 'error'])
    writer.writeheader()
    writer.writerows(rows)
  failed = [r for r in rows if r['decision'] == 'ERROR']
  count = lambda d: sum(r['decision'] == d for r in rows)
  print(f'{len(rows)} images, {count("OK")} OK, {count("DEFECT")} DEFECT, '
        f'{len(failed)} ERROR; {os.path.join(args.output, "scores.csv")}')
  return PARTIAL_FAILURE_EXIT if failed else 0


if __name__ == '__main__':
  sys.exit(main())
