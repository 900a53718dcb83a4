"""`eval.scoring='auto'` (ours): which map a workdir deploys, chosen on
held-out good images only, and read back by every mode that scores.

CRD's map is only worth deploying where it beats the recursion error it
is given, and on some categories it does not (docs/studies/
2026-12-07-accuracy-round-three.md: on MVTec 3D-AD tire CRD's map falls far below its own recursion
map). No test label may decide which map to use, so the choice is made
on a proxy: the held-out good images (`data.val_fraction` of train/good)
with pseudo-anomalies of a family CRD was not trained on (training/
proxy_anomalies.py makes them), scored by each candidate map. The
candidate with the best mean of pixel AUROC and pixel AP there wins.

Here: the choice on a proxy set (`choose_scoring`; run.py hands it
training/proxy_anomalies.proxy_set, which makes the pseudo-anomalies) and
`resolve`, which turns a config with 'auto' into one with the stored
choice (predict, export and the report modes call it).
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from rcae_jax.common import fileio
from rcae_jax.data import geometry
from rcae_jax.evaluation import fusion
from rcae_jax.evaluation import maps as maps_lib
from rcae_jax.evaluation import metrics
from rcae_jax.evaluation import thresholds as thresholds_lib

FILE = 'scoring_choice.json'
# The maps 'auto' chooses among, in the order ties are broken (the
# paper's map first).
CANDIDATES = ('crd', 'fused', 'recursion')


def path(workdir: str) -> str:
  return os.path.join(workdir, FILE)


def proxy_scores(maps: np.ndarray, masks: np.ndarray,
                 valid: np.ndarray) -> dict:
  """Pixel AUROC, pixel AP and their mean of one candidate's maps [M, H, W]
  against the proxy masks (bool [M, H, W]) over the `valid` pixels."""
  labels, scores = masks[valid], maps[valid]
  row = {'pixel_auroc': metrics.auroc(labels, scores),
         'pixel_ap': metrics.average_precision(labels, scores)}
  row['mean'] = float(np.mean(list(row.values())))
  return row


def choose(rows: dict) -> str:
  """The candidate whose proxy mean is highest ({name: proxy_scores});
  ties, and no rows at all, go to the earlier name of CANDIDATES."""
  return max(CANDIDATES, key=lambda n: (rows[n]['mean'] if n in rows
                                          else -1.0, -CANDIDATES.index(n)))


def resolve(config, workdir: str):
  """`config` with eval.scoring='auto' replaced by the workdir's stored
  choice; any other config as it is. A missing choice is one line that
  says what to run."""
  if config.eval.scoring != 'auto':
    return config
  stored = fileio.read_stored(
      path(workdir), "config.eval.scoring='auto' deploys the map that "
      'evaluation chose on the held-out good images', '--config.mode=evaluate')
  return with_scoring(config, stored['choice'])


def with_scoring(config, scoring: str):
  """A copy of `config` scoring with `scoring`."""
  config = config.copy_and_resolve_references()
  config.eval.scoring = scoring
  return config


def held_out_images(loader, batch_size: int):
  """uint8 images [n, H, W, 3] and extents [n, 2] of the 'val' split."""
  images = [np.asarray(b['image'])[np.asarray(b['valid'], bool)]
            for b in loader.test_batches(batch_size, split='val')]
  return np.concatenate(images), np.asarray(loader.extents('val'))


def candidate_maps(params, xs, config) -> np.ndarray:
  """The map of `config`'s scoring ('crd' or 'recursion') for every proxy
  image, [M, H, W], in batches of eval.batch_size (the last one padded:
  one program)."""
  predict_fn = maps_lib.make_predict_fn(config)
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


def choose_scoring(params, loader, config, workdir: str, make_proxy):
  """Scores the proxy set with every candidate map, writes the choice and
  the proxy's numbers to <workdir>/scoring_choice.json, and returns
  `config` scoring with the chosen map. `make_proxy(images)`: (float
  images [M, H, W, 3], bool masks [M, H, W]), M a multiple of the held-out
  images' count (training/proxy_anomalies.proxy_set)."""
  images, extents = held_out_images(loader, config.eval.batch_size)
  xs, masks = make_proxy(images)
  draws = len(xs) // len(images)
  hw = xs.shape[1:3]
  valid = np.tile(np.asarray(geometry.valid_mask(extents, hw)),
                  (draws, 1, 1))
  rows, visible = {}, bool(masks[valid].any())
  if not visible:
    # Nothing visible was pasted (a tiny or blank held-out split): no
    # evidence against the paper's map, which is kept.
    logging.warning("eval.scoring='auto': the proxy set of %d held-out "
                    'images has no visible pseudo-anomaly; keeping %r',
                    len(images), CANDIDATES[0])
  if visible:
    # Two passes of the networks: 'fused' is those two maps over the
    # medians of the held-out good images' maps (fusion.py), which are
    # written beside thresholds.json as evaluation would.
    maps = {name: candidate_maps(params, xs, with_scoring(config, name))
            for name in ('crd', 'recursion')}
    maps['fused'] = fusion.fuse(maps['crd'], maps['recursion'],
                                thresholds_lib.fusion_normalisers(
                                    params, loader,
                                    with_scoring(config, 'fused'), workdir))
    rows = {name: proxy_scores(maps[name], masks, valid)
            for name in CANDIDATES}
  choice = choose(rows)
  record = {'choice': choice, 'proxy': rows,
            'num_held_out_images': int(len(images)), 'draws': draws,
            'positive_pixel_fraction': float(masks[valid].mean())}
  if jax.process_index() == 0:
    fileio.write_json_atomic(path(workdir), record)
  logging.info("eval.scoring='auto' chose %r on %d held-out good images "
               'x %d proxy draws: %s', choice, len(images), draws,
               ', '.join(f"{k} {v['mean']:.4f}" for k, v in rows.items()))
  return with_scoring(config, choice)
