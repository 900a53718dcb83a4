"""Inference benchmark: latency / throughput of the full predict function.

For every (image size, dtype, batch size) in `config.benchmark`, the full
inference function `maps_lib.predict` (all N reconstructions, DPN, CRD or
the recursion-error map, image score) is compiled ahead of time with
`jax.jit(fn).lower(params, images).compile()` (compile time reported
separately), warmed up, then timed per call:

- 'device': uint8 images already on the device, all outputs left on the
  device (`block_until_ready`); the accelerator's own time.
- 'end_to_end': a host numpy uint8 batch in, `np.asarray` of the map and
  the score out; adds the host->device copy and the device->host fetch.

Each row reports p50/p90/p99/mean/min/max latency (ms), images/s (batch /
mean latency), analytic GFLOP per image (`flops.py`: convolutions and
dots, counted from the traced function) and the achieved TFLOP/s, the
compiled executable's memory (XLA's memory_analysis) and the device's
process-wide peak memory when the backend reports it (None on CPU).

Weights are random (`random_params`: `inference.init_params`'s shapes,
values drawn on the host) unless `config.benchmark.checkpoint_workdir` names
a trained workdir; speed does not depend on the values. `config.model.dtype`
is set per row; parameters stay float32 (the modules cast them).

`<workdir>/benchmark.json` is rewritten atomically after every
(size, dtype, batch) combination with `"complete": false` until the sweep
ends, so an out-of-memory failure at a large batch keeps the rows measured
before it.

No TensorFlow / clu / tensorflow-datasets is imported here: this runs on
accelerator images that ship JAX alone.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
from rcae_jax.common import fileio
from rcae_jax.evaluation import fusion
from rcae_jax.evaluation import maps as maps_lib
from rcae_jax.evaluation import scoring_checks
from rcae_jax.model import flops as flops_lib
from rcae_jax.model import inference
from rcae_jax.serving import params as params_lib

MODES = ('device', 'end_to_end')
DTYPES = ('float32', 'bfloat16')


def size_factor(model_cfg) -> int:
  """Image sides must be divisible by this: the recursion halves the image
  `levels` times and the DPN / CRD U-Nets have 4 levels."""
  if model_cfg.recursion == 'depth':
    levels = model_cfg.depth
  else:
    levels = model_cfg.iterative_levels
  return 2 ** max(levels, 4)


def check(config, bench) -> None:
  """Fails fast, naming the field, before anything compiles."""
  factor = size_factor(config.model)
  for size in bench.image_sizes:
    if int(size) < 1 or int(size) % factor:
      raise ValueError(
          f'config.benchmark.image_sizes: {size} is not divisible by '
          f'{factor} = 2**max(recursion levels, 4 U-Net levels) for '
          f'model.recursion={config.model.recursion!r}, '
          f'depth={config.model.depth}')
  for b in bench.batch_sizes:
    if int(b) < 1:
      raise ValueError(f'config.benchmark.batch_sizes must be >= 1, got {b}')
  for d in bench.dtypes:
    if d not in DTYPES:
      raise ValueError(f'config.benchmark.dtypes: {d!r} is not one of '
                       f'{DTYPES}')
  for m in bench.modes:
    if m not in MODES:
      raise ValueError(f'config.benchmark.modes: {m!r} is not one of {MODES}')
  if bench.iters < 1 or bench.warmup < 0:
    raise ValueError('config.benchmark.iters must be >= 1 and warmup >= 0')
  scoring_checks.check_scoring(config)


def _with(config, *, dtype: str, image_size: int):
  """A copy of `config` with the model dtype and image size set (the caller's
  config, possibly locked by the flags, is left untouched)."""
  cfg = config.copy_and_resolve_references()
  cfg.model.dtype = dtype
  with cfg.unlocked():
    # The resolved copy keeps the type of the config's value, which may be
    # a (H, W) pair: replace the field rather than assign across types.
    del cfg.data['image_size']
    cfg.data.image_size = int(image_size)
  return cfg


def random_params(config, seed: int = 0) -> dict:
  """float32 parameters with `inference.init_params`'s tree and shapes (from
  `jax.eval_shape`, nothing compiled), drawn on the host: kernels
  N(0, 1/fan_in), biases zero, norm scales one. Compiling `init_params`
  itself costs more than a small benchmark on CPU (tens of seconds with threefry), and speed
  does not depend on the values. Unlike a fresh `init_params`, the
  zero-initialised heads are random too, so every path is live."""
  nets = inference.build_networks(config.model)
  # Parameter shapes do not depend on the image size: trace at the
  # smallest valid one.
  shapes = inference.abstract_params(nets, size_factor(config.model))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path[-1].key == 'scale':  # GroupNorm scales: the identity.
      return np.ones(leaf.shape, np.float32)
    if len(leaf.shape) < 2:  # Biases.
      return np.zeros(leaf.shape, np.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(
        np.float32)

  return jax.device_put(jax.tree_util.tree_map_with_path(draw, shapes))


def load_or_init_params(config, bench) -> tuple[dict, str]:
  """float32 parameters on the device (the checkpoint's, or random ones):
  both kinds are placed the same way, so the timings do not depend on where
  the weights came from."""
  if bench.checkpoint_workdir:
    return (jax.device_put(params_lib.load_params(config,
                                                  bench.checkpoint_workdir)),
            f'checkpoint:{fileio.absolute(bench.checkpoint_workdir)}')
  return random_params(config, config.seed), 'random'


def latency_stats(seconds, batch: int) -> dict:
  ms = np.asarray(seconds, np.float64) * 1e3
  mean = float(ms.mean())
  return {'p50_ms': float(np.percentile(ms, 50)),
          'p90_ms': float(np.percentile(ms, 90)),
          'p99_ms': float(np.percentile(ms, 99)),
          'mean_ms': mean, 'min_ms': float(ms.min()),
          'max_ms': float(ms.max()), 'std_ms': float(ms.std()),
          'images_per_sec': batch / (mean / 1e3)}


def _time_calls(call, warmup: int, iters: int) -> list[float]:
  for _ in range(warmup):
    call()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return times


def _memory_analysis(compiled) -> dict | None:
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # Backend-dependent.
    return None
  if stats is None:
    return None
  fields = ('argument_size_in_bytes', 'output_size_in_bytes',
            'temp_size_in_bytes', 'alias_size_in_bytes',
            'generated_code_size_in_bytes')
  return {f: int(getattr(stats, f)) for f in fields if hasattr(stats, f)}


def _xla_flops(compiled) -> float | None:
  """XLA's own count, for comparison only (it undercounts: model/flops.py)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


def peak_bytes_in_use() -> int | None:
  """Process-wide peak device memory (monotone over the run); None when
  the backend does not report it (CPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats or 'peak_bytes_in_use' not in stats:
    return None
  return int(stats['peak_bytes_in_use'])


def environment() -> dict:
  dev = jax.devices()[0]
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top
    jaxlib_version = jaxlib.__version__
  except (ImportError, AttributeError):
    jaxlib_version = None
  return {
      'platform': dev.platform,
      'device_kind': dev.device_kind,
      'num_devices': jax.device_count(),
      'versions': {'jax': jax.__version__, 'jaxlib': jaxlib_version,
                   'flax': flax.__version__, 'numpy': np.__version__,
                   'python': platform.python_version()},
      'host': {'machine': platform.machine(), 'os': platform.platform(),
               'cpu_count': os.cpu_count()},
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }


def predict_fn(config):
  """The inference function of `config` as f(params, images): everything
  is computed (all N reconstructions, DPN, CRD), the map and the score are
  returned, as evaluation and production run it."""
  nets = inference.build_networks(config.model)
  # 'fused' costs the same whatever its normalisers; the maps go unread.
  return functools.partial(maps_lib.predict, nets=nets, config=config,
                           normalisers=fusion.UNIT, outputs=maps_lib.MAP_SCORE)


def gflop_per_image(config, params, image_size: int) -> dict:
  """Analytic count of the full predict function (see flops.py)."""
  fn = predict_fn(_with(config, dtype='float32', image_size=image_size))
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8)
  count = flops_lib.count_flops(fn, params, images)
  return {'gflop_per_image': count.total / 1e9,
          'conv_gflop_per_image': count.conv / 1e9,
          'dot_gflop_per_image': count.dot / 1e9,
          'conv_ops': count.conv_ops,
          'while_loop_undercounted': count.has_while}


def bench_one(config, params, *, image_size: int, batch: int, dtype: str,
              bench, gflop: float) -> list[dict]:
  """Compiles one (size, batch, dtype) and times it in each mode."""
  cfg = _with(config, dtype=dtype, image_size=image_size)
  fn = predict_fn(cfg)
  rng = np.random.default_rng([config.seed, image_size, batch])
  host_images = rng.integers(0, 256, (batch, image_size, image_size, 3),
                             dtype=np.uint8)
  device_images = jax.block_until_ready(jax.device_put(host_images))
  t0 = time.perf_counter()
  lowered = jax.jit(fn).lower(params, device_images)
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  common = {'image_size': int(image_size), 'batch_size': int(batch),
            'dtype': dtype, 'lower_s': lower_s, 'compile_s': compile_s,
            'warmup': int(bench.warmup), 'iters': int(bench.iters),
            'gflop_per_image': gflop,
            'compiled_memory': _memory_analysis(compiled)}
  xla = _xla_flops(compiled)
  common['xla_cost_analysis_gflop_per_image'] = (
      None if xla is None else xla / batch / 1e9)

  def on_device():
    jax.block_until_ready(compiled(params, device_images))

  def end_to_end():
    out = compiled(params, host_images)
    np.asarray(out['map'])
    np.asarray(out['score'])

  calls = {'device': on_device, 'end_to_end': end_to_end}
  rows = []
  for mode in bench.modes:
    times = _time_calls(calls[mode], int(bench.warmup), int(bench.iters))
    row = dict(common, mode=mode, **latency_stats(times, batch))
    row['tflop_per_sec'] = gflop * row['images_per_sec'] / 1e3
    row['peak_bytes_in_use'] = peak_bytes_in_use()
    rows.append(row)
    logging.info('benchmark %s', _row_text(row))
  return rows


_COLUMNS = (('image_size', 'size', '{:d}'), ('dtype', 'dtype', '{}'),
            ('mode', 'mode', '{}'), ('batch_size', 'batch', '{:d}'),
            ('compile_s', 'compile_s', '{:.1f}'), ('p50_ms', 'p50_ms', '{:.2f}'),
            ('p90_ms', 'p90_ms', '{:.2f}'), ('p99_ms', 'p99_ms', '{:.2f}'),
            ('mean_ms', 'mean_ms', '{:.2f}'),
            ('images_per_sec', 'img/s', '{:.1f}'),
            ('gflop_per_image', 'GFLOP/img', '{:.2f}'),
            ('tflop_per_sec', 'TFLOP/s', '{:.2f}'),
            ('peak_bytes_in_use', 'peak_MiB', None))


def _cell(row, key, fmt) -> str:
  value = row.get(key)
  if value is None:
    return '-'
  if fmt is None:  # Bytes -> MiB.
    return f'{value / 2**20:.0f}'
  return fmt.format(value)


def _row_text(row) -> str:
  return ' '.join(f'{title}={_cell(row, key, fmt)}'
                  for key, title, fmt in _COLUMNS)


def format_table(rows) -> str:
  header = [title for _, title, _ in _COLUMNS]
  body = [[_cell(r, key, fmt) for key, _, fmt in _COLUMNS] for r in rows]
  widths = [max(len(x) for x in col) for col in zip(header, *body)]
  lines = ['  '.join(h.rjust(w) for h, w in zip(header, widths)),
           '  '.join('-' * w for w in widths)]
  lines += ['  '.join(c.rjust(w) for c, w in zip(line, widths))
            for line in body]
  return '\n'.join(lines)


def run_benchmark(config, workdir: str) -> dict:
  """Runs the benchmark of `config.benchmark`, writes
  `<workdir>/benchmark.json`, prints a table and returns the report."""
  bench = config.benchmark
  check(config, bench)
  fileio.makedirs(workdir)
  params, weights = load_or_init_params(config, bench)
  env = environment()
  logging.info('Benchmark on %s (%s), %s weights', env['device_kind'],
               env['platform'], weights)
  flop_info = {int(s): gflop_per_image(config, params, int(s))
               for s in bench.image_sizes}
  rows = []
  report = {
      'environment': env,
      'device_kind': env['device_kind'],
      'platform': env['platform'],
      'versions': env['versions'],
      'weights': weights,
      'param_counts': {k: inference.count_params(v)
                       for k, v in params.items()},
      'flops': {str(k): v for k, v in flop_info.items()},
      'flops_note': ('analytic: 2*MACs of every convolution and dot in the '
                     'traced predict function; elementwise ops ignored; '
                     'params stay float32 whatever the compute dtype'),
      'results': rows,
      'complete': False,
      'config': config.to_dict(),
      'created_unix': time.time(),
  }
  path = os.path.join(workdir, 'benchmark.json')
  for size in bench.image_sizes:
    for dtype in bench.dtypes:
      for batch in bench.batch_sizes:
        rows.extend(bench_one(config, params, image_size=int(size),
                              batch=int(batch), dtype=dtype, bench=bench,
                              gflop=flop_info[int(size)]['gflop_per_image']))
        # Rewritten after every combination: if a later one runs out of
        # memory, the rows measured so far are kept ('complete': false).
        fileio.write_json_atomic(path, report)
  report['complete'] = True
  fileio.write_json_atomic(path, report)
  table = format_table(rows)
  print(f'RcAE inference benchmark on {env["device_kind"]} '
        f'({env["platform"]}), jax {jax.__version__}, python '
        f'{platform.python_version()}, {weights} weights', file=sys.stdout)
  print(table, file=sys.stdout)
  sys.stdout.flush()
  return report
