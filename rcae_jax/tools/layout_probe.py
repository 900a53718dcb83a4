"""Times the recipe's convolution pattern in NHWC (ours) and NCHW layouts.

    python -m rcae_jax.tools.layout_probe                  # recipe's shapes
    taskset -c 0 python -m rcae_jax.tools.layout_probe     # one core

Is rewriting the networks channels-first worth it on XLA:CPU? Rather than
rewrite them to find out, this times one encoder step of
configs/cpu_real.py's shape (a kernel-2 stride-2 conv to `width`, two
residual blocks of 3x3 convs with SiLU, a 3x3 conv to 3 channels) as a
forward pass and as a gradient of a squared loss, written with
`lax.conv_general_dilated` once with NHWC/HWIO and once with NCHW/OIHW
dimension numbers, on the same numbers (checked equal). The two layouts
alternate per repetition, so that other load on the machine hits both.
Prints one JSON line per case: medians in ms and the ratio NHWC / NCHW
(> 1: channels-first is faster).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = {'NHWC': ('NHWC', 'HWIO', 'NHWC'), 'NCHW': ('NCHW', 'OIHW', 'NCHW')}


def encoder_kernels(width: int, in_channels: int = 3, seed: int = 0) -> list:
  """HWIO kernels of the encoder step: down, 2 x (conv, conv), out."""
  rng = np.random.default_rng(seed)
  shapes = [(2, 2, in_channels, width)] + [(3, 3, width, width)] * 4 + [
      (3, 3, width, 3)]
  return [rng.normal(0, (h * w * i) ** -0.5, (h, w, i, o)).astype(np.float32)
          for h, w, i, o in shapes]


def encoder_step(params: list, x: jax.Array, layout: str) -> jax.Array:
  """The step in `layout`, with `params` and `x` already in it
  (`to_layout`, outside the timed region)."""
  dims = LAYOUTS[layout]

  def conv(h, k, stride=1):
    return jax.lax.conv_general_dilated(
        h, k, (stride, stride), 'VALID' if stride == 2 else 'SAME',
        dimension_numbers=dims)

  h = conv(x, params[0], 2)
  for i in (1, 3):
    h = h + conv(jax.nn.silu(conv(jax.nn.silu(h), params[i])), params[i + 1])
  return conv(jax.nn.silu(h), params[5])


def jitted_pair(layout: str):
  """(forward, gradient) jitted for `layout`."""
  fwd = jax.jit(lambda p, x: encoder_step(p, x, layout))
  loss = lambda p, x: jnp.mean(encoder_step(p, x, layout) ** 2)
  return fwd, jax.jit(jax.grad(loss))


def to_layout(params: list, x: np.ndarray, layout: str):
  if layout == 'NHWC':
    return params, x
  return ([p.transpose(3, 2, 0, 1) for p in params], x.transpose(0, 3, 1, 2))


def compare(batch: int, size: int, width: int, reps: int) -> list[dict]:
  x = np.random.default_rng(1).uniform(0, 1, (batch, size, size, 3)).astype(
      np.float32)
  params = encoder_kernels(width)
  args = {lay: jax.device_put(to_layout(params, x, lay)) for lay in LAYOUTS}
  progs = {lay: jitted_pair(lay) for lay in LAYOUTS}
  # Same numbers in both layouts (before timing anything).
  ref = np.asarray(progs['NHWC'][0](*args['NHWC']))
  other = np.asarray(progs['NCHW'][0](*args['NCHW'])).transpose(0, 2, 3, 1)
  np.testing.assert_allclose(other, ref, rtol=1e-4, atol=1e-4)
  rows = []
  for kind, which in (('forward', 0), ('gradient', 1)):
    times = {lay: [] for lay in LAYOUTS}
    for rep in range(reps + 1):  # The first is a warm-up (and compile).
      for lay in LAYOUTS:
        t0 = time.perf_counter()
        jax.block_until_ready(progs[lay][which](*args[lay]))
        if rep:
          times[lay].append(time.perf_counter() - t0)
    med = {lay: 1e3 * float(np.median(t)) for lay, t in times.items()}
    rows.append({'case': kind, 'batch': batch, 'size': size, 'width': width,
                 'NHWC_ms': round(med['NHWC'], 2),
                 'NCHW_ms': round(med['NCHW'], 2),
                 'NHWC_over_NCHW': round(med['NHWC'] / med['NCHW'], 3)})
  return rows


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--batch', type=int, default=16)  # Stage 1's batch.
  ap.add_argument('--size', type=int, default=128)
  ap.add_argument('--width', type=int, default=16)
  ap.add_argument('--reps', type=int, default=7)
  args = ap.parse_args(argv)
  rows = compare(args.batch, args.size, args.width, args.reps)
  for row in rows:
    print(json.dumps(row))
  return rows


if __name__ == '__main__':
  main()
