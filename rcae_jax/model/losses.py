"""Image gradients and the reconstruction / detection losses of the paper.

Stage 1 and 2: L1(a, b) + L1(a', b'); stage 3: L2(a, b) + L2(a', b'); x'
is the first-order gradient image (forward differences along H and W,
per channel). Gradient operator is ours: the paper leaves it open.
"""

import jax
import jax.numpy as jnp


def gradients(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Forward differences along H and W of [..., H, W, C], zero-padded at the
  far edge so both keep x's shape."""
  dy = jnp.diff(x, axis=-3, append=x[..., -1:, :, :])
  dx = jnp.diff(x, axis=-2, append=x[..., :, -1:, :])
  return dy, dx


def gradient_image(x: jax.Array) -> jax.Array:
  """I' as network input: [..., H, W, 2C] (dy and dx stacked)."""
  return jnp.concatenate(gradients(x), axis=-1)


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
