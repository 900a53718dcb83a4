"""Model shapes, weight sharing, and the equivalences the models rely on."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rcae_jax import models


def n_params(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('recursion', ['depth', 'iterative'])
def test_rcae_returns_all_depths(recursion):
  m = models.RcAE(depth=3, width=4, num_res_blocks=1, recursion=recursion)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3))
  params = m.init(jax.random.PRNGKey(1), x)
  recs = m.apply(params, x)
  assert recs.shape == (3, 2, 32, 32, 3)
  # depth=n gives exactly the n-th entry of the full sequence.
  np.testing.assert_allclose(m.apply(params, x, depth=2), recs[1], atol=1e-5)


@pytest.mark.parametrize('share,skips', [(True, True), (False, True),
                                         (True, False)])
def test_batched_decoding_equals_one_decode_per_depth(share, skips):
  """decode_all (one decoder call per level, depths stacked on the batch)
  gives every depth's reconstruction as its own decode loop does."""
  m = models.RcAE(depth=4, width=4, share_weights=share, skips=skips,
                  batch_decoding=True)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3))
  params = m.init(jax.random.PRNGKey(1), x)
  recs = m.apply(params, x)
  for n in range(1, 5):
    np.testing.assert_allclose(m.apply(params, x, depth=n), recs[n - 1],
                               atol=1e-5, err_msg=f'depth {n}')


@pytest.mark.parametrize('recursion', ['depth', 'iterative'])
def test_parameters_do_not_grow_with_depth(recursion):
  x = jnp.zeros((1, 64, 64, 3))
  counts = {n: n_params(models.RcAE(depth=n, width=4, recursion=recursion)
                       .init(jax.random.PRNGKey(0), x))
            for n in (1, 2, 4)}
  assert counts[1] == counts[2] == counts[4]


def test_unshared_ablation_grows_with_depth():
  x = jnp.zeros((1, 32, 32, 3))
  shared = models.RcAE(depth=3, width=4).init(jax.random.PRNGKey(0), x)
  separate = models.RcAE(depth=3, width=4, share_weights=False).init(
      jax.random.PRNGKey(0), x)
  assert n_params(separate) == 3 * n_params(shared)


def test_depths_differ():
  """Each depth is its own reconstruction, not a copy of another."""
  m = models.RcAE(depth=3, width=4)
  x = jax.random.uniform(jax.random.PRNGKey(0), (1, 32, 32, 3))
  recs = m.apply(m.init(jax.random.PRNGKey(1), x), x)
  assert float(jnp.abs(recs[0] - recs[2]).max()) > 1e-4


def test_scan_rolled_equals_unrolled():
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3))
  unrolled = models.RcAE(depth=3, width=4, recursion='iterative',
                         scan_unroll=True)
  rolled = models.RcAE(depth=3, width=4, recursion='iterative',
                       scan_unroll=False)
  params = unrolled.init(jax.random.PRNGKey(1), x)
  # Same parameter tree: the scan shares one set of weights either way.
  assert jax.tree.structure(params) == jax.tree.structure(
      rolled.init(jax.random.PRNGKey(1), x))
  np.testing.assert_allclose(unrolled.apply(params, x),
                             rolled.apply(params, x), atol=1e-5)


def test_pixel_shuffle_is_kernel2_stride2_transposed_conv():
  """1x1 conv to 4C + pixel shuffle == ConvTranspose(k=2, s=2)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 3))
  ct = nn.ConvTranspose(4, (2, 2), strides=(2, 2), use_bias=False)
  params = ct.init(jax.random.PRNGKey(1), x)
  # lax.conv_transpose applies the kernel spatially flipped.
  k = params['params']['kernel'][::-1, ::-1]  # [2, 2, Cin, Cout]
  # Our 1x1 conv output channel (i*2 + j)*Cout + o holds tap (i, j).
  w = jnp.transpose(k, (2, 0, 1, 3)).reshape(3, 16)
  ours = models.pixel_shuffle(jnp.einsum('bhwc,cd->bhwd', x, w))
  np.testing.assert_allclose(ours, ct.apply(params, x), atol=1e-5)


def test_depth_conv_is_a_3d_conv():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8, 8, 3))
  dc = models.DepthConv(4)
  params = dc.init(jax.random.PRNGKey(1), x)
  kernel = params['params']['Conv_0']['kernel'].reshape(3, 3, 3, 3, 4)
  bias = params['params']['Conv_0']['bias']
  # The 2-D kernel's input channels are [prev step, step, next step].
  k3 = jnp.transpose(kernel, (2, 0, 1, 3, 4))  # [D=3, H, W, Cin, Cout]
  ref = jax.lax.conv_general_dilated(
      x, k3, (1, 1, 1), 'SAME',
      dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC')) + bias
  np.testing.assert_allclose(dc.apply(params, x), ref, atol=1e-4)


def test_dpn_and_crd_shapes():
  recs = jnp.zeros((3, 2, 32, 32, 3))
  img = jnp.zeros((2, 32, 32, 3))
  dpn = models.DPN(width=4)
  out = dpn.apply(dpn.init(jax.random.PRNGKey(0), recs, jnp.zeros(
      (2, 32, 32, 6))), recs, jnp.zeros((2, 32, 32, 6)))
  assert out.shape == recs.shape
  # Zero-initialised head: an untrained DPN leaves I_R unchanged.
  np.testing.assert_array_equal(out, recs)
  crd = models.CRD(width=2)
  logits = crd.apply(crd.init(jax.random.PRNGKey(0), recs, img), recs, img)
  assert logits.shape == (2, 32, 32, 1)


def test_crd_step_indices():
  assert models.crd_step_indices(5, 0) == [0, 1, 2, 3, 4]
  assert models.crd_step_indices(5, 1) == [4]
  assert models.crd_step_indices(5, 3) == [0, 2, 4]
  assert models.crd_step_indices(5, 5) == [0, 1, 2, 3, 4]


def test_bad_image_size_is_a_clear_error():
  m = models.RcAE(depth=3, width=4)
  with pytest.raises(ValueError, match='divisible by 2\\*\\*depth'):
    m.init(jax.random.PRNGKey(0), jnp.zeros((1, 36, 36, 3)))
