"""Does CRD read the recursion, or segment the input? A shortcut check.

`--config.mode=shortcut_report` loads a trained workdir (all three stages)
and scores its test set, at the model's resolution with the configured
image score (`eval.image_score`, `eval.smoothing`), with four maps:
- 'crd_real': CRD's map as evaluation computes it, fed the real I_D^n;
- 'crd_input': CRD fed I in place of every I_D^n (a zero residual: no
  recursion information, the input unchanged);
- 'crd_grey': CRD fed flat grey (0.5) in place of every I_D^n;
- 'recursion': the recursion map (`eval.recursion_reduce`,
  `eval.map_sigma`), the evidence CRD is meant to read.
The networks are the trained ones; only CRD's input changes. 'deltas' are
'crd_real' minus each replacement: if CRD used the recursion, taking it
away would cost it. The issue's target: each replacement lowers pixel
AUROC and AU-PRO by at least TARGET_DROP ('meets_target').

'depth_ratios' reuses depth_report.summarize: per depth, the mean
|I_R^n - I| (before DPN, 'rcae') and |I_D^n - I| (after, 'dpn') on defect
pixels and elsewhere, and their ratio. A DPN ratio near 1 where RcAE's is
well above it means DPN draws the defects back.

run.py writes the report to `<workdir>/shortcut_report.json` and prints it
as tables; docs/studies/2026-12-04-shortcut-diagnostics.md says how to
read it.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from rcae_jax.common import checkpoints
from rcae_jax.common import fileio
from rcae_jax.common.errors import ConfigError
from rcae_jax.data import folder
from rcae_jax.evaluation import loops
from rcae_jax.evaluation import maps as maps_lib
from rcae_jax.model import inference
from rcae_jax.tools import depth_report
from rcae_jax.tools import fusion_report

GREY = 0.5
# CRD's rows: what it is fed in place of every I_D^n.
REPLACEMENTS = ('input', 'grey')
ROWS = ('crd_real', 'crd_input', 'crd_grey', 'recursion')
KEYS = fusion_report.KEYS + ('mean',)
# The yardstick: taking the recursion away must cost CRD at least
# this much pixel AUROC and AU-PRO.
TARGET_DROP = 0.05
TARGET_KEYS = ('pixel_auroc', 'au_pro')


def require_stage3(workdir: str) -> None:
  """Refuses, in one line, a workdir whose training finished without
  stage 3 (its completion marker records the last stage trained); its CRD
  is untrained. (A config without stage 3 is refused by validate.)"""
  marker = os.path.join(workdir, 'checkpoints', checkpoints.COMPLETE_MARKER)
  if not fileio.exists(marker):
    return  # Unfinished: run.py's own warning applies to every mode.
  stage = fileio.read_json(marker).get('stage', 3)
  if stage < 3:
    raise ConfigError(
        f"config.mode='shortcut_report' needs a trained CRD, but {workdir} "
        f'finished training at stage {stage}: train stage 3 first '
        '(--config.mode=train with config.train.stage3.steps > 0)')


def crd_inputs(dets: jax.Array, x: jax.Array) -> dict:
  """What CRD is fed in place of the stack I_D^n [N, B, H, W, C]."""
  return {'real': dets,
          'input': jnp.broadcast_to(x[None], dets.shape),
          'grey': jnp.full_like(dets, GREY)}


def batch_maps(params, images, *, nets, config, use_dpn: bool) -> dict:
  """Every row's map [B, H, W] and the per-depth errors [B, N, H, W] of
  one batch, from one forward pass of RcAE and DPN."""
  x = inference.to_float(images)
  recs = inference.reconstructions(nets, params, x)
  dets = inference.details(nets, params, recs, x, use_dpn)
  out = {f'crd_{name}': maps_lib.crd_map(nets, params, d, x,
                                          config.eval.crd_sigma)
         for name, d in crd_inputs(dets, x).items()}
  out['recursion'] = maps_lib.recursion_map(dets, x, config.eval)
  # depth_report's per-depth errors, from the same forward pass.
  out.update(depth_report.depth_error_maps(recs, dets if use_dpn else None,
                                           x))
  return out


def deltas(rows: dict) -> dict:
  """'crd_real' minus each replacement, per metric."""
  real = rows['crd_real']
  return {f'crd_{r}': {k: real[k] - rows[f'crd_{r}'][k] for k in KEYS}
          for r in REPLACEMENTS}


def meets_target(delta: dict) -> dict:
  """Per replacement: did it lower every TARGET_KEYS metric by at least
  TARGET_DROP?"""
  return {name: all(d[k] >= TARGET_DROP for k in TARGET_KEYS)
          for name, d in delta.items()}


def make_report(params, loader, config) -> dict:
  nets = inference.build_networks(config.model)
  use_dpn = inference.uses_dpn(config)
  fn = jax.jit(functools.partial(batch_maps, nets=nets, config=config,
                                 use_dpn=use_dpn))
  out = loops.collect(loader, config.eval.batch_size,
                      lambda batch, _: fn(params, batch['image']))
  labels, masks = out['label'], out['mask']
  defects = masks.astype(bool)
  if not defects.any() or defects.all():
    raise folder.DataError('shortcut_report needs test masks with both '
                           'defect and good pixels')
  extents = loader.extents('test')
  rows = {name: fusion_report.score(out[name], labels, masks, extents,
                                    config.eval) for name in ROWS}
  delta = deltas(rows)
  ratios = depth_report.depth_ratios(out, defects)
  size = config.data.image_size
  return {'category': loader.files.category,
          'num_test_images': int(len(labels)),
          'image_size': size if isinstance(size, int) else list(size),
          'pixel_resolution': 'model', 'grey_value': GREY,
          'rows': rows, 'deltas': delta,
          'target': {'min_drop': TARGET_DROP, 'metrics': list(TARGET_KEYS),
                     'met': meets_target(delta)},
          'depth_ratios': ratios}


def format_table(report: dict) -> str:
  lines = [f"{report['category']}: {report['num_test_images']} test images "
           f"at {report['image_size']} px (model resolution)",
           '| map | image AUROC | pixel AUROC | AU-PRO | mean |',
           '|---|---|---|---|---|']
  for name, r in report['rows'].items():
    lines.append(f"| {name} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f}"
                 f" | {r['au_pro']:.4f} | {r['mean']:.4f} |")
  target = report['target']
  lines += ['', f"crd_real minus each replacement (target: >= "
            f"{target['min_drop']} on pixel AUROC and AU-PRO)",
            '| replaced by | image AUROC | pixel AUROC | AU-PRO | mean | '
            'target met |', '|---|---|---|---|---|---|']
  for name, d in report['deltas'].items():
    lines.append(f"| {name} | {d['image_auroc']:+.4f} | "
                 f"{d['pixel_auroc']:+.4f} | {d['au_pro']:+.4f} | "
                 f"{d['mean']:+.4f} | {'yes' if target['met'][name] else 'no'}"
                 ' |')
  lines += ['', depth_report.format_table(
      dict(report['depth_ratios'], image_size=report['image_size']))]
  return '\n'.join(lines)
