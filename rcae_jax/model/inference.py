"""The forward pass: the three networks and how their outputs chain.

What evaluation, predict, the benchmarks, the depth report and export run,
and what the training steps differentiate. Imports neither optax nor Orbax:
an inference-only process (a production scorer, a benchmark) loads no
training machinery.

    recs = reconstructions(nets, params, x)     # I_R^n, n = 1..N
    dets = details(nets, params, recs, x, ...)  # I_D^n (DPN), or recs
    logits = crd_logits(nets, params, dets, x)  # CRD's anomaly map
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rcae_jax.data import geometry
from rcae_jax.model import losses
from rcae_jax.model import models


@dataclasses.dataclass(frozen=True)
class Networks:
  rcae: models.RcAE
  dpn: models.DPN
  crd: models.CRD
  crd_steps: tuple[int, ...]  # Which recursion steps CRD sees (0-based).
  # DPN's guide made from I (`model.dpn_guide`, losses.guide_image) and the
  # blur of 'blurred_grad' (`model.dpn_guide_sigma`, px).
  dpn_guide: str = 'signed_diff'
  dpn_guide_sigma: float = 1.0

  def guide(self, x):
    return losses.guide_image(x, self.dpn_guide, self.dpn_guide_sigma)


def build_networks(model_cfg) -> Networks:
  return Networks(models.build_rcae(model_cfg), models.build_dpn(model_cfg),
                  models.build_crd(model_cfg),
                  tuple(models.crd_step_indices(model_cfg.depth,
                                                model_cfg.crd_steps)),
                  dpn_guide=model_cfg.dpn_guide,
                  dpn_guide_sigma=model_cfg.dpn_guide_sigma)


def uses_dpn(config) -> bool:
  """DPN is part of the model when stage 2 trains it."""
  return config.train.stage2.steps > 0


def uses_crd(config) -> bool:
  """CRD gives the anomaly map when stage 3 trains it."""
  return config.train.stage3.steps > 0


def to_float(images: jax.Array) -> jax.Array:
  """uint8 batches from the loaders to float32 in [0, 1], on device."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def init_params(nets: Networks, rng: jax.Array, image_size) -> dict:
  """{'rcae', 'dpn', 'crd'} parameters from one rng. `image_size`: S or
  (H, W) (the shapes do not depend on it: the networks are fully
  convolutional)."""
  height, width = geometry.as_hw(image_size)
  x = jnp.zeros((1, height, width, 3), jnp.float32)
  k1, k2, k3 = jax.random.split(rng, 3)
  rcae = nets.rcae.init(k1, x)['params']
  recs = jnp.zeros((nets.rcae.depth, *x.shape), jnp.float32)
  dpn = nets.dpn.init(k2, recs, nets.guide(x))['params']
  crd = nets.crd.init(k3, recs[jnp.array(nets.crd_steps)], x)['params']
  return {'rcae': rcae, 'dpn': dpn, 'crd': crd}


def abstract_params(nets: Networks, image_size):
  """init_params' shapes and dtypes, nothing computed or allocated."""
  # New containers around the memoised leaves (which are immutable).
  return jax.tree.map(lambda leaf: leaf,
                      _abstract_params(nets, geometry.as_hw(image_size)))


@functools.lru_cache(maxsize=8)
def _abstract_params(nets: Networks, image_hw: tuple[int, int]):
  # Once per process for each networks and size: tracing all three
  # networks takes 0.2-0.5 s (smoke config, 2-core CPU), and evaluation,
  # export and each category's run ask again.
  return jax.eval_shape(functools.partial(init_params, nets,
                                          image_size=image_hw),
                        jax.random.PRNGKey(0))


def reconstructions(nets: Networks, params, x):
  """All N reconstructions I_R^n, [N, B, H, W, C]."""
  return nets.rcae.apply({'params': params['rcae']}, x)


def details(nets: Networks, params, recs, x, use_dpn: bool):
  """I_D^n = I_R^n + DPN residual, or I_R^n when DPN is not used."""
  if not use_dpn:
    return recs
  return nets.dpn.apply({'params': params['dpn']}, recs, nets.guide(x))


def crd_logits(nets: Networks, params, dets, x, keep_images=None):
  """CRD's per-pixel anomaly logits, [B, H, W, 1]. `keep_images` (float
  [B]): stage 3's input dropout (models.CRD); None at inference."""
  return nets.crd.apply({'params': params['crd']},
                        dets[jnp.array(nets.crd_steps)], x, keep_images)


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
