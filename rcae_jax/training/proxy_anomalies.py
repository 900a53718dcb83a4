"""The proxy set of `eval.scoring='auto'` (evaluation/scoring_choice.py
says why and makes the choice on it).

Proxy: every held-out good image ('val' split) `DRAWS` times, each draw
with pseudo-anomalies of `anomalies.style='realistic'` (irregular blobs,
scars and rectangles in the part's own colours or its own texture,
labelled only where the change is visible). CRD trains on the recipe's
'paper' style, so this family is new to it, as real defects are. The
draws use fixed keys: the same workdir always makes the same proxy set.

Lives in training/ because it uses the stage-3 synthesizer; run.py hands
`proxy_set` to scoring_choice.choose_scoring, so the inference side never
imports training.
"""

from __future__ import annotations

import jax
import numpy as np

from rcae_jax.model import inference
from rcae_jax.training import anomalies

DRAWS = 4
# Keys of the draws: independent of the run's seed, so that two runs of a
# category are compared on the same proxy set.
PROXY_SEED = 20261207


def proxy_set(images: np.ndarray, anomaly_cfg, draws: int = DRAWS):
  """(float images [draws * n, H, W, 3] in [0, 1], bool masks [draws * n,
  H, W]) of `images` with 'realistic' pseudo-anomalies."""
  cfg = anomaly_cfg.copy_and_resolve_references()
  cfg.style = 'realistic'
  # Every draw anomalous: the clean images are already in the proxy's
  # negatives, and a small held-out split must still yield positives.
  cfg.realistic.clean_fraction = 0.0
  x = inference.to_float(images)
  synth = jax.jit(lambda key, x: anomalies.synthesize(key, x, cfg))
  outs = [synth(jax.random.PRNGKey(PROXY_SEED + d), x) for d in range(draws)]
  xs = np.concatenate([np.asarray(o[0]) for o in outs])
  masks = np.concatenate([np.asarray(o[1])[..., 0] > 0.5 for o in outs])
  return xs, masks
