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


# ------------------------------------------------- style='realistic' (ours)


def _real(**kw):
  """The realistic style with `realistic.<key>` overrides."""
  cfg = anomalies.default_config()
  cfg.style = 'realistic'
  for k, v in kw.items():
    setattr(cfg.realistic, k, v)
  return cfg


def _grey(h=32, w=32, seed=0, n=B):
  """Grey (all channels equal) grid-like textures, [n, h, w, 3]."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  out = []
  for i in range(n):
    g = 0.7 + 0.05 * rng.standard_normal((h, w))
    g[(yy + i) % 6 < 2] = 0.25
    g[(xx + 2 * i) % 6 < 2] = 0.25
    out.append(np.repeat(g[..., None], 3, -1))
  return np.clip(np.stack(out), 0, 1).astype(np.float32)


def _realistic_contract(images, out, mask, visible):
  """Outside the mask bit-identical; inside, some channel moved by more
  than the visibility threshold."""
  m = mask[..., 0] > 0.5
  np.testing.assert_array_equal(out[~m], images[~m])
  assert np.all(np.abs(out - images).max(axis=-1)[m] > visible)


@pytest.mark.parametrize('c', [1, 3])
def test_realistic_labels_only_visible_changes(c):
  images = _images(32, 32, c)
  cfg = _real(clean_fraction=0.0, visible_change=0.05,
              shape_weights=(1.0, 1.0, 1.0))
  out, mask = _run(cfg, images)
  _check_contract(images, out, mask)
  _realistic_contract(images, out, mask, 0.05)
  assert mask.sum() > 0


@pytest.mark.parametrize('label', ['pixel', 'region'])
@pytest.mark.parametrize('fill', ['palette', 'warp'])
def test_realistic_does_not_label_what_cannot_be_seen(fill, label):
  """On a flat image a palette colour is the image's own and a warp moves
  nothing: nothing visible changes, so nothing may be labelled (the old
  noise-texture lever labelled its blobs regardless)."""
  flat = np.full((B, 32, 32, 3), 0.4, np.float32)
  cfg = _real(clean_fraction=0.0, fills=(fill,), fill_weights=(1.0,),
              palette_jitter=0.0, label=label)
  out, mask = _run(cfg, flat)
  assert mask.sum() == 0
  np.testing.assert_array_equal(out, flat)


def test_realistic_is_grey_on_grey_images_paper_style_is_not():
  """The measurement of issue 25 item 2, as a test: the paper's colours
  put chroma on most masked pixels of a grey image; the realistic style
  puts none anywhere."""
  images = _grey()
  chroma = lambda x: x.max(-1) - x.min(-1)
  out, mask = _run(anomalies.default_config(), images)
  m = mask[..., 0] > 0
  assert (chroma(out)[m] > 0.05).mean() > 0.3
  cfg = _real(clean_fraction=0.0, shape_weights=(1.0, 1.0, 1.0),
              invert_prob=0.5)
  for seed in range(3):
    out, mask = _run(cfg, images, seed)
    assert mask.sum() > 0
    assert chroma(out).max() < 1e-6


def test_realistic_areas_and_clean_fraction():
  """Blobs of exactly the drawn area (within the configured range), and
  about half of the samples clean; the paper's default covers far more."""
  images = np.random.default_rng(0).uniform(0, 1, (64, 32, 32, 3)).astype(
      np.float32)
  # Inversion of noise: every covered pixel but the few near 0.5 changes.
  cfg = _real(shapes=('blob',), shape_weights=(1.0,), fills=('self',),
              fill_weights=(1.0,), gamma=(1.0, 1.0), invert_prob=1.0,
              min_opacity=1.0, edge_sigma=0.0, min_area=0.01, max_area=0.04)
  out, mask = _run(cfg, images)
  area = mask.mean(axis=(1, 2, 3))
  anomalous = area > 0
  assert 0.3 < 1 - anomalous.mean() < 0.7  # clean_fraction 0.5
  assert area[anomalous].min() >= 0.01 * 0.9 - 1 / 1024
  assert area[anomalous].max() <= 0.04 + 1 / 1024
  cfg.realistic.clean_fraction = 0.0
  _, mask = _run(cfg, images)
  assert np.all(mask.mean(axis=(1, 2, 3)) > 0)


def test_realistic_region_labels_are_whole_outlines():
  """A rotated copy of a texture changes some pixels of the outline and
  not others: 'pixel' labels that speckle, 'region' the whole blob of the
  drawn area, a superset of it; outside the label the input is kept."""
  images = _grey(n=16)
  kw = dict(clean_fraction=0.0, shapes=('blob',), shape_weights=(1.0,),
            fills=('self',), fill_weights=(1.0,), edge_sigma=0.0,
            min_area=0.02, max_area=0.04)
  _, pixel = _run(_real(label='pixel', **kw), images)
  out, region = _run(_real(label='region', **kw), images)
  m = region[..., 0] > 0.5
  np.testing.assert_array_equal(out[~m], images[~m])
  assert np.all(region >= pixel)
  area = region.mean(axis=(1, 2, 3))
  assert area.min() >= 0.02 * 0.9 - 1 / 1024 and area.max() <= 0.04 + 1 / 1024
  assert region.sum() > 1.2 * pixel.sum()


def test_realistic_scars_are_thin_and_at_any_angle():
  images = np.random.default_rng(1).uniform(0, 1, (32, 64, 64, 1)).astype(
      np.float32)
  cfg = _real(clean_fraction=0.0, shapes=('scar',), shape_weights=(1.0,),
              fills=('self',), fill_weights=(1.0,), invert_prob=1.0,
              min_opacity=1.0, edge_sigma=0.0, scar_width=0.0,
              scar_length=(0.3, 0.5))
  _, mask = _run(cfg, images)
  angles = []
  for m in mask[..., 0] > 0:
    ys, xs = np.nonzero(m)
    # A 1 px wide scar of length <= 32 px: few pixels, far longer than wide.
    assert 0 < len(ys) <= 2 * 33
    cov = np.cov(np.stack([ys, xs]))
    evals, evecs = np.linalg.eigh(cov)
    assert evals[1] > 10 * max(evals[0], 1e-3)
    angles.append(np.degrees(np.arctan2(*evecs[:, 1])) % 180)
  angles = np.asarray(angles)
  oblique = (np.abs(angles % 90 - 45) < 30)
  assert oblique.sum() >= 8  # Not only horizontal and vertical.


def test_realistic_warp_and_self_fills_move_texture():
  """On a texture, warps and rotated self-fills change what they cover,
  and their labels obey the contract."""
  images = _grey(seed=2)
  for fill in ('warp', 'self'):
    cfg = _real(clean_fraction=0.0, fills=(fill,), fill_weights=(1.0,),
                min_area=0.03, max_area=0.05, warp_max=0.1)
    out, mask = _run(cfg, images)
    _realistic_contract(images, out, mask, 0.02)
    assert (mask.mean(axis=(1, 2, 3)) > 0).mean() >= 0.5, fill


def test_realistic_style_is_validated():
  with pytest.raises(ValueError, match='style'):
    anomalies.check_config(_cfg(style='fancy'))
  with pytest.raises(ValueError, match='shapes'):
    anomalies.check_config(_real(shapes=('blob', 'star'),
                                 shape_weights=(1.0, 1.0)))
  with pytest.raises(ValueError, match='max_area'):
    anomalies.check_config(_real(min_area=0.1, max_area=0.01))
  with pytest.raises(ValueError, match='label'):
    anomalies.check_config(_real(label='outline'))
  anomalies.check_config(_real())
