"""Image gradients, DPN's guide and the losses of the paper.

Stage 1 and 2: L1(a, b) + L1(a', b'); stage 3: L2(a, b) + L2(a', b'); x'
is the first-order gradient image (forward differences along H and W,
per channel). Gradient operator is ours: the paper leaves it open.

DPN's guide (`model.dpn_guide`, ours) is what DPN sees of the input beside
I_R^n. The default signed forward difference is lossless up to a constant:
a U-Net can integrate it back into I, defects included. The other guides
lose what integration needs (the sign and direction, or the fine detail).
"""

import numpy as np
import jax
import jax.numpy as jnp

DPN_GUIDES = ('signed_diff', 'grad_mag', 'blurred_grad')
# Stage 3's loss on CRD's logits (`train.stage3.loss`).
CRD_LOSSES = ('l2', 'focal', 'bce_dice')
# The focusing exponent of the focal loss (Lin et al., 2017; DRAEM trains
# its segmentation network with the same value).
FOCAL_GAMMA = 2.0


def gradients(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Forward differences along H and W of [..., H, W, C], zero-padded at the
  far edge so both keep x's shape."""
  dy = jnp.diff(x, axis=-3, append=x[..., -1:, :, :])
  dx = jnp.diff(x, axis=-2, append=x[..., :, -1:, :])
  return dy, dx


def gradient_image(x: jax.Array) -> jax.Array:
  """I' as network input: [..., H, W, 2C] (dy and dx stacked)."""
  return jnp.concatenate(gradients(x), axis=-1)


def gaussian_blur_image(x: jax.Array, sigma: float) -> jax.Array:
  """Separable Gaussian blur of [..., H, W, C] per channel, edge-padded.
  `sigma` (px) is static; <= 0 returns x."""
  if sigma <= 0:
    return x
  r = max(1, int(np.ceil(3 * sigma)))
  t = np.arange(-r, r + 1, dtype=np.float32)
  k = np.exp(-t * t / (2 * sigma * sigma))
  k = jnp.asarray(k / k.sum())
  pad = [(0, 0)] * (x.ndim - 3) + [(r, r), (r, r), (0, 0)]
  xp = jnp.pad(x, pad, mode='edge')
  h, w = x.shape[-3], x.shape[-2]
  y = sum(k[i] * xp[..., i:i + h, :, :] for i in range(2 * r + 1))
  return sum(k[i] * y[..., :, i:i + w, :] for i in range(2 * r + 1))


def guide_image(x: jax.Array, kind: str = 'signed_diff',
                sigma: float = 1.0) -> jax.Array:
  """DPN's guide from I [..., H, W, C] (`model.dpn_guide`, ours):
  - 'signed_diff': `gradient_image(x)`, [..., 2C] (the original);
  - 'grad_mag': sqrt(sum over channels of dy^2 + dx^2), [..., 1]: no sign
    or direction, so no integration back to I;
  - 'blurred_grad': `gradient_image` of x blurred with a Gaussian of
    `sigma` px, [..., 2C]: integrates only to a blurred I."""
  if kind == 'signed_diff':
    return gradient_image(x)
  if kind == 'grad_mag':
    dy, dx = gradients(x)
    # The epsilon keeps sqrt's derivative finite at flat pixels.
    return jnp.sqrt(jnp.sum(dy * dy + dx * dx, axis=-1, keepdims=True)
                    + 1e-12)
  if kind == 'blurred_grad':
    return gradient_image(gaussian_blur_image(x, sigma))
  raise ValueError(f'model.dpn_guide must be one of {DPN_GUIDES}, got '
                   f'{kind!r}')


def l1_with_gradient(pred: jax.Array, target: jax.Array) -> jax.Array:
  pdy, pdx = gradients(pred)
  tdy, tdx = gradients(target)
  return (jnp.mean(jnp.abs(pred - target))
          + jnp.mean(jnp.abs(pdy - tdy)) + jnp.mean(jnp.abs(pdx - tdx)))


def l2_with_gradient(pred: jax.Array, target: jax.Array) -> jax.Array:
  pdy, pdx = gradients(pred)
  tdy, tdx = gradients(target)
  return (jnp.mean(jnp.square(pred - target))
          + jnp.mean(jnp.square(pdy - tdy)) + jnp.mean(jnp.square(pdx - tdx)))


def crd_loss(logits: jax.Array, mask: jax.Array, kind: str = 'l2'
             ) -> jax.Array:
  """Stage 3's loss of CRD's logits [B, H, W, 1] against the pseudo-anomaly
  mask in [0, 1] (`train.stage3.loss`):
  - 'l2' (the paper): L2(M_A, M_P) + L2(M_A', M_P') on the sigmoid map;
  - 'focal' (ours): the sigmoid focal loss, gamma 2, mean over pixels. With
    a few per cent positive pixels, an L2 on the sigmoid is minimised early
    by a map that is low everywhere; focal down-weights the easy
    negatives so the small positives keep their share of the gradient;
  - 'bce_dice' (ours): binary cross-entropy plus a soft Dice loss over each
    image's pixels (1 - Dice; an image without positives counts 0 there), a
    term that is blind to how many negatives there are."""
  if kind == 'l2':
    return l2_with_gradient(jax.nn.sigmoid(logits), mask)
  # Binary cross-entropy of the logits, stable for large |logits|.
  bce = jax.nn.softplus(logits) - logits * mask
  if kind == 'focal':
    p = jax.nn.sigmoid(logits)
    p_true = p * mask + (1 - p) * (1 - mask)
    return jnp.mean(bce * (1 - p_true) ** FOCAL_GAMMA)
  if kind == 'bce_dice':
    p = jax.nn.sigmoid(logits)
    axes = tuple(range(1, logits.ndim))
    inter = jnp.sum(p * mask, axis=axes)
    total = jnp.sum(p + mask, axis=axes)
    has_positive = jnp.sum(mask, axis=axes) > 0
    dice = jnp.where(has_positive, 1 - 2 * inter / jnp.maximum(total, 1e-6),
                     0.0)
    return jnp.mean(bce) + jnp.mean(dice)
  raise ValueError(f'train.stage3.loss must be one of {CRD_LOSSES}, got '
                   f'{kind!r}')
