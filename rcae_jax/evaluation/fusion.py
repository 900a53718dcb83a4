"""The fused pixel map, `eval.scoring='fused'` (ours), and its normalisers.

    fused = M_A / s_c + M_R / s_r

M_A is CRD's map, M_R the recursion map (`eval.recursion_reduce`,
`eval.map_sigma`), s_c and s_r their medians over the valid pixels of the
held-out good images (the 'val' split that thresholds come from; never a
test image). Dividing by the medians puts both maps on one scale on normal
parts, so neither decides alone. The fusion screen (tools/fusion_report.py
candidate 'sum/q0.5'; docs/studies/2026-11-30-accuracy-study.md)
selected this form.

Where the medians live: `evaluate` with scoring='fused' computes them first
(thresholds.fusion_normalisers), writes <workdir>/fusion_normalisers.json
beside thresholds.json, and then chooses the thresholds from the fused map.
`predict` and `export` read the file back (`for_config`); export closes
over the two numbers, so they are constants inside the artefact, and lists
them in model.json.
"""

from __future__ import annotations

import os

import numpy as np

from rcae_jax.common import fileio

FILE = 'fusion_normalisers.json'
QUANTILE = 0.5  # The median: the screen's 'sum/q0.5'.
# A saturated sigmoid can have a zero median; never divide by zero.
TINY = 1e-12
# Same cost as real normalisers, for programs whose maps nobody reads
# (benchmarks).
UNIT = {'crd': 1.0, 'recursion': 1.0}


def fuse(crd_map, recursion_map, normalisers):
  """M_A / s_c + M_R / s_r (jnp or numpy maps of one shape)."""
  if normalisers is None:
    raise ValueError("eval.scoring='fused' needs the normalisers "
                     f'({FILE}; fusion.for_config)')
  return (crd_map / normalisers['crd']
          + recursion_map / normalisers['recursion'])


def normalisers_from(crd_pixels, recursion_pixels) -> dict:
  """{'crd': s_c, 'recursion': s_r} from the held-out good images' valid
  pixels of each map (1-D arrays)."""
  return {name: max(float(np.quantile(pixels, QUANTILE)), TINY)
          for name, pixels in (('crd', crd_pixels),
                               ('recursion', recursion_pixels))}


def path(workdir: str) -> str:
  return os.path.join(workdir, FILE)


def for_config(config, workdir: str):
  """The stored normalisers when `config` scores with 'fused', else None.
  A missing file is one line that says what to run."""
  if config.eval.scoring != 'fused':
    return None
  stored = fileio.read_stored(
      path(workdir), "config.eval.scoring='fused' needs the normalisers "
      'that evaluation computes',
      '--config.mode=evaluate --config.eval.scoring=fused')
  return {k: float(stored[k]) for k in UNIT}
