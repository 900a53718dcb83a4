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

`config.mode='export'` (`run_export`) writes the shippable folder
<workdir>/export/: predict.stablehlo (the trained function), model.json
(what a caller must know: input size and dtype, thresholds, platforms, jax
version) and serve_export.py, a script that scores a folder of images with
jax, numpy and Pillow alone (rcae_jax/serving/serve_export.py).

The artefact is tied to the platforms it was exported for (default: the
current backend; pass e.g. `platforms=('cpu', 'cuda')` for several) and,
as any `jax.export` artefact, is loadable by the same or newer jax
versions within jax's serialization compatibility window.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from rcae_jax.common import fileio


def predict_map_score(params, images, *, nets, config, normalisers=None):
  """The deployed function: the anomaly map and the image score only."""
  from rcae_jax.evaluation import maps as maps_lib  # pylint: disable=g-import-not-at-top
  return maps_lib.predict(params, images, nets=nets, config=config,
                          normalisers=normalisers, outputs=maps_lib.MAP_SCORE)


def export_predict(params, config, path: str, *,
                   platforms: Sequence[str] | None = None, normalisers=None):
  """Writes the serialised inference function of `config` with `params`
  (and, for eval.scoring='fused', the `normalisers`) baked in to `path`
  (atomically); returns the `jax.export.Exported`."""
  from rcae_jax.evaluation import scoring_checks  # pylint: disable=g-import-not-at-top
  from rcae_jax.model import inference  # pylint: disable=g-import-not-at-top
  scoring_checks.check_scoring(config)
  size = int(config.data.image_size)
  nets = inference.build_networks(config.model)
  fn = functools.partial(predict_map_score, params, nets=nets, config=config,
                         normalisers=normalisers)
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


EXPORT_FOLDER = 'export'
FUNCTION_FILE = 'predict.stablehlo'
MODEL_JSON = 'model.json'
SERVE_SCRIPT = 'serve_export.py'
# The standalone scorer, beside this module (it imports nothing of the
# package, so that it runs wherever the artefact is copied).
SERVE_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            SERVE_SCRIPT)


def _shape(aval) -> list:
  """Symbolic dimensions by name ('b'), fixed ones as ints."""
  return [d if isinstance(d, int) else str(d) for d in aval.shape]


def describe(exported: jax.export.Exported, config, thresholds: dict) -> dict:
  """model.json: everything a serving process needs besides the function,
  read off the artefact itself where it can be (shapes, platforms)."""
  (image,) = exported.in_avals
  outputs = exported.out_tree.unflatten(
      [{'shape': _shape(a), 'dtype': str(a.dtype)}
       for a in exported.out_avals])
  return {
      'function': FUNCTION_FILE,
      'input': {'shape': _shape(image), 'dtype': str(image.dtype),
                'meaning': 'RGB images, 0-255, each resized to image_size '
                           'x image_size with Pillow bilinear resampling'},
      'outputs': outputs,
      'image_size': int(config.data.image_size),
      'input_dtype': str(image.dtype),
      'thresholds': {k: float(thresholds[k]) for k in
                     ('image', 'pixel', 'display_min', 'display_max')},
      'decision': "DEFECT when score >= thresholds['image'], else OK",
      'scoring': config.eval.scoring,
      'platforms': list(exported.platforms),
      'jax_version': jax.__version__,
      'calling_convention_version': int(exported.calling_convention_version),
  }


def run_export(config, workdir: str) -> dict:
  """Writes <workdir>/export/ from the latest checkpoint and
  thresholds.json; returns model.json's contents."""
  from rcae_jax.serving import params as params_lib  # pylint: disable=g-import-not-at-top
  from rcae_jax.serving import predict  # pylint: disable=g-import-not-at-top
  from rcae_jax.evaluation import fusion  # pylint: disable=g-import-not-at-top
  thresholds = predict.load_thresholds(workdir)
  normalisers = fusion.for_config(config, workdir)
  params = jax.device_get(params_lib.load_params(config, workdir))
  out = os.path.join(workdir, EXPORT_FOLDER)
  exported = export_predict(params, config, os.path.join(out, FUNCTION_FILE),
                            platforms=config.export.platforms or None,
                            normalisers=normalisers)
  meta = describe(exported, config, thresholds)
  if normalisers is not None:  # Informational: the artefact holds them.
    meta['fusion_normalisers'] = normalisers
  fileio.write_json_atomic(os.path.join(out, MODEL_JSON), meta)
  with open(SERVE_SOURCE, 'rb') as f:
    fileio.write_bytes_atomic(os.path.join(out, SERVE_SCRIPT), f.read())
  logging.info('Exported to %s for %s (jax %s): run `python %s %s '
               'IMAGE_FOLDER` where jax, numpy and Pillow are installed',
               out, ', '.join(meta['platforms']), jax.__version__,
               os.path.join(out, SERVE_SCRIPT), out)
  return meta
