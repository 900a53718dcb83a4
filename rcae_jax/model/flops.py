"""Analytic FLOP count of a JAX function, read off its jaxpr.

XLA's `cost_analysis()` is not usable for roofline figures here: it counts a
rolled loop body once, and on GPU it misses convolutions that run as library
(cuDNN) calls (docs/performance.md). Walking the model's parameter tree is
fragile too (shared weights are applied many times: the RcAE encoder chain is
shared by all N reconstructions, the decoder of depth n runs n times, DPN
runs on all N, CRD on the stacked steps). Instead we trace the function
itself with `jax.make_jaxpr` and count what it actually computes:

- `conv_general_dilated`: 2 * (number of output elements) *
  (input features per group) * (kernel window size). Padding zeros are
  counted as work, as is usual for conv FLOP figures.
- `dot_general`: 2 * (number of output elements) * (contracted size).

Nested jaxprs (jit, custom_jvp/vjp, remat, ...) are walked recursively; a
`scan` body is counted `length` times; for `cond` / `switch` the most
expensive branch is counted; a `while` body is counted ONCE (its trip count
is not known at trace time), so rolled while loops are undercounted.
Elementwise ops, reductions, reduce_window (pooling / box blur), reshapes
and transposes are ignored: for conv nets they are a small fraction of the
FLOPs and they are memory-bound anyway. A multiply-add is 2 FLOPs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """FLOPs of ONE call of the traced function (the whole batch)."""
  conv: int = 0
  dot: int = 0
  # Number of conv / dot equations executed (scan bodies times length).
  conv_ops: int = 0
  dot_ops: int = 0
  # True when a while loop was found (its body is counted once).
  has_while: bool = False

  @property
  def total(self) -> int:
    return self.conv + self.dot

  def __add__(self, other: 'FlopCount') -> 'FlopCount':
    return FlopCount(self.conv + other.conv, self.dot + other.dot,
                     self.conv_ops + other.conv_ops,
                     self.dot_ops + other.dot_ops,
                     self.has_while or other.has_while)

  def scale(self, k: int) -> 'FlopCount':
    return FlopCount(self.conv * k, self.dot * k, self.conv_ops * k,
                     self.dot_ops * k, self.has_while)


def _prod(shape) -> int:
  return int(math.prod(int(d) for d in shape))


def conv_flops(eqn) -> int:
  """FLOPs of one `conv_general_dilated` equation."""
  rhs = eqn.invars[1].aval
  out = eqn.outvars[0].aval
  dn = eqn.params['dimension_numbers']
  rhs_spec = dn.rhs_spec  # (out feature dim, in feature dim, *spatial dims)
  in_per_group = int(rhs.shape[rhs_spec[1]])  # Already divided by groups.
  window = _prod(rhs.shape[d] for d in rhs_spec[2:])
  # Each output element is a dot over in_per_group * window inputs; this
  # also holds for batch_group_count > 1 (the output batch is shrunk).
  return 2 * _prod(out.shape) * in_per_group * window


def dot_flops(eqn) -> int:
  """FLOPs of one `dot_general` equation."""
  lhs = eqn.invars[0].aval
  out = eqn.outvars[0].aval
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  return 2 * _prod(out.shape) * _prod(lhs.shape[d] for d in lhs_contract)


def _as_jaxpr(obj):
  """The open Jaxpr of a Jaxpr / ClosedJaxpr, else None (duck-typed so it
  survives the jax.core -> jax.extend.core moves across versions)."""
  if hasattr(obj, 'eqns'):
    return obj
  inner = getattr(obj, 'jaxpr', None)
  if inner is not None and hasattr(inner, 'eqns'):
    return inner
  return None


def count_jaxpr(jaxpr) -> FlopCount:
  """FLOPs of an (open or closed) jaxpr, nested jaxprs included."""
  jaxpr = _as_jaxpr(jaxpr)
  total = FlopCount()
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      total += FlopCount(conv=conv_flops(eqn), conv_ops=1)
      continue
    if name == 'dot_general':
      total += FlopCount(dot=dot_flops(eqn), dot_ops=1)
      continue
    if name == 'cond':
      branches = [count_jaxpr(b) for b in eqn.params['branches']]
      total += max(branches, key=lambda c: c.total)
      continue
    inner = FlopCount()
    for value in eqn.params.values():
      values = value if isinstance(value, (tuple, list)) else (value,)
      for v in values:
        sub = _as_jaxpr(v)
        if sub is not None:
          inner += count_jaxpr(sub)
    if name == 'scan':
      inner = inner.scale(int(eqn.params['length']))
    elif name == 'while':
      inner = dataclasses.replace(inner, has_while=True)
    total += inner
  return total


def count_flops(fn: Callable[..., Any], *example_args) -> FlopCount:
  """FLOPs of one call `fn(*example_args)`. The args may be arrays or
  `jax.ShapeDtypeStruct`s (nothing is computed or allocated)."""
  return count_jaxpr(jax.make_jaxpr(fn)(*example_args))


def conv_flops_per_image(fn: Callable[..., Any], *example_args,
                         batch: int) -> float:
  """Convolution + dot_general FLOPs per image of `fn(*example_args)`,
  whose example inputs hold `batch` images. Elementwise ops are ignored
  (see the module docstring)."""
  if batch < 1:
    raise ValueError(f'batch must be >= 1, got {batch}')
  return count_flops(fn, *example_args).total / batch


def model_report(config, params) -> dict:
  """Parameters and analytic GFLOP per image of each component at the
  config's image size: RcAE (all N reconstructions), DPN (on all N), CRD.
  Only traces (jax.make_jaxpr on shapes): nothing runs or compiles."""
  from rcae_jax.data import geometry  # pylint: disable=g-import-not-at-top
  from rcae_jax.model import inference  # pylint: disable=g-import-not-at-top
  nets = inference.build_networks(config.model)
  (h, w), n = geometry.model_hw(config.data), config.model.depth
  x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  recs = jax.ShapeDtypeStruct((n, 1, h, w, 3), jnp.float32)
  parts = {
      'rcae': (lambda p, x: inference.reconstructions(nets, p, x), (x,)),
      'dpn': (lambda p, r, x: inference.details(nets, p, r, x, True),
              (recs, x)),
      'crd': (lambda p, r, x: inference.crd_logits(nets, p, r, x), (recs, x)),
  }
  report = {}
  for name, (fn, args) in parts.items():
    report[name] = {
        'params': inference.count_params(params[name]),
        'gflop_per_image': count_flops(fn, params, *args).total / 1e9}
  return report
