"""Model shapes, weight sharing, and the equivalences the models rely on."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rcae_jax.model import models
from rcae_jax.common import programs


def unoptimised(fn):
  """`fn` compiled once without XLA:CPU's optimisations. Eager U-Nets
  compile every op apart and optimised builds take longer still (~25 s
  either way on 2 cores); these tests check shapes and values, not speed."""
  return functools.partial(programs.run_unoptimised, fn)


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
  # Shapes only: nothing is computed.
  counts = {n: n_params(jax.eval_shape(
      models.RcAE(depth=n, width=4, recursion=recursion).init,
      jax.random.PRNGKey(0), x))
            for n in (1, 2, 4)}
  assert counts[1] == counts[2] == counts[4]


def test_unshared_ablation_grows_with_depth():
  x = jnp.zeros((1, 32, 32, 3))
  shared = jax.eval_shape(models.RcAE(depth=3, width=4).init,
                          jax.random.PRNGKey(0), x)
  separate = jax.eval_shape(
      models.RcAE(depth=3, width=4, share_weights=False).init,
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
  jac = np.asarray(unoptimised(jax.jacfwd(flat))(x.reshape(-1)), np.float64)
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
  params = unoptimised(m.init)(jax.random.PRNGKey(1), x)
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


# ----------------------------------------- issue 25: DPN's guide, CRD input

from rcae_jax.model import inference  # pylint: disable=g-import-not-at-top
from rcae_jax.model import losses  # pylint: disable=g-import-not-at-top


def test_guides_that_dpn_cannot_integrate_back():
  """'signed_diff' tells an image from its negative (it integrates back
  to I); 'grad_mag' does not (no sign), and 'blurred_grad' does not see
  a one-pixel checkerboard (no fine detail)."""
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3))
  signed = losses.guide_image(x, 'signed_diff')
  np.testing.assert_array_equal(signed, losses.gradient_image(x))
  assert signed.shape[-1] == 6  # dy and dx of each of 3 channels.
  assert float(jnp.abs(losses.guide_image(1 - x, 'signed_diff') -
                       signed).max()) > 0.5
  mag = losses.guide_image(x, 'grad_mag')
  assert mag.shape == (2, 16, 16, 1)
  np.testing.assert_allclose(losses.guide_image(1 - x, 'grad_mag'), mag,
                             atol=1e-6)
  checker = (np.indices((16, 16)).sum(0) % 2).astype(np.float32)
  checker = jnp.asarray(np.broadcast_to(checker[None, ..., None],
                                        (1, 16, 16, 3)))
  assert float(jnp.abs(losses.guide_image(checker, 'signed_diff')).max()) == 1
  blurred = losses.guide_image(checker, 'blurred_grad', sigma=2.0)
  assert blurred.shape == (1, 16, 16, 6)
  # Away from the edge padding, the fine pattern is gone.
  assert float(jnp.abs(blurred[:, 6:-6, 6:-6]).max()) < 0.01
  with pytest.raises(ValueError, match='dpn_guide'):
    losses.guide_image(x, 'laplacian')


@pytest.mark.parametrize('guide, channels', [('signed_diff', 6),
                                             ('grad_mag', 1),
                                             ('blurred_grad', 6)])
def test_dpn_reads_the_configured_guide(make_config, guide, channels):
  config = make_config(**{'model.dpn_guide': guide})
  nets = inference.build_networks(config.model)
  assert nets.dpn_guide == guide
  shapes = inference.abstract_params(nets, 32)
  first = shapes['dpn']['UNet_0']['Conv_0']['kernel'].shape
  assert first[2] == 3 + channels  # I_R^n (3) ⊕ the guide.


def _perturbed(params):
  leaves, tree = jax.tree.flatten(params)
  return jax.tree.unflatten(tree, [
      p + 0.3 * np.random.default_rng(i).standard_normal(p.shape, np.float32)
      for i, p in enumerate(leaves)])


def test_crd_residual_channels_and_input_dropout():
  """With `residual`, CRD gets |I_D^n - I| as 3 more channels; with an
  image's channels dropped, only that residual reaches it: shifting I and
  every I_D^n alike changes nothing, while it does change the full input's
  answer."""
  key = jax.random.PRNGKey(0)
  image = jax.random.uniform(key, (2, 16, 16, 3))
  dets = jax.random.uniform(jax.random.PRNGKey(1), (2, 2, 16, 16, 3))
  crd = models.CRD(width=2, residual=True)
  plain_shapes = jax.eval_shape(models.CRD(width=2).init, key, dets, image)
  params = unoptimised(crd.init)(key, dets, image)
  kernel = lambda p: p['params']['UNet_0']['DepthConv_0']['Conv_0']['kernel']
  # DepthConv stacks 3 neighbouring steps: 3 x (I_D ⊕ I ⊕ residual).
  assert kernel(params).shape[2] == 3 * 9
  assert kernel(plain_shapes).shape[2] == 3 * 6
  params = _perturbed(params)
  apply = unoptimised(crd.apply)
  keep = jnp.array([0.0, 1.0])
  a = apply(params, dets, image, keep)
  b = apply(params, dets + 0.2, image + 0.2, keep)
  np.testing.assert_allclose(a[0], b[0], atol=1e-5)  # Dropped: residual.
  assert float(jnp.abs(a[1] - b[1]).max()) > 1e-2  # Kept: sees the images.
  # Inference (keep None) is the kept case.
  np.testing.assert_allclose(apply(params, dets, image)[1], a[1], atol=1e-5)
