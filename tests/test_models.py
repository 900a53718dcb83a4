"""Model shapes, weight sharing, and the equivalences the models rely on."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rcae_jax.model import models
from rcae_jax.training import train


def unoptimised(fn):
  """`fn` compiled once without XLA:CPU's optimisations. Eager U-Nets
  compile every op apart and optimised builds take longer still (~25 s
  either way on 2 cores); these tests check shapes and values, not speed."""
  return functools.partial(train.run_unoptimised, fn)


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
  grads = jnp.zeros((2, 32, 32, 6))
  out = unoptimised(dpn.apply)(
      unoptimised(dpn.init)(jax.random.PRNGKey(0), recs, grads), recs, grads)
  assert out.shape == recs.shape
  # Zero-initialised head: an untrained DPN leaves I_R unchanged.
  np.testing.assert_array_equal(out, recs)
  crd = models.CRD(width=2)
  logits = unoptimised(crd.apply)(
      unoptimised(crd.init)(jax.random.PRNGKey(0), recs, img), recs, img)
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


def _jacobian_rank(model, params, x, depth):
  """Rank of d I_R^depth / d I at x: how many independent directions of
  the input survive to the depth-`depth` reconstruction."""
  flat = lambda v: model.apply(params, v.reshape(x.shape),
                               depth=depth).reshape(-1)
  jac = np.asarray(jax.jacfwd(flat)(x.reshape(-1)), np.float64)
  s = np.linalg.svd(jac, compute_uv=False)
  return int((s > s[0] * 1e-4).sum())


@pytest.mark.parametrize('skips', [True, False])
def test_no_identity_path_every_depth_loses_information(skips):
  """docs/method.md: depth n must lose information n times, and no path may
  let the decoder copy the input. The Jacobian of the depth-n
  reconstruction w.r.t. the input factors through whatever reaches the
  first decoder step, so its rank is bounded by the number of values
  there: 3 per position at 1/2 size for n = 1 (the code alone), and
  code + skip (3 + 3) per position at 1/2^n size for n > 1. A wide skip
  (the bug this guards against: the encoder's 16-channel features, a
  lossless copy of the step's input) gave depth 1 full rank."""
  side, depth = 16, 3
  m = models.RcAE(depth=depth, width=16, num_res_blocks=1, skips=skips)
  x = jax.random.uniform(jax.random.PRNGKey(0), (1, side, side, 3))
  params = m.init(jax.random.PRNGKey(1), x)
  ranks = [_jacobian_rank(m, params, x, n) for n in range(1, depth + 1)]
  skip = 3 if skips else 0
  bounds = [3 * (side // 2) ** 2] + [
      (3 + skip) * (side // 2 ** n) ** 2 for n in range(2, depth + 1)]
  assert all(r <= b for r, b in zip(ranks, bounds)), (ranks, bounds)
  assert ranks[0] <= x.size // 4, ranks  # Depth 1 is a 4x compression.
  # Each deeper level loses more: strictly fewer surviving directions.
  assert all(a > b for a, b in zip(ranks, ranks[1:])), ranks


def test_crd_normalize_ignores_brightness_and_contrast():
  """With crd_normalize, CRD sees a dark low-contrast image and its
  reconstructions exactly as it sees a bright high-contrast copy (the
  same affine change of every input), so a small grey-level defect on a
  dark category is not a small signal to it."""
  crd = models.CRD(width=2, normalize=True)
  key = jax.random.PRNGKey(0)
  image = jax.random.uniform(key, (1, 16, 16, 3))
  dets = jax.random.uniform(jax.random.PRNGKey(1), (2, 1, 16, 16, 3))
  params = unoptimised(crd.init)(key, dets, image)
  # Zero-initialised heads answer 0 to anything: perturb every weight.
  leaves, tree = jax.tree.flatten(params)
  params = jax.tree.unflatten(tree, [  # numpy: no program per leaf shape.
      p + 0.3 * np.random.default_rng(i).standard_normal(p.shape, np.float32)
      for i, p in enumerate(leaves)])
  apply = unoptimised(crd.apply)
  bright = apply(params, dets, image)
  dark = apply(params, 0.2 * dets + 0.05, 0.2 * image + 0.05)
  # Equal up to the 1e-3 guard on the standard deviation.
  np.testing.assert_allclose(dark, bright, rtol=0.05, atol=0.05)
  plain = unoptimised(models.CRD(width=2).apply)
  assert float(jnp.abs(plain(params, 0.2 * dets + 0.05, 0.2 * image + 0.05) -
                       plain(params, dets, image)).max()) > 0.1
