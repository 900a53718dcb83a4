"""Tests for rcae_jax.model.flops, rcae_jax.tools.benchmark and configs/benchmark.py."""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from conftest import load_config
from conftest import tiny_benchmark_config
from rcae_jax.model import flops
from rcae_jax.model import inference
from rcae_jax.tools import benchmark



# ------------------------------------------------------------------ flops


def _conv_params(module, x):
  # Shapes suffice: the count traces, it never runs.
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), x)


def test_flops_single_conv_hand_count():
  x = jnp.zeros((2, 8, 8, 3))
  conv = nn.Conv(5, (3, 3))  # SAME padding: output 8x8x5.
  variables = _conv_params(conv, x)
  per_image = flops.conv_flops_per_image(conv.apply, variables, x, batch=2)
  assert per_image == 2 * (8 * 8 * 5) * 3 * 9


def test_flops_strided_and_grouped_conv():
  x = jnp.zeros((1, 8, 8, 6))
  strided = nn.Conv(4, (2, 2), strides=(2, 2), padding='VALID')
  count = flops.count_flops(strided.apply, _conv_params(strided, x), x)
  assert count.conv == 2 * (4 * 4 * 4) * 6 * 4 and count.conv_ops == 1
  depthwise = nn.Conv(6, (3, 3), feature_group_count=6)
  count = flops.count_flops(depthwise.apply, _conv_params(depthwise, x), x)
  assert count.conv == 2 * (8 * 8 * 6) * 1 * 9


class _TwoLayer(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3))(x))          # [B, 8, 8, 4]
    return nn.Dense(7)(h.reshape(x.shape[0], -1))  # [B, 7]


def test_flops_two_layer_model_hand_count():
  x = jnp.zeros((3, 8, 8, 2))
  model = _TwoLayer()
  variables = _conv_params(model, x)
  count = flops.count_flops(model.apply, variables, x)
  conv = 3 * 2 * (8 * 8 * 4) * 2 * 9
  dense = 3 * 2 * 7 * (8 * 8 * 4)
  assert (count.conv, count.dot) == (conv, dense)
  assert flops.conv_flops_per_image(model.apply, variables, x,
                                    batch=3) == (conv + dense) / 3


def test_flops_scan_counted_length_times():
  w = jnp.ones((4, 4))

  def fn(x):
    return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]

  count = flops.count_flops(fn, jax.ShapeDtypeStruct((2, 4), jnp.float32))
  assert count.dot == 5 * 2 * (2 * 4) * 4 and not count.has_while


def test_predict_flops_per_image_independent_of_batch_and_dtype():
  config = tiny_benchmark_config()
  params = jax.eval_shape(functools.partial(
      inference.init_params, inference.build_networks(config.model), image_size=32),
                          jax.random.PRNGKey(0))
  counts = []
  for batch, dtype in ((1, 'float32'), (2, 'float32'), (2, 'bfloat16')):
    cfg = benchmark._with(config, dtype=dtype, image_size=32)  # pylint: disable=protected-access
    images = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.uint8)
    counts.append(flops.conv_flops_per_image(benchmark.predict_fn(cfg),
                                             params, images, batch=batch))
  assert counts[0] > 0 and counts[0] == counts[1] == counts[2]


# -------------------------------------------------------------- benchmark


def test_run_benchmark_rejects_bad_size(tmp_path):
  config = tiny_benchmark_config()
  config.benchmark.image_sizes = (32, 40)  # 40 % 2**max(2, 4) != 0.
  with pytest.raises(ValueError, match='divisible by 16'):
    benchmark.run_benchmark(config, str(tmp_path))
  config = tiny_benchmark_config()
  config.model.depth = 5
  config.benchmark.image_sizes = (48,)
  with pytest.raises(ValueError, match='divisible by 32'):
    benchmark.run_benchmark(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'benchmark.json')


def test_benchmark_config_paper_model():
  config = load_config('benchmark')
  assert config.mode == 'benchmark'
  assert (config.model.depth, config.model.width, config.model.num_res_blocks,
          config.model.dpn_width, config.model.crd_width) == (5, 128, 2, 32, 16)
  assert tuple(config.benchmark.image_sizes) == (256, 1024)
  assert tuple(config.benchmark.batch_sizes) == (1, 8, 16, 32)
  benchmark.check(config, config.benchmark)


# A meta-path hook making these packages unimportable, as on accelerator
# images that ship JAX alone.
BLOCK_IMPORTS = '''
import sys
BLOCKED = {blocked!r}
class _Block:
  def find_spec(self, name, path=None, target=None):
    if name in BLOCKED or name.split('.')[0] in BLOCKED:
      raise ModuleNotFoundError(f'blocked for this test: {{name}}')
    return None
sys.meta_path.insert(0, _Block())
'''


def run_python(code: str, blocked, cwd=REPO):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  script = BLOCK_IMPORTS.format(blocked=set(blocked)) + code
  return subprocess.run([sys.executable, '-c', script], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_run_benchmark_tiny_without_tensorflow(tmp_path):
  """The tiny benchmark, run where TensorFlow / clu / TFDS cannot be
  imported (as on JAX-only accelerator images), then its JSON checked."""
  code = f'''
import sys
sys.path.insert(0, 'tests')
import conftest
from rcae_jax.model import flops
from rcae_jax.serving import export
from rcae_jax.tools import benchmark
benchmark.run_benchmark(conftest.tiny_benchmark_config(), {str(tmp_path)!r})
bad = [n for n in sys.modules if n.split('.')[0] in
       ('tensorflow', 'clu', 'tensorflow_datasets', 'tensorboard')]
assert not bad, bad
print('NO_TF_OK')
'''
  proc = run_python(code, ('tensorflow', 'clu', 'tensorflow_datasets',
                           'tensorboard'))
  assert proc.returncode == 0 and 'NO_TF_OK' in proc.stdout, (
      proc.stderr[-3000:])
  with open(tmp_path / 'benchmark.json', encoding='utf-8') as f:
    saved = json.load(f)
  rows = saved['results']
  # 1 size x 2 dtypes x 2 batch sizes x 2 modes.
  assert len(rows) == 8
  assert {(r['dtype'], r['batch_size'], r['mode']) for r in rows} == {
      (d, b, m) for d in ('float32', 'bfloat16') for b in (1, 2)
      for m in ('device', 'end_to_end')}
  for r in rows:
    for key in ('p50_ms', 'p90_ms', 'p99_ms', 'mean_ms', 'images_per_sec',
                'tflop_per_sec', 'gflop_per_image', 'compile_s', 'lower_s'):
      assert np.isfinite(r[key]) and r[key] > 0, key
    assert r['p50_ms'] <= r['p90_ms'] <= r['p99_ms']
    assert r['iters'] == 2 and r['warmup'] == 1 and r['image_size'] == 32
    assert r['peak_bytes_in_use'] is None  # CPU reports no memory stats.
    assert r['compiled_memory']['argument_size_in_bytes'] > 0
  assert saved['platform'] == 'cpu' and saved['device_kind']
  assert saved['versions']['jax'] == jax.__version__
  assert saved['versions']['python'] and saved['versions']['flax']
  assert saved['versions']['jaxlib']
  assert saved['weights'] == 'random' and saved['complete']
  assert saved['config']['model']['width'] == 4
  assert saved['config']['mode'] == 'benchmark'
  assert saved['flops']['32']['gflop_per_image'] == rows[0]['gflop_per_image']
  assert not saved['flops']['32']['while_loop_undercounted']
  assert 'p50_ms' in proc.stdout and 'bfloat16' in proc.stdout
  assert 'end_to_end' in proc.stdout
  assert not [p for p in os.listdir(tmp_path) if '.tmp' in p]


def test_layout_probe_times_both_layouts_on_the_same_numbers(monkeypatch):
  from rcae_jax.tools import layout_probe  # pylint: disable=g-import-not-at-top
  rows = layout_probe.compare(batch=1, size=8, width=4, reps=1)
  assert [r['case'] for r in rows] == ['forward', 'gradient']
  for row in rows:
    assert row['NHWC_ms'] > 0 and row['NCHW_ms'] > 0
    assert row['NHWC_over_NCHW'] > 0
  # A channels-first program that computes something else is refused
  # before anything is timed (kernels read with their rows and columns
  # swapped).
  monkeypatch.setitem(layout_probe.LAYOUTS, 'NCHW', ('NCHW', 'OIWH', 'NCHW'))
  with pytest.raises(AssertionError):
    layout_probe.compare(batch=1, size=8, width=4, reps=1)
