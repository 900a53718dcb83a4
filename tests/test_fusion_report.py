"""mode=fusion_report: CRD's map, the recursion map and their fusions."""

import json
import os

import numpy as np
import pytest

from conftest import run_report
from rcae_jax import validate
from rcae_jax.tools import fusion_report


def test_normalised_fusions_do_not_care_about_either_maps_scale():
  rng = np.random.default_rng(0)
  crd, rec = rng.random((2, 3, 8, 8), np.float32)
  crd_val, rec_val = rng.random((2, 500), np.float32)
  base = fusion_report.candidates(crd, rec, crd_val, rec_val)
  scaled = fusion_report.candidates(100 * crd, rec, 100 * crd_val, rec_val)
  for name in base:
    if name.startswith(('sum/', 'max/')):
      np.testing.assert_allclose(scaled[name], base[name], rtol=1e-4,
                                 err_msg=name)
  np.testing.assert_array_equal(base['crd'], crd)
  np.testing.assert_array_equal(base['recursion'], rec)
  # Unnormalised, the larger map would decide alone.
  assert not np.allclose(scaled['product'], base['product'])
  # The median normaliser: a pixel at both held-out medians sums to 2.
  q = fusion_report.candidates(np.median(crd_val)[None, None, None],
                               np.median(rec_val)[None, None, None],
                               crd_val, rec_val)['sum/q0.5']
  np.testing.assert_allclose(q, 2.0, rtol=1e-5)


def test_fusion_report_needs_stage_3(make_config):
  with pytest.raises(validate.ConfigError, match='needs stage 3'):
    validate.validate(make_config(**{'mode': 'fusion_report',
                                     'train.stage3.steps': 0,
                                     'eval.scoring': 'recursion'}))


def test_fusion_report_mode_on_a_trained_workdir(trained):
  report = run_report(trained, 'fusion_report')
  rows = report['candidates']
  assert {'crd', 'recursion', 'product', 'sum/q0.5', 'sum/z'} <= set(rows)
  # Its CRD row is what evaluation measured (the tiny category's masks are
  # at the model's size, so both resolutions agree).
  metrics = json.load(open(os.path.join(trained[1], 'metrics.json')))
  (measured,) = metrics.values()
  for key in fusion_report.KEYS:
    assert rows['crd'][key] == pytest.approx(measured[key], abs=1e-6), key
  assert report['num_held_out_images'] > 0
