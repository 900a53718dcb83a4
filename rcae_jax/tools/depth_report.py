"""Where the anomaly signal lives: per-depth reconstruction errors on the
test set, before and after DPN.

`--config.mode=depth_report` loads a trained workdir and, for each
recursion depth n, reports the mean |I_R^n - I| (RcAE) and |I_D^n - I|
(after DPN) over defect pixels and over good pixels, and the pixel AUROC of
each of those error maps on its own (model resolution, channel mean, no
smoothing). It answers the questions an ablation raises: does a deeper
recursion separate defects better, does DPN keep the defect residual or
restore the defect along with the detail, and is CRD using the evidence it
is given (compare its pixel AUROC in metrics.json with these). run.py writes
the report to `<workdir>/depth_report.json` and prints it as a table.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from rcae_jax.evaluation import scoring  # pylint: disable=g-import-not-at-top

from rcae_jax.evaluation import loops  # pylint: disable=g-import-not-at-top
from rcae_jax.evaluation import metrics
from rcae_jax.model import inference


def error_maps(params, images, *, nets, use_dpn: bool) -> dict:
  """[B, N, H, W] channel-mean |I_R^n - I| ('rec') and, with DPN,
  |I_D^n - I| ('det'); batch axis first for `loops.collect`."""
  x = inference.to_float(images)
  recs = inference.reconstructions(nets, params, x)
  dets = inference.details(nets, params, recs, x, use_dpn) if use_dpn else None
  return depth_error_maps(recs, dets, x)


def depth_error_maps(recs, dets, x) -> dict:
  """`error_maps` of reconstructions already computed (`dets` None without
  DPN)."""
  out = {'rec': scoring.depth_errors(recs, x).swapaxes(0, 1)}
  if dets is not None:
    out['det'] = scoring.depth_errors(dets, x).swapaxes(0, 1)
  return out


def depth_ratios(rows: dict, masks: np.ndarray) -> dict:
  """The per-depth summaries of `error_maps` rows collected over the test
  set ('rec', and 'det' with DPN) against bool masks."""
  out = {'defect_pixels': int(masks.sum()), 'pixels': int(masks.size),
         'rcae': summarize(rows['rec'].swapaxes(0, 1), masks)}
  if 'det' in rows:
    out['dpn'] = summarize(rows['det'].swapaxes(0, 1), masks)
  return out


def summarize(errors: np.ndarray, masks: np.ndarray) -> list[dict]:
  """Per depth: mean error on defect / good pixels, their ratio, AUROC.

  errors [N, n_images, H, W]; masks bool [n_images, H, W]."""
  rows = []
  for n, e in enumerate(errors, start=1):
    defect, good = float(e[masks].mean()), float(e[~masks].mean())
    rows.append({'depth': n, 'defect_error': defect, 'good_error': good,
                 'ratio': defect / max(good, 1e-12),
                 'pixel_auroc': metrics.auroc(masks.ravel(), e.ravel())})
  return rows


def make_report(params, loader, config) -> dict:
  nets = inference.build_networks(config.model)
  use_dpn = inference.uses_dpn(config)
  fn = jax.jit(functools.partial(error_maps, nets=nets, use_dpn=use_dpn))
  rows = loops.collect(loader, config.eval.batch_size,
                          lambda batch, _: fn(params, batch['image']))
  masks = rows['mask'].astype(bool)
  if not masks.any() or masks.all():
    raise ValueError('depth_report needs test masks with both defect and '
                     'good pixels')
  size = config.data.image_size  # S, or (H, W) as a list in the JSON.
  report = {'image_size': size if isinstance(size, int) else list(size),
            **depth_ratios(rows, masks)}
  return report


def format_table(report: dict) -> str:
  lines = [f"{report['defect_pixels']} defect pixels of {report['pixels']} "
           f"at {report['image_size']} px",
           '| output | depth | error on defects | error elsewhere | ratio | '
           'pixel AUROC |', '|---|---|---|---|---|---|']
  for name in ('rcae', 'dpn'):
    for r in report.get(name, []):
      lines.append(f"| {name} | {r['depth']} | {r['defect_error']:.4f} | "
                   f"{r['good_error']:.4f} | {r['ratio']:.2f} | "
                   f"{r['pixel_auroc']:.4f} |")
  return '\n'.join(lines)
