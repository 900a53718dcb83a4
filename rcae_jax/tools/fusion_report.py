"""Which pixel map to score with: CRD's, the recursion error's, or both.

`--config.mode=fusion_report` loads a trained workdir (all three stages)
and scores its test set with each candidate map below, at the model's
resolution (as the learning curves), with the configured image score
(`eval.image_score`, `eval.smoothing`). run.py writes the report to
`<workdir>/fusion_report.json` and prints it as a table. docs/studies/
2026-11-30-accuracy-study.md ("Fusing the CRD and recursion maps") ran it on the three shared
categories under a selection rule written first.

Candidates (ours; the paper scores with CRD's M_A alone, docs/method.md):
- 'crd' (c) and 'recursion' (r, `eval.recursion_reduce`, `eval.map_sigma`):
  the two maps `eval.scoring` offers;
- 'product': c * r, which needs no normaliser (a pixel ranks high only
  where both maps are high);
- 'sum/qQ' and 'max/qQ': c / s_c + r / s_r and max(c / s_c, r / s_r), each
  map divided by its Q-quantile over the held-out good images' pixels, so
  that the two count alike on normal parts;
- 'sum/z': the sum of z-scores (held-out mean and standard deviation).
The normalisers come from the held-out good images ('val'), never from a
test label.
"""

from __future__ import annotations

import numpy as np

from rcae_jax.data import geometry
from rcae_jax.evaluation import scoring
from rcae_jax.evaluation import maps as maps_lib
from rcae_jax.evaluation import loops
from rcae_jax.evaluation import metrics

QUANTILES = (0.5, 0.99, 0.999)
KEYS = ('image_auroc', 'pixel_auroc', 'au_pro')


def candidates(crd, rec, crd_val, rec_val) -> dict:
  """{name: maps} of the test maps `crd`, `rec` ([n, H, W]); `crd_val`,
  `rec_val`: the held-out good images' valid pixels (1-D)."""
  tiny = np.float32(1e-12)  # A saturated sigmoid can have a 0 quantile.
  out = {'crd': crd, 'recursion': rec, 'product': crd * rec}
  for q in QUANTILES:
    sc = max(np.quantile(crd_val, q), tiny)
    sr = max(np.quantile(rec_val, q), tiny)
    out[f'sum/q{q}'] = crd / sc + rec / sr
    out[f'max/q{q}'] = np.maximum(crd / sc, rec / sr)
  out['sum/z'] = ((crd - crd_val.mean()) / max(crd_val.std(), tiny)
                  + (rec - rec_val.mean()) / max(rec_val.std(), tiny))
  return out


def map_splits(params, loader, config, scoring: str) -> dict:
  """{split: (maps, labels, model-size masks)} of 'test' and 'val' under
  `scoring`, through one compiled predict function."""
  cfg = config.copy_and_resolve_references()
  cfg.eval.scoring = scoring
  predict_fn = maps_lib.make_predict_fn(cfg)
  out = {}
  for split in ('test', 'val'):
    maps, _, labels, masks, _ = loops.run_predictions(
        params, loader, cfg, split, predict_fn)
    out[split] = (np.asarray(maps), labels, masks)
  return out


def valid_pixels(maps, extents) -> np.ndarray:
  """The valid region's pixels of every map, as one 1-D array."""
  return np.concatenate([geometry.crop(m, e).ravel()
                         for m, e in zip(maps, extents)])


def score(maps, labels, masks, extents, eval_cfg) -> dict:
  """Image AUROC, pixel AUROC, AU-PRO and their mean for one map."""
  valid = geometry.valid_mask(np.asarray(extents), maps.shape[1:])
  scores = np.asarray(scoring.image_scores(maps, eval_cfg, valid))
  masks, maps = loops.valid_regions(masks, maps, extents)
  result = metrics.compute_metrics(labels, scores, masks=masks, maps=maps,
                                   fpr_limit=eval_cfg.pro_fpr_limit)
  row = {k: float(result[k]) for k in KEYS}
  row['mean'] = float(np.mean([row[k] for k in KEYS]))
  return row


def make_report(params, loader, config) -> dict:
  crd, rec = (map_splits(params, loader, config, s)
              for s in ('crd', 'recursion'))
  (crd_test, labels, masks), rec_test = crd['test'], rec['test'][0]
  val_extents = loader.extents('val')
  crd_val, rec_val = (valid_pixels(m['val'][0], val_extents)
                      for m in (crd, rec))
  extents = loader.extents('test')
  rows = {name: score(maps, labels, masks, extents, config.eval)
          for name, maps in candidates(crd_test, rec_test, crd_val,
                                       rec_val).items()}
  return {'category': loader.files.category,
          'num_test_images': int(len(labels)),
          'num_held_out_images': len(val_extents), 'candidates': rows}


def format_table(report: dict) -> str:
  lines = [f"{report['category']}: {report['num_test_images']} test images, "
           f"normalisers from {report['num_held_out_images']} held-out good "
           'images; model resolution',
           '| map | image AUROC | pixel AUROC | AU-PRO | mean |',
           '|---|---|---|---|---|']
  for name, r in report['candidates'].items():
    lines.append(f"| {name} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f}"
                 f" | {r['au_pro']:.4f} | {r['mean']:.4f} |")
  return '\n'.join(lines)
