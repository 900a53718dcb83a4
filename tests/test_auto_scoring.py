"""eval.scoring='auto': the map a workdir deploys, chosen on realistic
pseudo-anomalies pasted into held-out good images, and read back by
predict."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import evaluated_copy, set_fields

from rcae_jax import run as run_lib
from rcae_jax import validate
from rcae_jax.evaluation import scoring_choice
from rcae_jax.serving import params as params_lib
from rcae_jax.training import proxy_anomalies


def _with(config, **fields):
  return set_fields(config.copy_and_resolve_references(), **fields)


@pytest.fixture(scope='module')
def auto(trained, tmp_path_factory):
  """(config, workdir): a copy of the trained workdir evaluated with
  scoring='auto'."""
  return evaluated_copy(trained, tmp_path_factory, 'auto',
                        **{'eval.scoring': 'auto'})


def _row(mean):
  return {'pixel_auroc': mean, 'pixel_ap': mean, 'mean': mean}


def test_choice_is_the_best_proxy_mean_and_ties_keep_crd():
  rows = {'crd': _row(0.6), 'fused': _row(0.7), 'recursion': _row(0.9)}
  assert scoring_choice.choose(rows) == 'recursion'
  rows['crd'] = _row(0.9)
  assert scoring_choice.choose(rows) == 'crd'


def test_proxy_scores_rank_the_maps():
  masks = np.zeros((2, 8, 8), bool)
  masks[0, 2:4, 2:4] = True
  valid = np.ones_like(masks)
  right = masks.astype(np.float32)
  assert scoring_choice.proxy_scores(right, masks, valid)['mean'] == 1.0
  wrong = 1 - right
  assert scoring_choice.proxy_scores(wrong, masks, valid)['mean'] < 0.2
  # Pixels outside `valid` (keep-aspect padding) never count.
  valid[0, 2:4, 2:4] = False
  valid[0, 0, 0] = valid[1, 0, 0] = True
  with pytest.raises(ValueError):  # No positive pixel left.
    scoring_choice.proxy_scores(right, masks, valid)


def test_proxy_set_is_realistic_deterministic_and_labelled_where_changed(
    make_config):
  config = make_config()
  rng = np.random.default_rng(0)
  images = rng.integers(60, 200, (6, 32, 32, 3), np.uint8)
  xs, masks = proxy_anomalies.proxy_set(images, config.anomalies, draws=2)
  assert xs.shape == (12, 32, 32, 3) and masks.shape == (12, 32, 32)
  again = proxy_anomalies.proxy_set(images, config.anomalies, draws=2)
  np.testing.assert_array_equal(xs, again[0])
  # Outside the mask every pixel is the input's (the realistic contract).
  original = np.concatenate([images, images]).astype(np.float32) / 255.0
  np.testing.assert_array_equal(xs[~masks], original[~masks])
  assert masks.any() and masks.mean() < 0.2


def test_evaluate_writes_the_choice_and_scores_with_it(auto):
  config, workdir = auto
  stored = json.load(open(os.path.join(workdir, scoring_choice.FILE)))
  assert set(stored['proxy']) == set(scoring_choice.CANDIDATES)
  assert stored['choice'] == scoring_choice.choose(stored['proxy'])
  assert stored['num_held_out_images'] > 0
  metrics = json.load(open(os.path.join(workdir, 'metrics.json')))
  (category,) = metrics
  assert metrics[category]['scoring'] == stored['choice']


def test_predict_uses_the_stored_choice(auto, tmp_path):
  config, workdir = auto
  choice = json.load(open(os.path.join(workdir,
                                       scoring_choice.FILE)))['choice']
  folder = tmp_path / 'in'
  folder.mkdir()
  rng = np.random.default_rng(1)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(
        folder / f'{i}.png')
  scores = {}
  for scoring in ('auto', choice):
    cfg = _with(config, **{'mode': 'predict', 'predict.inputs': str(folder),
                           'predict.output': str(tmp_path / scoring),
                           'eval.scoring': scoring})
    rows = run_lib.run(cfg, workdir)['predictions']
    scores[scoring] = [r['score'] for r in sorted(rows,
                                                  key=lambda r: r['name'])]
  np.testing.assert_allclose(scores['auto'], scores[choice], rtol=1e-6)


def test_a_missing_choice_names_what_to_run(auto, tmp_path):
  config, workdir = auto
  bare = str(tmp_path / 'wd')
  shutil.copytree(workdir, bare)
  os.remove(os.path.join(bare, scoring_choice.FILE))
  cfg = _with(config, **{'mode': 'predict', 'predict.inputs': str(tmp_path),
                         'eval.scoring': 'auto'})
  with pytest.raises(validate.ConfigError,
                     match='scoring_choice.json is missing') as e:
    run_lib.run(cfg, bare)
  assert '--config.mode=evaluate' in str(e.value)


@pytest.mark.parametrize('fields, message', [
    ({'eval.scoring': 'auto', 'train.stage3.steps': 0}, 'needs stage 3'),
    ({'eval.scoring': 'auto', 'data.tile_size': 16}, 'tiled runs'),
])
def test_auto_config_checks(make_config, fields, message):
  with pytest.raises(validate.ConfigError, match=message):
    validate.validate(make_config(**fields))


def test_the_choice_never_reads_a_test_image(auto, tmp_path):
  """Label-free by construction: choose_scoring reads the held-out good
  images ('val') and nothing of the test split."""
  config, workdir = auto
  loader = run_lib.prepare(config, workdir)
  asked = []

  class ValOnly:
    def __getattr__(self, name):
      return getattr(loader, name)

    def test_batches(self, batch_size, split='test'):
      asked.append(split)
      return loader.test_batches(batch_size, split=split)

    def extents(self, split='test'):
      asked.append(split)
      return loader.extents(split)

  params = jax.device_get(params_lib.load_params(config, workdir))
  out = str(tmp_path / 'wd')
  os.makedirs(out)
  chosen = scoring_choice.choose_scoring(
      params, ValOnly(), _with(config, **{'eval.scoring': 'auto'}), out,
      lambda images: proxy_anomalies.proxy_set(images, config.anomalies,
                                               draws=1))
  assert asked and set(asked) == {'val'}
  assert chosen.eval.scoring in scoring_choice.CANDIDATES


def test_no_proxy_evidence_keeps_the_papers_map():
  assert scoring_choice.choose({}) == 'crd'
