"""Issue 36's evaluation-only levers on a trained workdir: maps
standardised per position by the held-out good images, and image scores
that can see a defect of 0.1 % of the image.

    python -m rcae_jax.tools.map_screen --workdir W [--out W/map_screen.json]

Scores the workdir's test set at the model's resolution (as
fusion_report) with every map below, and, for each, every image score:
- maps: 'crd', 'recursion', 'sum/q0.5' (fusion_report's candidates) and
  each of them standardised per pixel position, '<map>/pos_z':
  (m - mu(p)) / (sd(p) + eps), mu and sd over the held-out good images'
  maps at position p (sd Gaussian-smoothed, sigma POS_SIGMA px), eps a tenth
  of the median sd. On parts seen in one pose (a tire, a capsule) an
  edge or a highlight that is always there is then normal where it
  always is;
- image scores: 'box_max' (the maximum of the eval.smoothing_size box
  filter, zero-padded: today's), 'box_max_border' (the same box filter
  divided by the number of in-image pixels under it: the zero padding no
  longer lowers the smoothed map along the border) and 'top_mean' (the mean of the top TOP_FRACTION
  of the map's pixels).
The normalisers come from the held-out good images only; no test label
forms a map or a score. Prints a table; writes the JSON report.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

from rcae_jax import config_files
from rcae_jax import run as run_lib
from rcae_jax.evaluation import metrics
from rcae_jax.evaluation import scoring
from rcae_jax.serving import params as params_lib
from rcae_jax.tools import fusion_report

POS_SIGMA = 2.0
TOP_FRACTION = 0.001
BASE_MAPS = ('crd', 'recursion', 'sum/q0.5')
SCORES = ('box_max', 'box_max_border', 'top_mean')


def positional_z(maps: np.ndarray, val_maps: np.ndarray) -> np.ndarray:
  """`maps` standardised by the held-out maps' per-position mean and sd."""
  # The mean as it is (a sharp edge that is always there stays sharp);
  # the sd smoothed, since ~20 images estimate it noisily.
  mu = val_maps.mean(axis=0)
  sd = np.asarray(scoring.gaussian_blur(val_maps.std(axis=0)[None],
                                        POS_SIGMA))[0]
  eps = 0.1 * float(np.median(sd)) + 1e-12
  return (maps - mu) / (sd + eps)


def image_scores(maps: np.ndarray, eval_cfg) -> dict:
  """{SCORES name: [n] image scores} through evaluation/scoring.py."""
  def score(**fields):
    cfg = eval_cfg.copy_and_resolve_references()
    cfg.update(fields)
    return np.asarray(scoring.image_scores(maps, cfg))
  return {'box_max': score(image_score='max', smoothing='box'),
          'box_max_border': score(image_score='max', smoothing='box_valid'),
          'top_mean': score(image_score='top_mean',
                            top_fraction=TOP_FRACTION)}


def make_report(params, loader, config) -> dict:
  crd, rec = (fusion_report.map_splits(params, loader, config, s)
              for s in ('crd', 'recursion'))
  labels, masks = crd['test'][1], crd['test'][2]
  extents = loader.extents('val')
  val_pixels = [fusion_report.valid_pixels(m['val'][0], extents)
                for m in (crd, rec)]
  test = fusion_report.candidates(crd['test'][0], rec['test'][0], *val_pixels)
  val = fusion_report.candidates(crd['val'][0], rec['val'][0], *val_pixels)
  rows = {}
  for name in BASE_MAPS:
    for variant, maps in ((name, test[name]),
                          (f'{name}/pos_z', positional_z(test[name],
                                                         val[name]))):
      row = {'pixel_auroc': metrics.auroc(masks, maps),
             'au_pro': metrics.au_pro(list(masks), list(maps),
                                      config.eval.pro_fpr_limit)}
      for score, values in image_scores(maps, config.eval).items():
        row[f'image_auroc/{score}'] = metrics.auroc(labels, values)
      rows[variant] = {k: float(v) for k, v in row.items()}
  return {'category': loader.files.category, 'num_test_images': len(labels),
          'num_held_out_images': len(extents), 'rows': rows}


def format_table(report: dict) -> str:
  keys = ['pixel_auroc', 'au_pro'] + [f'image_auroc/{s}' for s in SCORES]
  lines = [f"{report['category']}: model resolution; normalisers from "
           f"{report['num_held_out_images']} held-out good images",
           '| map | ' + ' | '.join(keys) + ' |',
           '|---' * (len(keys) + 1) + '|']
  for name, row in report['rows'].items():
    lines.append(f'| {name} | ' + ' | '.join(f'{row[k]:.4f}' for k in keys)
                 + ' |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  config = config_files.get_config(os.path.join(args.workdir, 'config.json'))
  config.mode = 'evaluate'
  params = jax.device_get(params_lib.load_params(config, args.workdir))
  loader = run_lib.prepare(config, args.workdir)
  report = make_report(params, loader, config)
  out = args.out or os.path.join(args.workdir, 'map_screen.json')
  with open(out, 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=1)
  print(format_table(report))


if __name__ == '__main__':
  main()
