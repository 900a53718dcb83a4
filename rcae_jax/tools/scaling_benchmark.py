"""Training throughput (images/s) against the number of devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m rcae_jax.tools.scaling_benchmark --devices 1,2,4,8 --steps 10

Times the stage-1 train step (the model of configs/default.py unless
overridden with --width/--image_size) with the same global batch split
over 1, 2, 4, 8 devices, after one compile-and-warm-up step per depth,
and prints images/s and scaling efficiency (throughput(n) / (n *
throughput(1))). On real accelerators this is data-parallel scaling. On
fake CPU devices all "devices" share the same cores, so efficiency there
measures partitioning overhead only, never a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from rcae_jax import config_files
from rcae_jax.model import inference
from rcae_jax.common import sharding
from rcae_jax.training import train

# configs/default.py of this checkout (the repository root, beside the
# package).
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'configs', 'default.py')


def measure(config, num_devices: int, steps: int) -> float:
  """images/s of stage-1 steps on `num_devices` devices."""
  mesh = sharding.make_mesh(num_devices)
  nets = inference.build_networks(config.model)
  state, frozen = train.create_state(config, 1, nets, mesh)
  step_fn = train.make_step(config, 1, nets, mesh)
  b, s = config.train.batch_size, config.data.image_size
  rng = np.random.default_rng(0)
  batch = sharding.to_global(
      {'image': rng.integers(0, 255, (b, s, s, 3), np.uint8)}, mesh)
  # Warm up every depth's program (stage 1 draws the depth per step).
  for step in range(4 * config.model.depth):
    state, m = step_fn(state, frozen, batch, train.step_rng(0, 1, step),
                       step)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for step in range(steps):
    state, m = step_fn(state, frozen, batch, train.step_rng(0, 1, step),
                       step)
  jax.block_until_ready(m)
  return b * steps / (time.perf_counter() - t0)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--devices', default='1,2,4,8')
  ap.add_argument('--steps', type=int, default=10)
  ap.add_argument('--batch', type=int, default=16)
  ap.add_argument('--image_size', type=int, default=64)
  ap.add_argument('--width', type=int, default=16)
  ap.add_argument('--depth', type=int, default=4)
  ap.add_argument('--json', default='')
  args = ap.parse_args(argv)
  config = config_files.base(DEFAULT_CONFIG, 'default')
  config.train.batch_size = args.batch
  config.data.image_size = args.image_size
  config.model.width = args.width
  config.model.depth = args.depth
  rows = []
  for n in [int(d) for d in args.devices.split(',')]:
    rate = measure(config, n, args.steps)
    if not rows:
      per_device = rate / n  # The first entry is the reference.
    rows.append({'devices': n, 'images_per_sec': rate,
                 'efficiency': rate / (n * per_device)})
    print(f"{n:>3} devices: {rate:8.1f} images/s, scaling efficiency "
          f"{rows[-1]['efficiency']:.2f}", flush=True)
  report = {'platform': jax.default_backend(),
            'device_kind': jax.devices()[0].device_kind,
            'device_count': jax.device_count(), 'args': vars(args),
            'rows': rows}
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=2)
  return report


if __name__ == '__main__':
  main()
