"""The PyTorch twin of the model (rcae_jax/tools/torch_benchmark.py) is the
same network: same parameters, same FLOPs, same outputs for the same
weights; and the comparison's report holds the ratios."""

import importlib.util
import json

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec('torch') is None,
    reason='torch is not installed (optional: pip install -e ".[bench]")')


def _setup(make_config, **overrides):
  from rcae_jax.tools import torch_benchmark as tb  # pylint: disable=g-import-not-at-top
  config = make_config(**overrides)
  return tb, config, tb.host_params(config, 0)


@pytest.mark.parametrize('overrides', [
    {}, {'model.crd_normalize': True, 'model.skips': False,
         'model.num_res_blocks': 2, 'model.crd_steps': 1,
         'model.crd_residual': True}])
def test_same_outputs_for_the_same_weights(make_config, overrides):
  """Reconstructions, detail-restored ones and the map of the torch twin
  equal the JAX model's (random heads: every path is live)."""
  tb, config, params = _setup(make_config, **overrides)
  from rcae_jax.model import inference  # pylint: disable=g-import-not-at-top
  torch = tb.import_torch()
  nets = inference.build_networks(config.model)
  tnets = tb.torch_networks(config.model, params).eval()
  x = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  recs = inference.reconstructions(nets, params, x)
  dets = inference.details(nets, params, recs, x, True)
  amap = tb.jax_forward(nets, params, x)
  with torch.no_grad():
    xt = tb.to_nchw(x)
    trecs = tnets.rcae(xt)
    tdets = tnets.dpn(trecs, xt)
    tmap = tnets(xt)
    tdepth = tnets.rcae(xt, depth=config.model.depth)
  np.testing.assert_allclose(np.moveaxis(trecs.numpy(), 2, -1), recs,
                             atol=1e-5)
  np.testing.assert_allclose(np.moveaxis(tdets.numpy(), 2, -1), dets,
                             atol=1e-4)
  np.testing.assert_allclose(tmap.numpy(), amap, atol=1e-4)
  np.testing.assert_allclose(np.moveaxis(tdepth.numpy(), 1, -1), recs[-1],
                             atol=1e-5)
  assert float(np.std(amap)) > 1e-3  # A map with structure, not a constant.


def test_counts_agree_and_a_missing_layer_is_caught(make_config):
  tb, config, params = _setup(make_config)
  same = tb.check_same_network(config, params)
  assert same['params'] == same['params_torch']
  assert same['flop_relative_difference'] < tb.FLOP_TOLERANCE
  assert same['gflop_per_image_jax'] > 0
  broken = jax.tree.map(lambda v: v, params)
  del broken['dpn']['UNet_0']['Conv_0']
  with pytest.raises(ValueError, match='layers differ'):
    tb.torch_networks(config.model, broken)
  # A wider twin does not count as the same network.
  wider = make_config(**{'model.dpn_width': 8})
  with pytest.raises(ValueError):
    tb.torch_networks(wider.model, params)


def test_report_has_the_ratios(make_config, tmp_path):
  tb, config, _ = _setup(make_config)
  path = tmp_path / 'out' / 'torch_vs_jax.json'
  tb.run(config, reps=1, sizes=(32,), batches=(1,), stages=(1, 2, 3),
         json_path=str(path), log=lambda *_: None)
  report = json.loads(path.read_text())
  depths = [f'train_stage1_depth{d}' for d in range(1, config.model.depth + 1)]
  want = set(depths) | {'train_stage1', 'train_stage2', 'train_stage3',
                        'infer_32px_b1'}
  assert set(report['ratios']) == want
  for key in want:
    case = report['cases'][key]
    assert report['ratios'][key] == pytest.approx(
        case['torch_ms'] / case['jax_ms'])
  assert report['cases']['train_stage1']['jax_ms'] == pytest.approx(
      np.mean([report['cases'][k]['jax_ms'] for k in depths]))
  assert report['threads']['torch_intra_op_threads'] >= 1
