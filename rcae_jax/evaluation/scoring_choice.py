"""`eval.scoring='auto'` (ours): which map a workdir deploys, chosen on
held-out good images only, and read back by every mode that scores.

CRD's map is only worth deploying where it beats the recursion error it
is given, and on some categories it does not (docs/results.md, round
three: on MVTec 3D-AD tire CRD's map falls far below its own recursion
map). No test label may decide which map to use, so the choice is made
on a proxy: the held-out good images (`data.val_fraction` of train/good)
with pseudo-anomalies of a family CRD was not trained on (training/
proxy_anomalies.py makes them), scored by each candidate map. The
candidate with the best mean of pixel AUROC and pixel AP there wins.

This module holds what inference needs: the file, the pure choice and
`resolve`, which turns a config with 'auto' into one with the stored
choice (predict, export and the report modes call it). The proxy set is
made, and the choice written, by training/proxy_anomalies.py.
"""

from __future__ import annotations

import os

import numpy as np

from rcae_jax.common import fileio
from rcae_jax.common.errors import ConfigError
from rcae_jax.evaluation import metrics

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
  ties go to the earlier name of CANDIDATES."""
  return max((n for n in CANDIDATES if n in rows),
             key=lambda n: (rows[n]['mean'], -CANDIDATES.index(n)))


def resolve(config, workdir: str):
  """`config` with eval.scoring='auto' replaced by the workdir's stored
  choice; any other config as it is. A missing choice is one line that
  says what to run."""
  if config.eval.scoring != 'auto':
    return config
  where = path(workdir)
  if not fileio.exists(where):
    raise ConfigError(
        f"{where} is missing: config.eval.scoring='auto' deploys the map "
        'that evaluation chose on the held-out good images; run '
        '--config.mode=evaluate on this workdir first')
  return with_scoring(config, fileio.read_json(where)['choice'])


def with_scoring(config, scoring: str):
  """A copy of `config` scoring with `scoring`."""
  config = config.copy_and_resolve_references()
  config.eval.scoring = scoring
  return config
