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
