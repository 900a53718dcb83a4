"""The built-in category: a procedurally generated textured surface.

A woven-looking texture (three sinusoidal gratings with random phase,
orientation jitter, low-frequency illumination and sensor noise), with four
defect kinds of varied size and contrast: scratches (thin bright or dark
curves), stains (tinted irregular blobs, some faint), holes (dark discs with
a bright rim) and cracks (jagged dark random walks). Masks are exact: the
set of pixels the defect changed.

Deterministic from the seed; written once in MVTec-AD layout into a cache
folder (atomically: a half-written folder is never used).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

CATEGORY = 'synthetic'
DEFECTS = ('scratch', 'stain', 'hole', 'crack')
_VERSION = 1  # Bump when the generator changes: a new cache folder is used.


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
  """A defect-free surface, float32 [size, size, 3] in [0, 1]."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  base = rng.uniform(-0.12, 0.12)
  out = np.zeros((size, size), np.float32)
  for k, angle in enumerate((0.0, np.pi / 3, 2 * np.pi / 3)):
    a = angle + base + rng.normal(0, 0.03)
    freq = 12.0 * (1 + 0.04 * rng.normal())
    phase = rng.uniform(0, 2 * np.pi)
    out += (0.5 if k == 0 else 0.3) * np.sin(
        2 * np.pi * freq * (xx * np.cos(a) + yy * np.sin(a)) + phase)
  out = 0.5 + 0.18 * out / 1.1
  # Slow illumination change across the part, as on a real line camera.
  gx, gy = rng.normal(0, 0.05, 2)
  out += gx * (xx - 0.5) + gy * (yy - 0.5)
  tint = np.array([1.0, 0.86, 0.66], np.float32) * rng.uniform(0.95, 1.05, 3)
  img = out[..., None] * tint + rng.normal(0, 0.015, (size, size, 3))
  return np.clip(img, 0, 1).astype(np.float32)


def _curve(rng, size, n_points, step, jitter):
  """A random walk polyline as float points [n, 2]."""
  p = rng.uniform(0.2, 0.8, 2) * size
  angle = rng.uniform(0, 2 * np.pi)
  points = [p]
  for _ in range(n_points - 1):
    angle += rng.normal(0, jitter)
    p = p + step * np.array([np.cos(angle), np.sin(angle)])
    points.append(p)
  return np.array(points)


def _polyline_mask(points, size, width):
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  dist = np.full((size, size), np.inf, np.float32)
  for a, b in zip(points[:-1], points[1:]):
    ab = b - a
    t = ((xx - a[0]) * ab[0] + (yy - a[1]) * ab[1]) / max(ab @ ab, 1e-6)
    t = np.clip(t, 0, 1)
    d = np.hypot(xx - (a[0] + t * ab[0]), yy - (a[1] + t * ab[1]))
    dist = np.minimum(dist, d)
  return dist <= width / 2


def _blob_mask(rng, size, radius):
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  cy, cx = rng.uniform(0.2, 0.8, 2) * size
  theta = np.arctan2(yy - cy, xx - cx)
  r = np.hypot(yy - cy, xx - cx)
  wobble = 1 + sum(rng.uniform(0, 0.25) * np.sin(k * theta + rng.uniform(0, 6))
                   for k in (2, 3, 5))
  return r <= radius * wobble * rng.uniform(0.7, 1.0)


def add_defect(rng: np.random.Generator, img: np.ndarray, kind: str):
  """Returns (defective image, exact bool mask)."""
  size = img.shape[0]
  s = size / 128.0
  out = img.copy()
  if kind == 'scratch':
    pts = _curve(rng, size, rng.integers(4, 9), 6 * s, 0.25)
    mask = _polyline_mask(pts, size, rng.uniform(1.5, 3.0) * s)
    delta = rng.choice([-1, 1]) * rng.uniform(0.12, 0.35)
    out[mask] = out[mask] + delta
  elif kind == 'stain':
    mask = _blob_mask(rng, size, rng.uniform(5, 14) * s)
    colour = np.array(rng.choice([[0.35, 0.25, 0.15], [0.7, 0.7, 0.5],
                                  [0.3, 0.35, 0.45]]), np.float32)
    alpha = rng.uniform(0.3, 0.75)
    out[mask] = (1 - alpha) * out[mask] + alpha * colour
  elif kind == 'hole':
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    radius = rng.uniform(2.5, 8) * s
    r = np.hypot(yy - cy, xx - cx)
    core, rim = r <= radius, (r > radius) & (r <= radius + 1.5 * s)
    out[core] = out[core] * rng.uniform(0.1, 0.5)
    out[rim] = np.minimum(out[rim] + 0.2, 1)
    mask = core | rim
  elif kind == 'crack':
    pts = _curve(rng, size, rng.integers(8, 16), 4 * s, 0.9)
    mask = _polyline_mask(pts, size, rng.uniform(1.0, 2.5) * s)
    out[mask] = out[mask] * rng.uniform(0.2, 0.6)
  else:
    raise ValueError(f'unknown defect kind {kind!r}')
  out = np.clip(out, 0, 1)
  # Exact mask: only pixels that actually changed (clipping can undo some).
  mask &= np.any(np.abs(out - img) > 1 / 255, axis=-1)
  return out, mask


def _save(path, img):
  Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path)


def _write(folder: str, seed: int, size: int, n_train: int, n_test_good: int,
           n_per_defect: int) -> None:
  # One generator per image, so the i-th image is the same whatever the
  # counts are (and generation could be parallelised without changing data).
  def rng(split, i):
    return np.random.default_rng([seed, split, i])

  cat = os.path.join(folder, CATEGORY)
  os.makedirs(os.path.join(cat, 'train', 'good'))
  os.makedirs(os.path.join(cat, 'test', 'good'))
  for i in range(n_train):
    _save(os.path.join(cat, 'train', 'good', f'{i:03d}.png'),
          texture(rng(0, i), size))
  for i in range(n_test_good):
    _save(os.path.join(cat, 'test', 'good', f'{i:03d}.png'),
          texture(rng(1, i), size))
  for d, kind in enumerate(DEFECTS):
    os.makedirs(os.path.join(cat, 'test', kind))
    os.makedirs(os.path.join(cat, 'ground_truth', kind))
    for i in range(n_per_defect):
      r = rng(2 + d, i)
      img, mask = add_defect(r, texture(r, size), kind)
      if not mask.any():  # Pathological draw: retry with the next stream.
        r = rng(100 + d, i)
        img, mask = add_defect(r, texture(r, size), kind)
      _save(os.path.join(cat, 'test', kind, f'{i:03d}.png'), img)
      Image.fromarray(mask.astype(np.uint8) * 255).save(
          os.path.join(cat, 'ground_truth', kind, f'{i:03d}_mask.png'))


def default_cache() -> str:
  return os.environ.get('RCAE_JAX_CACHE',
                        os.path.join(os.path.expanduser('~'), '.cache',
                                     'rcae_jax'))


def ensure(cache: str = '', seed: int = 0, size: int = 128,
           n_train: int = 200, n_test_good: int = 40,
           n_per_defect: int = 20) -> str:
  """Generates the category once; returns the root that holds it."""
  params = dict(version=_VERSION, seed=seed, size=size, n_train=n_train,
                n_test_good=n_test_good, n_per_defect=n_per_defect)
  key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()
  root = os.path.join(cache or default_cache(), f'synthetic-{key[:10]}')
  if os.path.isdir(os.path.join(root, CATEGORY)):
    return root
  os.makedirs(os.path.dirname(root), exist_ok=True)
  logging.info('Generating the built-in category into %s', root)
  tmp = tempfile.mkdtemp(prefix='.tmp-', dir=os.path.dirname(root))
  try:
    _write(tmp, seed, size, n_train, n_test_good, n_per_defect)
    with open(os.path.join(tmp, 'params.json'), 'w') as f:
      json.dump(params, f, indent=1)
    try:
      os.rename(tmp, root)  # Atomic: readers see all of it or nothing.
    except OSError:
      if not os.path.isdir(os.path.join(root, CATEGORY)):
        raise  # Not a concurrent writer that won the race.
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return root
