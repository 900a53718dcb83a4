"""Times one training stage's jitted step of a config, as the loop runs it.

    python -m rcae_jax.tools.step_timer --config configs/cpu_real.py --stage 3
    python -m rcae_jax.tools.step_timer --config configs/cpu_real.py --stage 3 \
        --keep_freed_memory          # config.keep_freed_memory's allocator

Random uint8 images at the config's batch and size; the step is compiled
and run twice before timing. Prints the median and fastest step, the
first call (tracing and compiling included), the number of programs the
stage compiled, and the process's minor page faults (the measure of
docs/performance.md's profile: XLA:CPU's per-step buffers faulted in
again). `taskset -c 0` for one core.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import numpy as np

from rcae_jax import config_files
from rcae_jax.common import host_memory
from rcae_jax.common import sharding
from rcae_jax.model import inference
from rcae_jax.training import nonfinite
from rcae_jax.training import train


def time_steps(config, stage: int, steps: int) -> dict:
  """Median and fastest seconds of `steps` steps of `stage`, after two;
  the first call's seconds (tracing, compiling, one step) and how many
  programs the stage compiled (1 when each step reuses the first's)."""
  nets = inference.build_networks(config.model)
  size = config.data.image_size
  # As loop.run_stage takes its steps: a one-device mesh, the batch and
  # the health count as the loop passes them.
  mesh = sharding.make_mesh(1)
  batch = sharding.to_global({'image': np.random.default_rng(0).integers(
      0, 256, (train.stage_batch_size(config, stage), size, size, 3),
      np.uint8)}, mesh)
  state, frozen = train.create_state(config, stage, nets, mesh)
  # A fresh program, so that `programs` counts this call's compiles only.
  step_fn = train.make_step(config, stage, nets, mesh, reuse=False)
  times, health = [], None
  for _ in range(steps + 2):
    t0 = time.perf_counter()
    # Step number 0 every time: stage 1 then keeps one depth (one program).
    state, metrics = step_fn(state, frozen, batch, None, 0, health)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
    health = {k: metrics[k] for k in nonfinite.HEALTH_KEYS}
  return {'stage': stage, 'steps': steps,
          'median_s': float(np.median(times[2:])), 'min_s': min(times[2:]),
          'first_call_s': times[0],
          'programs': step_fn.jitted._cache_size(),  # pylint: disable=protected-access
          'minor_page_faults': resource.getrusage(
              resource.RUSAGE_SELF).ru_minflt}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--config', required=True)
  ap.add_argument('--stage', type=int, default=3, choices=(1, 2, 3))
  ap.add_argument('--steps', type=int, default=6)
  ap.add_argument('--keep_freed_memory', action='store_true',
                  help='tune glibc as config.keep_freed_memory does')
  args = ap.parse_args(argv)
  tuned = args.keep_freed_memory and host_memory.keep_freed_memory()
  report = dict(time_steps(config_files.load(args.config), args.stage,
                           args.steps), keep_freed_memory=tuned)
  print(json.dumps(report))
  return report


if __name__ == '__main__':
  main()
