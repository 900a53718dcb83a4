"""Issue 25's training levers: stage 3's input dropout, CRD's map
smoothing, their config checks, and forking a workdir with a network
whose shapes changed (re-initialised if its stage has not begun)."""

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rcae_jax import run as run_lib
from rcae_jax import validate
from rcae_jax.common import checkpoints
from rcae_jax.evaluation import maps
from rcae_jax.evaluation import scoring
from rcae_jax.model import inference
from rcae_jax.serving import params as params_lib
from rcae_jax.training import loop
from rcae_jax.training import train

from conftest import tiny_config  # pylint: disable=g-import-not-at-top

# A workdir trained through stage 2 only (no CRD yet): what forks copy.
STAGE2 = {'train.stage3.steps': 0, 'eval.scoring': 'recursion',
          'eval.pictures_per_type': 0, 'eval.export_maps': False}


@pytest.fixture(scope='module')
def stage2_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('stage2'))
  run_lib.run(tiny_config(**STAGE2), workdir)
  return workdir


def test_input_dropout_draws_per_sample():
  rng = jax.random.PRNGKey(3)
  assert train.input_keep(rng, 8, 0.0) is None  # Off: CRD's usual input.
  keep = np.asarray(train.input_keep(rng, 4000, 0.3))
  assert set(np.unique(keep)) == {0.0, 1.0}
  assert abs((keep == 0).mean() - 0.3) < 0.03
  np.testing.assert_array_equal(keep, train.input_keep(rng, 4000, 0.3))


def test_crd_sigma_smooths_crds_map(make_config):
  # The smoke networks: their init program is the one every test compiles.
  config = make_config()
  nets = inference.build_networks(config.model)
  params = jax.device_get(train.initial_params(nets, config))
  # CRD's head starts at zero (a flat map): perturb it. (In numpy and with
  # the jitted predict: eager ops compile one tiny program each, ~400 here.)
  rng = np.random.default_rng(0)
  params['crd'] = jax.tree.map(
      lambda p: p + 0.3 * rng.standard_normal(p.shape, np.float32),
      params['crd'])
  images = rng.integers(0, 256, (2, 32, 32, 3), np.uint8)
  raw = maps.make_predict_fn(config, nets)(params, images)['map']
  config.eval.crd_sigma = 2.0
  smooth = maps.make_predict_fn(config, nets)(params, images)['map']
  np.testing.assert_allclose(smooth, scoring.gaussian_blur(raw, 2.0),
                             atol=1e-6)
  assert float(jnp.abs(smooth - raw).max()) > 1e-3


@pytest.mark.parametrize('overrides, message', [
    ({'train.stage3.input_dropout': 0.5}, 'crd_residual'),
    ({'train.stage3.input_dropout': 1.0, 'model.crd_residual': True},
     'input_dropout'),
    ({'model.dpn_guide': 'laplace'}, 'model.dpn_guide'),
    ({'eval.crd_sigma': -1.0}, 'crd_sigma'),
    ({'anomalies.style': 'nice'}, 'anomalies'),
    ({'anomalies.style': 'realistic', 'anomalies.realistic.min_area': 0.0},
     'min_area'),
])
def test_levers_are_validated(make_config, overrides, message):
  with pytest.raises(validate.ConfigError, match=message):
    validate.validate(make_config(**overrides))


def test_levers_all_valid(make_config):
  validate.validate(make_config(**{
      'train.stage3.input_dropout': 0.5, 'model.crd_residual': True,
      'model.dpn_guide': 'blurred_grad', 'eval.crd_sigma': 1.0,
      'anomalies.style': 'realistic'}))


def test_network_fields_may_change_until_their_stage_begins(make_config,
                                                            tmp_path):
  ckpt_dir = str(tmp_path)
  checkpoints.record_model_config(make_config(), ckpt_dir)
  forked = make_config(**{'model.crd_residual': True,
                          'model.dpn_guide': 'grad_mag'})
  check = lambda progress: checkpoints.check_resume_compatible(
      forked, ckpt_dir, progress)
  check({'stage': 1, 'stage_step': 3, 'global_step': 3})
  with pytest.raises(validate.ConfigError, match='model.dpn_guide') as e:
    check({'stage': 2, 'stage_step': 2, 'global_step': 5})
  assert 'crd_residual' not in str(e.value)
  with pytest.raises(validate.ConfigError, match='crd_residual'):
    check({'stage': 3, 'stage_step': 1, 'global_step': 6})
  with pytest.raises(validate.ConfigError, match='crd_residual'):
    check(None)  # Evaluation: everything must match.


def _log(caplog):
  return '\n'.join(r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_fork_after_stage_2_with_new_crd_trains_and_evaluates(
    make_config, stage2_workdir, tmp_path, caplog):
  """The screening workflow: a workdir trained through stage 2 is copied
  and resumed with a CRD of other shapes (crd_residual), input dropout,
  realistic pseudo-anomalies and stage-3 steps: CRD is re-initialised,
  trained and evaluated. Once stage 3 has begun, CRD must match; and DPN,
  trained in stage 2, may not change shape in such a fork."""
  base = STAGE2
  original = str(tmp_path / 'original')
  shutil.copytree(stage2_workdir, original)
  fork = str(tmp_path / 'fork')
  shutil.copytree(original, fork)
  levers = dict(base, **{
      'train.stage3.steps': 2, 'eval.scoring': 'crd',
      'model.crd_residual': True, 'train.stage3.input_dropout': 0.5,
      'anomalies.style': 'realistic', 'eval.crd_sigma': 1.0})
  caplog.set_level(logging.INFO)
  report = run_lib.run(make_config(**levers), fork)
  assert 'Re-initialising CRD' in _log(caplog)
  assert 'Re-initialising DPN' not in _log(caplog)
  assert 'Stage 3 (crd): steps 0..2' in _log(caplog)
  assert checkpoints.training_complete(fork)
  # The forked CRD's map was evaluated, and trained: its head starts at
  # zero, and an untrained CRD maps every pixel alike (pixel AUROC 0.5).
  (metrics,) = report.values()
  assert metrics['scoring'] == 'crd'
  assert abs(metrics['pixel_auroc'] - 0.5) > 1e-3
  saved = json.load(open(os.path.join(fork, 'checkpoints',
                                      checkpoints.MODEL_CONFIG)))
  assert saved['model.crd_residual'] is True
  # Stage 3 has begun: CRD is trained and must match from now on.
  with pytest.raises(validate.ConfigError, match='crd_residual'):
    run_lib.run(make_config(**dict(levers, **{
        'model.crd_residual': False, 'train.stage3.input_dropout': 0.0,
        'train.stage3.steps': 4})), fork)
  # DPN is trained at the end of stage 2: a new guide is refused.
  with pytest.raises(validate.ConfigError, match='dpn_guide'):
    run_lib.run(make_config(**dict(levers, **{'model.dpn_guide':
                                              'grad_mag'})), original)


@pytest.mark.slow
def test_shape_check_refuses_a_trained_network_without_model_config(
    make_config, stage2_workdir, tmp_path):
  """Without model_config.json (nothing to compare the fields with) the
  shapes still decide: a trained DPN of other shapes is a ConfigError, and
  the checkpoints are not taken for damaged ones and moved aside."""
  base = STAGE2
  workdir = str(tmp_path / 'wd')
  shutil.copytree(stage2_workdir, workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  os.remove(os.path.join(ckpt_dir, checkpoints.MODEL_CONFIG))
  steps = sorted(os.listdir(ckpt_dir))
  with pytest.raises(validate.ConfigError, match='DPN'):
    loop.train_and_checkpoint(
        make_config(**dict(base, **{'model.dpn_guide': 'grad_mag',
                                    'train.stage3.steps': 2})),
        workdir, loader=None)
  assert sorted(os.listdir(ckpt_dir)) == steps


def test_inference_refuses_other_shapes_a_field_added_since_would_build(
    make_config, stage2_workdir, tmp_path):
  """A workdir trained before a model field existed has no value for it in
  model_config.json, so that check lets any value pass; a config whose
  value builds other shapes (configs/cpu_real.py's CRD reading the
  residual, on a workdir trained before that field) must be refused by the
  shapes, in one line, not fail in the forward pass."""
  workdir = str(tmp_path / 'wd')
  shutil.copytree(stage2_workdir, workdir)
  path = os.path.join(workdir, 'checkpoints', checkpoints.MODEL_CONFIG)
  with open(path, encoding='utf-8') as f:
    saved = json.load(f)
  del saved['model.crd_residual']  # As written before the field existed.
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(saved, f)
  params = params_lib.load_params(make_config(**STAGE2), workdir)
  assert set(params) == {'rcae', 'dpn', 'crd'}
  with pytest.raises(validate.ConfigError, match='holds CRD of other '
                     'parameter shapes') as e:
    params_lib.load_params(make_config(**dict(
        STAGE2, **{'model.crd_residual': True})), workdir)
  assert 'Leave out --config' in str(e.value) and '\n' not in str(e.value)
  # An evaluation with that config is refused before it writes its config
  # over the workdir's, which leaving out --config reads.
  config_json = os.path.join(workdir, 'config.json')
  with open(config_json, 'rb') as f:
    before = f.read()
  with pytest.raises(validate.ConfigError, match='holds CRD'):
    run_lib.run(make_config(**dict(STAGE2, **{
        'model.crd_residual': True, 'mode': 'evaluate'})), workdir)
  with open(config_json, 'rb') as f:
    assert f.read() == before
