"""The proxy set of `eval.scoring='auto'` and the choice made on it
(evaluation/scoring_choice.py says why).

Proxy: every held-out good image ('val' split) `DRAWS` times, each draw
with pseudo-anomalies of `anomalies.style='realistic'` (irregular blobs,
scars and rectangles in the part's own colours or its own texture,
labelled only where the change is visible). CRD trains on the recipe's
'paper' style, so this family is new to it, as real defects are. The
draws use fixed keys: the same workdir always makes the same proxy set.

Lives in training/ because it uses the stage-3 synthesizer; inference
only ever reads the choice back (scoring_choice.resolve).
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from rcae_jax.common import fileio
from rcae_jax.data import geometry
from rcae_jax.evaluation import maps as maps_lib
from rcae_jax.evaluation import scoring_choice
from rcae_jax.evaluation import thresholds as thresholds_lib
from rcae_jax.model import inference
from rcae_jax.training import anomalies

DRAWS = 4
# Keys of the draws: independent of the run's seed, so that two runs of a
# category are compared on the same proxy set.
PROXY_SEED = 20261207


def held_out_images(loader, batch_size: int):
  """uint8 images [n, H, W, 3] and extents [n, 2] of the 'val' split."""
  images = [np.asarray(b['image'])[np.asarray(b['valid'], bool)]
            for b in loader.test_batches(batch_size, split='val')]
  return np.concatenate(images), np.asarray(loader.extents('val'))


def proxy_set(images: np.ndarray, anomaly_cfg, draws: int = DRAWS):
  """(float images [draws * n, H, W, 3] in [0, 1], bool masks [draws * n,
  H, W]) of `images` with 'realistic' pseudo-anomalies."""
  cfg = anomaly_cfg.copy_and_resolve_references()
  cfg.style = 'realistic'
  x = inference.to_float(images)
  synth = jax.jit(lambda key, x: anomalies.synthesize(key, x, cfg))
  outs = [synth(jax.random.PRNGKey(PROXY_SEED + d), x) for d in range(draws)]
  xs = np.concatenate([np.asarray(o[0]) for o in outs])
  masks = np.concatenate([np.asarray(o[1])[..., 0] > 0.5 for o in outs])
  return xs, masks


def candidate_maps(params, xs, config, normalisers) -> np.ndarray:
  """The map of `config`'s scoring for every proxy image, [M, H, W], in
  batches of eval.batch_size (the last one padded: one program)."""
  predict_fn = maps_lib.make_predict_fn(config, normalisers=normalisers)
  params = maps_lib.place_params(predict_fn, params)
  size = config.eval.batch_size
  out = []
  for start in range(0, len(xs), size):
    chunk = xs[start:start + size]
    pad = size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, 0)])
    out.append(np.asarray(maps_lib.map_score_fn(predict_fn)(params,
                                                            chunk)['map']))
  return np.concatenate(out)[:len(xs)]


def choose_scoring(params, loader, config, workdir: str):
  """Scores the proxy set with every candidate map, writes the choice and
  the proxy's numbers to <workdir>/scoring_choice.json, and returns
  `config` scoring with the chosen map."""
  images, extents = held_out_images(loader, config.eval.batch_size)
  xs, masks = proxy_set(images, config.anomalies)
  hw = xs.shape[1:3]
  valid = np.tile(np.asarray(geometry.valid_mask(extents, hw)),
                  (DRAWS, 1, 1))
  rows = {}
  for name in scoring_choice.CANDIDATES:
    cfg = scoring_choice.with_scoring(config, name)
    # 'fused' divides by medians of the held-out good images' maps; they
    # are written beside thresholds.json as evaluation would.
    normalisers = thresholds_lib.fusion_normalisers(params, loader, cfg,
                                                    workdir)
    rows[name] = scoring_choice.proxy_scores(
        candidate_maps(params, xs, cfg, normalisers), masks, valid)
  choice = scoring_choice.choose(rows)
  record = {'choice': choice, 'proxy': rows,
            'num_held_out_images': int(len(images)), 'draws': DRAWS,
            'proxy_style': 'realistic',
            'positive_pixel_fraction': float(masks[valid].mean())}
  if jax.process_index() == 0:
    fileio.write_json_atomic(scoring_choice.path(workdir), record)
  logging.info("eval.scoring='auto' chose %r on %d held-out good images "
               'x %d proxy draws: %s', choice, len(images), DRAWS,
               ', '.join(f"{k} {v['mean']:.4f}" for k, v in rows.items()))
  return scoring_choice.with_scoring(config, choice)
