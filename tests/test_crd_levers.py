"""Issue 36's stage-3 levers: CRD's output head without per-image
statistics (`model.crd_head`) and the stage-3 loss (`train.stage3.loss`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rcae_jax import validate
from rcae_jax.model import losses
from rcae_jax.model import models


def _crd_map(head, scale):
  """CRD's logits for one image whose residual is `scale` times a fixed
  pattern, with random weights (a zero-initialised head would give a flat
  map, so the head's weights are perturbed)."""
  crd = models.CRD(width=4, residual=True, head=head)
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.uniform(0.3, 0.7, (1, 16, 16, 3)), jnp.float32)
  bump = jnp.asarray(rng.uniform(0, 1, (1, 16, 16, 3)), jnp.float32)
  details = jnp.broadcast_to(image + scale * bump, (2, 1, 16, 16, 3))
  params = crd.init(jax.random.PRNGKey(0), details, image)['params']
  params = jax.tree.map(
      lambda p: p + 0.2 * rng.standard_normal(p.shape, np.float32), params)
  return np.asarray(crd.apply({'params': params}, details, image))


def test_plain_head_keeps_the_residuals_scale():
  # With a per-image norm before the last conv, scaling the whole residual
  # barely moves the map (it is relative to the image); the plain head's
  # map follows the residual's size.
  def spread(head):
    return np.abs(_crd_map(head, 0.2) - _crd_map(head, 0.05)).mean()
  assert spread('plain') > 5 * spread('groupnorm')


def test_plain_head_has_no_norm_before_the_output():
  crd = models.CRD(width=4, head='plain')
  x = jnp.zeros((2, 1, 16, 16, 3))
  names = set(jax.tree_util.keystr(p) for p, _ in
              jax.tree_util.tree_flatten_with_path(
                  crd.init(jax.random.PRNGKey(0), x, x[0])['params'])[0])
  with_norm = set(jax.tree_util.keystr(p) for p, _ in
                  jax.tree_util.tree_flatten_with_path(
                      models.CRD(width=4).init(jax.random.PRNGKey(0), x,
                                               x[0])['params'])[0])
  # Exactly one GroupNorm (scale and bias) fewer.
  assert len(with_norm - names) == 2
  assert all('GroupNorm' in n for n in with_norm - names)


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
