"""Issue 36's stage-3 levers: CRD's output head without per-image
statistics (`model.crd_head`) and the stage-3 loss (`train.stage3.loss`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rcae_jax import validate
from rcae_jax.common import programs
from rcae_jax.model import losses
from rcae_jax.model import models


def _crd_maps(head, scales=(0.2, 0.05)):
  """CRD's logits for one image whose residual is each of `scales` times a
  fixed pattern (a batch, one program), with random weights (a
  zero-initialised head would give a flat map, so the weights are
  perturbed)."""
  crd = models.CRD(width=4, residual=True, head=head)
  rng = np.random.default_rng(0)
  image = rng.uniform(0.3, 0.7, (1, 16, 16, 3)).astype(np.float32)
  bump = rng.uniform(0, 1, (1, 16, 16, 3)).astype(np.float32)
  images = np.repeat(image, len(scales), 0)
  details = np.stack([images + np.reshape(scales, (-1, 1, 1, 1)) * bump] * 2)
  params = jax.device_get(programs.run_unoptimised(
      crd.init, jax.random.PRNGKey(0), details, images))['params']
  params = jax.tree.map(
      lambda p: p + 0.2 * rng.standard_normal(p.shape).astype(np.float32),
      params)
  # Compiled once, unoptimised: eagerly every op of the U-Net compiles on
  # its own, optimised the program takes longer to build than to run.
  return np.asarray(programs.run_unoptimised(crd.apply, {'params': params},
                                             details, images))


def test_plain_head_keeps_the_residuals_scale():
  # With a per-image norm before the last conv, scaling the whole residual
  # barely moves the map (it is relative to the image); the plain head's
  # map follows the residual's size.
  def spread(head):
    big, small = _crd_maps(head)
    return np.abs(big - small).mean()
  assert spread('plain') > 5 * spread('groupnorm')


def test_plain_head_has_no_norm_before_the_output():
  x = jnp.zeros((2, 1, 16, 16, 3))

  def names(head):  # Shapes only: nothing is computed.
    shapes = jax.eval_shape(models.CRD(width=4, head=head).init,
                            jax.random.PRNGKey(0), x, x[0])['params']
    return {jax.tree_util.keystr(p)
            for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  with_norm, plain = names('groupnorm'), names('plain')
  # Exactly one GroupNorm (scale and bias) fewer.
  assert plain < with_norm and len(with_norm - plain) == 2
  assert all('GroupNorm' in n for n in with_norm - plain)


@pytest.mark.parametrize('kind', losses.CRD_LOSSES)
def test_crd_losses_reward_the_right_map(kind):
  mask = np.zeros((2, 16, 16, 1), np.float32)
  mask[0, 4:7, 4:7] = 1.0  # ~2 % positives; the second image is clean.
  right = jnp.asarray(np.where(mask > 0, 6.0, -6.0))
  flat_low = jnp.full(mask.shape, -6.0)
  inverted = -right
  values = [float(losses.crd_loss(m, jnp.asarray(mask), kind))
            for m in (right, flat_low, inverted)]
  assert values[0] < values[1] < values[2], values
  grads = jax.grad(lambda l: losses.crd_loss(l, jnp.asarray(mask), kind))(
      jnp.zeros(mask.shape))
  assert np.isfinite(np.asarray(grads)).all()


def test_focal_loss_gives_small_positives_their_share():
  # Against L2 on the sigmoid, focal spends more of its gradient on the
  # few positive pixels when the map starts flat (CRD's zero-init head).
  mask = np.zeros((1, 32, 32, 1), np.float32)
  mask[0, 10:13, 10:13] = 1.0
  mask = jnp.asarray(mask)

  def positive_share(kind):
    g = np.abs(np.asarray(jax.grad(
        lambda l: losses.crd_loss(l, mask, kind))(jnp.full(mask.shape,
                                                           -2.0))))
    return g[np.asarray(mask) > 0].sum() / g.sum()
  assert positive_share('focal') > positive_share('l2')


@pytest.mark.parametrize('fields, message', [
    ({'model.crd_head': 'layernorm'}, 'model.crd_head'),
    ({'train.stage3.loss': 'dice'}, 'train.stage3.loss'),
])
def test_lever_choices_are_checked(make_config, fields, message):
  with pytest.raises(validate.ConfigError, match=message):
    validate.validate(make_config(**fields))
