"""Tests for rcae_jax.training.anomalies (pseudo-anomaly synthesis)."""

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest

from rcae_jax.training import anomalies

B = 8
SHAPES = [(32, 32), (24, 40)]


def _images(h, w, c, seed=0):
  rng = np.random.default_rng(seed)
  # Smooth-ish texture plus noise, like a real defect-free image.
  base = rng.uniform(0.2, 0.8, size=(B, 1, 1, c))
  noise = rng.uniform(-0.1, 0.1, size=(B, h, w, c))
  return np.clip(base + noise, 0.0, 1.0).astype(np.float32)


def _cfg(**kw):
  cfg = anomalies.default_config()
  for k, v in kw.items():
    setattr(cfg, k, v)
  return cfg


_JITTED = {}


def _jitted(cfg):
  """One jitted function per distinct config, so equal configs reuse the
  compilation cache across tests (keeps the suite fast)."""
  key = repr(sorted(cfg.items()))
  if key not in _JITTED:
    frozen = ml_collections.FrozenConfigDict(cfg)
    _JITTED[key] = jax.jit(lambda k, x: anomalies.synthesize(k, x, frozen))
  return _JITTED[key]


def _run(cfg, images, seed=0):
  fn = _jitted(cfg)
  out, mask = fn(jax.random.PRNGKey(seed), jnp.asarray(images))
  return np.asarray(out), np.asarray(mask)


def _check_contract(images, out, mask):
  b, h, w, c = images.shape
  assert out.shape == (b, h, w, c) and out.dtype == np.float32
  assert mask.shape == (b, h, w, 1) and mask.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0
  assert np.all((mask == 0.0) | (mask == 1.0))
  m = mask[..., 0] > 0.5
  # Outside the mask: bit-identical.
  np.testing.assert_array_equal(out[~m], images[~m])
  # Inside the mask: every pixel differs in some channel.
  diff = np.abs(out - images).max(axis=-1)
  assert np.all(diff[m] > anomalies.CHANGE_EPS)


def test_default_config_fields():
  cfg = anomalies.default_config()
  assert cfg.clean_fraction == 0.2
  assert tuple(cfg.kinds) == ('patch', 'line', 'copy_paste')
  assert len(cfg.kind_weights) == len(cfg.kinds)
  assert 0 < cfg.min_size <= cfg.max_size
  assert cfg.max_patches >= 1
  assert 0 < cfg.min_opacity <= 1


@pytest.mark.parametrize('hw', SHAPES)
@pytest.mark.parametrize('c', [1, 3])
def test_contract_default(hw, c):
  images = _images(*hw, c)
  out, mask = _run(anomalies.default_config(), images)
  _check_contract(images, out, mask)


@pytest.mark.parametrize('kind', ['patch', 'line', 'copy_paste'])
@pytest.mark.parametrize('hw', SHAPES)
def test_each_kind_alone(kind, hw):
  images = _images(*hw, 3, seed=1)
  cfg = _cfg(kinds=(kind,), kind_weights=(1.0,), clean_fraction=0.0)
  out, mask = _run(cfg, images)
  _check_contract(images, out, mask)
  nonempty = (mask.reshape(B, -1).sum(-1) > 0).sum()
  assert nonempty >= B - 1, (kind, nonempty)


def test_clean_fraction_one_is_identity():
  images = _images(32, 32, 3)
  out, mask = _run(_cfg(clean_fraction=1.0), images)
  assert np.all(mask == 0.0)
  np.testing.assert_array_equal(out, images)


@pytest.mark.parametrize('hw', SHAPES)
def test_clean_fraction_zero_mostly_nonempty(hw):
  images = _images(*hw, 3)
  out, mask = _run(_cfg(clean_fraction=0.0), images)
  _check_contract(images, out, mask)
  nonempty = (mask.reshape(B, -1).sum(-1) > 0).sum()
  assert nonempty >= B - 1


def test_deterministic_and_key_dependent():
  images = _images(32, 32, 3)
  cfg = _cfg(clean_fraction=0.0)
  out1, mask1 = _run(cfg, images, seed=3)
  out2, mask2 = _run(cfg, images, seed=3)
  np.testing.assert_array_equal(out1, out2)
  np.testing.assert_array_equal(mask1, mask2)
  out3, mask3 = _run(cfg, images, seed=4)
  assert not np.array_equal(mask1, mask3)
  assert not np.array_equal(out1, out3)


def test_per_sample_masks_differ():
  # Same image in every slot: differences can only come from per-sample keys.
  images = np.repeat(_images(32, 32, 3)[:1], B, axis=0)
  out, mask = _run(_cfg(clean_fraction=0.0), images)
  flat = mask.reshape(B, -1)
  distinct = {flat[i].tobytes() for i in range(B)}
  assert len(distinct) >= B - 1


def test_synthesize_one_matches_shapes():
  image = jnp.asarray(_images(24, 40, 1)[0])
  cfg = _cfg(clean_fraction=0.0)
  out, mask = jax.jit(lambda k, x: anomalies.synthesize_one(k, x, cfg))(
      jax.random.PRNGKey(0), image)
  assert out.shape == (24, 40, 1) and mask.shape == (24, 40, 1)
  _check_contract(np.asarray(image)[None], np.asarray(out)[None],
                  np.asarray(mask)[None])


def test_patch_min_contrast():
  # One opaque patch per sample on an untouched image: the mean absolute
  # change inside the mask must reach min_contrast in every channel.
  images = _images(32, 32, 3, seed=2)
  cfg = _cfg(kinds=('patch',), kind_weights=(1.0,), clean_fraction=0.0,
             max_patches=1, min_opacity=1.0, min_contrast=0.2)
  out, mask = _run(cfg, images)
  _check_contract(images, out, mask)
  for i in range(B):
    m = mask[i, ..., 0] > 0.5
    assert m.any()
    change = np.abs(out[i][m] - images[i][m]).mean(axis=0)
    assert np.all(change >= 0.2 - 1e-5), change


def test_flat_image_copy_paste_still_visible():
  # Copy-paste on a constant image copies identical content; the brightness
  # fallback must still make a visible change, and the mask stays exact.
  images = np.full((B, 32, 32, 3), 0.5, np.float32)
  cfg = _cfg(kinds=('copy_paste',), kind_weights=(1.0,), clean_fraction=0.0)
  out, mask = _run(cfg, images)
  _check_contract(images, out, mask)
  assert np.all(mask.reshape(B, -1).sum(-1) > 0)


def test_invalid_config_raises():
  images = jnp.asarray(_images(32, 32, 3))
  with pytest.raises(ValueError):
    anomalies.synthesize(jax.random.PRNGKey(0), images,
                         _cfg(kinds=('bogus',), kind_weights=(1.0,)))
  with pytest.raises(ValueError):
    anomalies.synthesize(jax.random.PRNGKey(0), images,
                         _cfg(kind_weights=(1.0,)))


def test_noise_texture_anomalies_keep_the_mask_contract():
  """Blob-shaped regions filled from another image of the batch: exactly
  the masked pixels change, every anomalous sample gets some, and the fill
  comes from elsewhere (not a colour the shapes path could draw)."""
  cfg = _cfg(noise_fraction=1.0, clean_fraction=0.0)
  x = _images(32, 40, 3)
  out, mask = map(np.asarray, _jitted(cfg)(jax.random.PRNGKey(7), x))
  m = mask[..., 0].astype(bool)
  assert (m.mean(axis=(1, 2)) > 0).all()
  changed = np.abs(out - x).max(axis=-1) > anomalies.CHANGE_EPS
  np.testing.assert_array_equal(changed, m)
  assert m.mean() < 0.5  # Blobs, not the whole image.


def test_noise_fraction_zero_is_the_shapes_path_bit_for_bit():
  """Adding the noise kind must not change existing runs' anomalies."""
  x = _images(32, 32, 3)
  key = jax.random.PRNGKey(3)
  cfg = _cfg()
  shapes = jax.vmap(lambda k, im: anomalies.synthesize_one(k, im, cfg))(
      jax.random.split(key, B), x)
  for got, want in zip(_jitted(cfg)(key, x), shapes):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_noise_texture_keeps_clean_samples_clean():
  cfg = _cfg(noise_fraction=1.0, clean_fraction=1.0)
  x = _images(32, 32, 3)
  out, mask = _jitted(cfg)(jax.random.PRNGKey(1), x)
  assert float(jnp.abs(mask).max()) == 0.0
  np.testing.assert_array_equal(np.asarray(out), x)
