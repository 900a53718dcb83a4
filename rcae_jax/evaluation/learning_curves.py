"""Learning curves: test metrics against training step and wall time.

`config.eval.every_steps` makes training score the test set every K steps
of each stage (`curve_hook.make_curve_hook`), as `curve/*` rows of
`<workdir>/scalars.jsonl`. This module reads those rows back and draws
them: image AUROC, pixel AUROC and AU-PRO against the global step (left)
and the wall time (right), with the stage boundaries marked. Whether a
curve still rises at a stage's end says whether more compute there would
help, which is what someone sizing a GPU run needs to know.

    python -m rcae_jax.evaluation.learning_curves WORKDIR [--out PNG]

writes WORKDIR/pictures/learning_curves.png by default. Pillow only.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image
from PIL import ImageDraw

from rcae_jax.common import fileio
from rcae_jax.evaluation import visualize

SERIES = (('curve/image_auroc', 'image AUROC', (31, 90, 200)),
          ('curve/pixel_auroc', 'pixel AUROC', (220, 80, 30)),
          ('curve/au_pro', 'AU-PRO', (40, 150, 60)))


def read_points(workdir: str) -> list[dict]:
  """The `curve/*` rows of scalars.jsonl, in step order (the last row of a
  step wins: a resumed run may repeat one)."""
  path = os.path.join(workdir, 'scalars.jsonl')
  if not fileio.exists(path):
    return []
  rows = {}
  for line in fileio.read_text(path).splitlines():
    if not line.strip():
      continue
    row = json.loads(line)
    if 'curve/stage' in row:
      rows[row['step']] = row
  return [rows[s] for s in sorted(rows)]


def last_wall_minutes(workdir: str) -> float:
  """The wall time of the last curve point so far (0 for a new run): where
  a resumed run's wall-time axis carries on, so a preempted run's curve
  does not restart at 0. The minutes between that point and the
  interruption are not counted."""
  points = read_points(workdir)
  return float(points[-1]['curve/wall_minutes']) if points else 0.0


def _panel(points, x_key: str, xlabel: str, size=(420, 300)) -> Image.Image:
  w, h = size
  left, right, top, bottom = 36, 12, 22, 30
  pw, ph = w - left - right, h - top - bottom
  xs = np.array([p[x_key] for p in points], np.float64)
  x_max = float(xs.max()) or 1.0
  to_px = lambda x, y: (left + x / x_max * pw, top + (1 - y) * ph)
  img = Image.new('RGB', size, visualize.BACKGROUND)
  draw = ImageDraw.Draw(img)
  for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
    _, gy = to_px(0, frac)
    draw.line([(left, gy), (left + pw, gy)], fill=(225, 225, 225))
    draw.text((4, gy - 6), f'{frac:.2f}', fill=(0, 0, 0))
  # Stage boundaries: where the stage number changes between points.
  for a, b in zip(points, points[1:]):
    if a['curve/stage'] != b['curve/stage']:
      gx, _ = to_px(a[x_key], 0)
      draw.line([(gx, top), (gx, top + ph)], fill=(150, 150, 150))
      draw.text((gx + 2, top + ph - 12), f"stage {int(b['curve/stage'])}",
                fill=(120, 120, 120))
  for key, _, colour in SERIES:
    pts = [to_px(p[x_key], p[key]) for p in points if key in p]
    if len(pts) > 1:
      draw.line(pts, fill=colour, width=2)
    for x, y in pts:
      draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
  draw.line([(left, top), (left, top + ph), (left + pw, top + ph)],
            fill=(0, 0, 0))
  draw.text((left, h - 14), f'{xlabel}: 0 .. {x_max:.4g}', fill=(0, 0, 0))
  return img


def plot(points: list[dict], title: str = '') -> np.ndarray:
  """Both panels side by side with a legend, [H, W, 3] uint8."""
  if not points:
    raise ValueError('no curve/* points: train with --config.eval.'
                     'every_steps=K to record learning curves')
  by_step = _panel(points, 'step', 'global step')
  by_time = _panel(points, 'curve/wall_minutes', 'wall time (min)')
  w, h = by_step.width + by_time.width, by_step.height + 20
  img = Image.new('RGB', (w, h), visualize.BACKGROUND)
  img.paste(by_step, (0, 20))
  img.paste(by_time, (by_step.width, 20))
  draw = ImageDraw.Draw(img)
  x = 6
  if title:
    draw.text((x, 4), title, fill=(0, 0, 0))
    x += draw.textlength(title) + 16
  for _, name, colour in SERIES:
    draw.rectangle([x, 7, x + 10, 15], fill=colour)
    draw.text((x + 14, 4), name, fill=(0, 0, 0))
    x += 14 + draw.textlength(name) + 14
  return np.asarray(img)


def write(workdir: str, out: str = '', title: str = '') -> str:
  out = out or os.path.join(workdir, 'pictures', 'learning_curves.png')
  visualize.save_png(out, plot(read_points(workdir), title))
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('workdir')
  p.add_argument('--out', default='', help='PNG path (default: '
                 'WORKDIR/pictures/learning_curves.png)')
  p.add_argument('--title', default='')
  args = p.parse_args(argv)
  print(write(args.workdir, args.out, args.title))


if __name__ == '__main__':
  main()
