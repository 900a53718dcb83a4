"""mode=shortcut_report: CRD fed the real I_D^n, I, or flat grey."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_report
from rcae_jax import run as run_lib
from rcae_jax import validate
from rcae_jax.common import checkpoints
from rcae_jax.evaluation import maps as maps_lib
from rcae_jax.model import inference
from rcae_jax.serving import params as params_lib
from rcae_jax.tools import shortcut_report


def test_crd_inputs_replace_every_depth():
  rng = np.random.default_rng(0)
  dets = jnp.asarray(rng.random((3, 2, 4, 4, 3), np.float32))
  x = jnp.asarray(rng.random((2, 4, 4, 3), np.float32))
  fed = shortcut_report.crd_inputs(dets, x)
  np.testing.assert_array_equal(fed['real'], dets)
  for n in range(3):
    np.testing.assert_array_equal(fed['input'][n], x)
  np.testing.assert_array_equal(fed['grey'], np.full(dets.shape, 0.5))


def test_deltas_are_real_minus_each_replacement():
  rows = {'crd_real': dict(image_auroc=0.9, pixel_auroc=0.95, au_pro=0.8,
                           mean=0.8833),
          'crd_input': dict(image_auroc=0.92, pixel_auroc=0.85, au_pro=0.7,
                            mean=0.8233),
          'crd_grey': dict(image_auroc=0.5, pixel_auroc=0.93, au_pro=0.6,
                           mean=0.6767)}
  delta = shortcut_report.deltas(rows)
  assert set(delta) == {'crd_input', 'crd_grey'}
  assert delta['crd_input']['image_auroc'] == pytest.approx(-0.02)
  assert delta['crd_input']['pixel_auroc'] == pytest.approx(0.10)
  assert delta['crd_grey']['au_pro'] == pytest.approx(0.20)
  # Grey loses only 0.02 pixel AUROC: short of the 0.05 target.
  assert shortcut_report.meets_target(delta) == {'crd_input': True,
                                                 'crd_grey': False}


def test_shortcut_report_needs_stage_3(make_config):
  with pytest.raises(validate.ConfigError, match='needs stage 3') as e:
    validate.validate(make_config(**{'mode': 'shortcut_report',
                                     'train.stage3.steps': 0,
                                     'eval.scoring': 'recursion'}))
  assert '\n' not in str(e.value)


def test_refuses_a_workdir_trained_without_stage_3(make_config, tmp_path):
  """A workdir whose training ended at stage 2 has an untrained CRD: one
  line, before any parameter is read."""
  workdir = tmp_path / 'wd'
  # A step folder, as a run that trained stages 1 and 2 leaves.
  (workdir / 'checkpoints' / '5').mkdir(parents=True)
  (workdir / 'checkpoints' / checkpoints.COMPLETE_MARKER).write_text(
      json.dumps({'stage': 2, 'stage_step': 2, 'global_step': 5}))
  with pytest.raises(validate.ConfigError,
                     match='finished training at stage 2') as e:
    run_lib.run(make_config(mode='shortcut_report'), str(workdir))
  assert '\n' not in str(e.value)


def test_crd_rows_see_what_they_are_fed(trained):
  """On the trained fixture I_D^n differs from I, so CRD fed I (or grey)
  maps differently; fed the real I_D^n it maps as evaluation does."""
  config, workdir = trained
  params = jax.device_get(params_lib.load_params(config, workdir))
  nets = inference.build_networks(config.model)
  images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3),
                                             np.uint8)
  # Jitted, as make_report runs it (eagerly its ops compile one by one).
  got = jax.jit(functools.partial(shortcut_report.batch_maps, nets=nets,
                                  config=config, use_dpn=True))(params, images)
  want = maps_lib.make_predict_fn(config)(params, images)
  np.testing.assert_allclose(got['crd_real'], want['map'], rtol=1e-5,
                             atol=1e-6)
  x = inference.to_float(images)
  dets = want['details']
  assert float(jnp.abs(dets - x[None]).max()) > 0.01
  fed_x = jax.jit(lambda p, x: maps_lib.crd_map(
      nets, p, jnp.broadcast_to(x, dets.shape), x))(params, x)
  np.testing.assert_allclose(got['crd_input'], fed_x, rtol=1e-5, atol=1e-6)
  for name in ('crd_input', 'crd_grey'):
    assert float(np.abs(got[name] - got['crd_real']).max()) > 1e-4, name
  assert float(np.abs(got['crd_input'] - got['crd_grey']).max()) > 1e-4
  rec_cfg = config.copy_and_resolve_references()
  rec_cfg.eval.scoring = 'recursion'
  np.testing.assert_allclose(
      got['recursion'], maps_lib.make_predict_fn(rec_cfg)(params,
                                                         images)['map'],
      rtol=1e-5, atol=1e-6)


def test_shortcut_report_mode_on_a_trained_workdir(trained):
  report = run_report(trained, 'shortcut_report')
  assert set(report) == {'category', 'num_test_images', 'image_size',
                         'pixel_resolution', 'grey_value', 'rows', 'deltas',
                         'target', 'depth_ratios'}
  rows = report['rows']
  assert set(rows) == set(shortcut_report.ROWS)
  for row in rows.values():
    assert set(row) == {'image_auroc', 'pixel_auroc', 'au_pro', 'mean'}
  # The real row is what evaluation measured (the tiny category's masks are
  # at the model's size, so both resolutions agree).
  (measured,) = json.load(open(os.path.join(trained[1],
                                            'metrics.json'))).values()
  for key in ('image_auroc', 'pixel_auroc', 'au_pro'):
    assert rows['crd_real'][key] == pytest.approx(measured[key], abs=1e-6)
  for name in ('crd_input', 'crd_grey'):
    for key in shortcut_report.KEYS:
      assert report['deltas'][name][key] == pytest.approx(
          rows['crd_real'][key] - rows[name][key], abs=1e-12)
    met = all(report['deltas'][name][k] >= 0.05
              for k in ('pixel_auroc', 'au_pro'))
    assert report['target']['met'][name] == met
  # The per-depth ratios are depth_report's numbers.
  depth = run_report(trained, 'depth_report')
  ratios = report['depth_ratios']
  assert ratios['rcae'] == depth['rcae'] and ratios['dpn'] == depth['dpn']
  assert ratios['defect_pixels'] == depth['defect_pixels'] > 0
  table = shortcut_report.format_table(report)
  assert '| crd_grey |' in table and '| dpn | 1 |' in table
