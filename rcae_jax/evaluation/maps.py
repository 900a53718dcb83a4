"""The jitted function every evaluation runs: images to reconstructions,
detail-restored reconstructions, the anomaly map and the image score.

Pixel map, by `config.eval.scoring`:
- 'crd': M_A = sigmoid(CRD(...)), the paper's map, optionally blurred
  with a Gaussian of `eval.crd_sigma` px (ours; 0 = none).
- 'recursion': M(p) = 1/N sum_n 1/C sum_c |I_D^n(p, c) - I(p, c)| (I_R^n
  when DPN is off; `eval.recursion_reduce` may take the max over depths or
  the deepest depth instead of the mean), optionally blurred with a Gaussian of
  `eval.map_sigma` px. Normal regions are rebuilt at every depth; defects
  are not rebuilt at the deeper ones, so their error accumulates.
- 'fused' (ours): CRD's map / s_c + the recursion map / s_r, each divided by
  its median over the held-out good images (fusion.py; the fusion screen
  in docs/studies/2026-11-30-accuracy-study.md chose it).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from PIL import Image

from rcae_jax.common import programs
from rcae_jax.common import sharding
from rcae_jax.data import geometry
from rcae_jax.evaluation import fusion
from rcae_jax.evaluation import scoring
from rcae_jax.model import inference


def crd_map(nets: inference.Networks, params, dets, x, sigma: float = 0.0):
  """M_A = sigmoid(CRD(dets, x)), [B, H, W], blurred with a Gaussian of
  `sigma` px (eval.crd_sigma; 0 = the paper's raw map)."""
  return scoring.gaussian_blur(
      jax.nn.sigmoid(inference.crd_logits(nets, params, dets, x))[..., 0],
      sigma)


def recursion_map(dets, x, eval_cfg):
  """The recursion-error map of `eval.recursion_reduce`, blurred with
  `eval.map_sigma`, [B, H, W]."""
  return scoring.gaussian_blur(
      scoring.recursion_error_map(dets, x, eval_cfg.recursion_reduce),
      eval_cfg.map_sigma)


# What evaluation and production read back for every batch; the per-depth
# reconstructions ([N, B, H, W, 3] twice) only for the few pictures.
MAP_SCORE = ('map', 'score')


def predict(params, images, extents=None, *, nets: inference.Networks, config,
            normalisers=None, outputs=None):
  """Full inference: reconstructions, detail-restored ones, map, score.
  `extents` (int [B, 2], data.resize='keep_aspect'): each image's valid
  region, the only place its score may come from; None: all of it.
  `normalisers` (eval.scoring='fused' only): fusion.py's stored medians.
  `outputs` (static): the keys to return, e.g. MAP_SCORE, so that a jitted
  program neither keeps nor hands back the reconstructions; None: all."""
  x = inference.to_float(images)
  recs = inference.reconstructions(nets, params, x)
  dets = inference.details(nets, params, recs, x, inference.uses_dpn(config))
  if config.eval.scoring == 'crd':
    amap = crd_map(nets, params, dets, x, config.eval.crd_sigma)
  elif config.eval.scoring == 'recursion':
    amap = recursion_map(dets, x, config.eval)
  elif config.eval.scoring == 'fused':
    amap = fusion.fuse(crd_map(nets, params, dets, x,
                               config.eval.crd_sigma),
                       recursion_map(dets, x, config.eval), normalisers)
  else:
    raise ValueError(f"eval.scoring must be 'crd', 'recursion' or 'fused', "
                     f'got {config.eval.scoring!r}')
  valid = (None if extents is None
           else geometry.valid_mask(extents, amap.shape[1:]))
  out = {'recs': recs, 'details': dets, 'map': amap,
         'score': scoring.image_scores(amap, config.eval, valid)}
  return out if outputs is None else {k: out[k] for k in outputs}


# The batch axis of each output: every depth's images lead the
# reconstructions.
BATCH_AXIS = {'recs': 1, 'details': 1, 'map': 0, 'score': 0}


class PredictFn:
  """`predict` jitted: calling it runs the full program; `map_score` the
  map-and-score-only one, which evaluation and production run on every
  batch (each compiles on its first call). With a `mesh` of several
  devices both split each batch over them (`on_mesh`); `place` puts the
  parameters where the programs read them, once."""

  def __init__(self, config, nets, normalisers=None, mesh=None):
    fn = functools.partial(predict, nets=nets, config=config,
                           normalisers=normalisers)
    self.mesh = mesh if mesh is not None and mesh.devices.size > 1 else None
    wrap = jax.jit if self.mesh is None else functools.partial(
        on_mesh, mesh=self.mesh)
    self._full = wrap(fn)
    self.map_score = wrap(functools.partial(fn, outputs=MAP_SCORE))

  def __call__(self, *args):
    return self._full(*args)

  def place(self, params):
    """`params` on the programs' devices: host arrays handed to a jitted
    call are copied to the device again at every call."""
    return (jax.device_put(params) if self.mesh is None
            else sharding.replicate(params, self.mesh))


def on_mesh(fn, mesh):
  """fn(params, *batch) -> {name: array}, jitted, with every batch array
  split on its rows over the devices of `mesh` (each device maps its
  share) and the outputs gathered onto every device inside the program.
  Each process passes the whole host batch (every process loads every
  batch) and gets back its own device's copy of the outputs, unread, so
  callers read them as they read a one-device result. Rows that do not
  divide among the devices are padded with the first row, dropped again
  inside the program."""
  devices = mesh.devices.size

  @functools.partial(jax.jit, static_argnums=0,
                     out_shardings=sharding.replicated(mesh))
  def program(rows, params, *batch):
    return {k: jax.lax.slice_in_dim(v, 0, rows, axis=BATCH_AXIS[k])
            for k, v in fn(params, *batch).items()}

  def call(params, *batch):
    batch = [np.asarray(b) for b in batch]
    rows = len(batch[0])
    pad = -rows % devices
    if pad:
      batch = [np.concatenate([b, np.repeat(b[:1], pad, 0)]) for b in batch]
    out = program(rows, sharding.replicate(params, mesh),
                  *(sharding.split_rows(b, mesh) for b in batch))
    return {k: v.addressable_data(0) for k, v in out.items()}

  call.program = program  # Its compiled shardings: tests read them.
  return call


def map_score_fn(predict_fn):
  """The map-and-score-only program of a `make_predict_fn` result; any
  other callable (a test's stand-in) is used as it is."""
  return getattr(predict_fn, 'map_score', predict_fn)


# Predict programs, once per process for their settings: a multi-category
# run evaluates every category with the same one (common/programs.py).
_PREDICT_FNS = programs.Memo(maxsize=16)
# What `predict` reads of the config ('train': whether DPN is used).
PREDICT_SECTIONS = ('model', 'eval', 'train')


def make_predict_fn(config, nets=None, normalisers=None,
                    mesh=None) -> PredictFn:
  """`predict` of `config`, jitted; `normalisers` are closed over as
  constants (eval.scoring='fused'); `mesh`: split each batch over its
  devices (None: one device). The same PredictFn as an earlier call's with
  the same networks, normalisers, mesh and PREDICT_SECTIONS of the
  config."""
  nets = nets or inference.build_networks(config.model)
  key = (nets, mesh, programs.config_key(config, *PREDICT_SECTIONS),
         None if normalisers is None
         else tuple(sorted((k, float(v)) for k, v in normalisers.items())))
  return _PREDICT_FNS.get(
      key, lambda: PredictFn(config, nets, normalisers, mesh))


def place_params(predict_fn, params):
  """`params` placed for `predict_fn` (PredictFn.place); a stand-in
  without `place` gets them on the default device."""
  place = getattr(predict_fn, 'place', jax.device_put)
  return place(params)


def upsample(amap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of a float map to (H, W)."""
  if amap.shape == tuple(shape):
    return amap.astype(np.float32)
  img = Image.fromarray(amap.astype(np.float32), mode='F')
  return np.asarray(img.resize((shape[1], shape[0]),
                               Image.Resampling.BILINEAR))
