"""Self-contained inference artefact: the predict function as StableHLO.

`export_predict` serialises `images uint8 [b, S, S, 3] -> {'map': f32
[b, S, S], 'score': f32 [b]}` with `jax.export`, with a symbolic batch
dimension `b` and S = config.data.image_size fixed. The parameters are
closed over, so they are baked into the module as constants: the file runs
with JAX alone (no Flax, no rcae_jax model code, no config), at the cost of
carrying the weights (~4 bytes per parameter). Reconstructions are not
outputs, which keeps the artefact and its outputs lean.

`load_predict` needs only `jax`: this module imports the model code lazily,
inside `export_predict`.

The artefact is tied to the platforms it was exported for (default: the
current backend; pass e.g. `platforms=('cpu', 'cuda')` for several) and,
as any `jax.export` artefact, is loadable by the same or newer jax
versions within jax's serialization compatibility window.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from rcae_jax import fileio


def predict_map_score(params, images, *, nets, config):
  """The deployed function: the anomaly map and the image score only."""
  from rcae_jax import evaluate  # pylint: disable=g-import-not-at-top
  out = evaluate.predict(params, images, nets=nets, config=config)
  return {'map': out['map'], 'score': out['score']}


def export_predict(params, config, path: str, *,
                   platforms: Sequence[str] | None = None):
  """Writes the serialised inference function of `config` with `params`
  baked in to `path` (atomically); returns the `jax.export.Exported`."""
  from rcae_jax import train  # pylint: disable=g-import-not-at-top
  from rcae_jax import validate  # pylint: disable=g-import-not-at-top
  validate.check_scoring(config)
  size = int(config.data.image_size)
  nets = train.build_networks(config.model)
  fn = functools.partial(predict_map_score, params, nets=nets, config=config)
  shape = jax.export.symbolic_shape(f'b, {size}, {size}, 3')
  spec = jax.ShapeDtypeStruct(shape, jnp.uint8)
  kwargs = {} if platforms is None else {'platforms': tuple(platforms)}
  exported = jax.export.export(jax.jit(fn), **kwargs)(spec)
  fileio.write_bytes_atomic(path, bytes(exported.serialize()))
  return exported


def load_exported(path: str) -> jax.export.Exported:
  return jax.export.deserialize(bytearray(fileio.read_bytes(path)))


def load_predict(path: str) -> Callable[[jax.typing.ArrayLike], dict]:
  """`images uint8 [b, S, S, 3]` (numpy or jax, any b >= 1) -> {'map':
  [b, S, S], 'score': [b]} from an `export_predict` file. Jitted: each new
  batch size compiles once."""
  exported = load_exported(path)
  return jax.jit(exported.call)
