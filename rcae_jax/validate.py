"""Config checks that run before any data is read or anything compiles.

A wrong setting should fail in the first second with one sentence naming
the field, not minutes later as a traceback from inside XLA or tf.data.
"""

from __future__ import annotations

from rcae_jax.common import errors
from rcae_jax.evaluation import scoring_checks


# jax.export's names for the platforms an artefact can be lowered for.
EXPORT_PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


# Re-exported: main and callers catch validate.ConfigError.
ConfigError = errors.ConfigError


def choice(value, name, options):
  if value not in options:
    raise ConfigError(f'config.{name} must be one of {options}, got {value!r}')


def check_tiling(config, height: int, width: int) -> None:
  """data.tile_size / tile_overlap / tile_sampling (rcae_jax/data/tiling.py)."""
  d = config.data
  size = d.tile_size
  if (not isinstance(size, int) or isinstance(size, bool) or size < 0):
    raise ConfigError('config.data.tile_size must be 0 (off) or a tile side '
                      f'in source pixels >= 1, got {size!r}')
  choice(d.tile_sampling, 'data.tile_sampling', ('random', 'grid'))
  if not 0 <= d.tile_overlap < 1:
    raise ConfigError('config.data.tile_overlap is the fraction of a tile\'s '
                      f'side that neighbouring tiles share, in [0, 1), got '
                      f'{d.tile_overlap!r}')
  if not size:
    return
  if height != width:
    raise ConfigError(
        f'config.data.tile_size={size} cuts square tiles: set a square '
        f'config.data.image_size (S), got (H, W) = {(height, width)}')
  if d.resize != 'squash':
    raise ConfigError(
        f'config.data.tile_size={size} keeps the aspect ratio itself (each '
        'image is scaled by image_size / tile_size and edge-padded where it '
        "is smaller than a tile): leave config.data.resize='squash', got "
        f'{d.resize!r}')
  if config.mode in ('export', 'depth_report', 'fusion_report',
                     'shortcut_report'):
    raise ConfigError(
        f"config.mode='{config.mode}' does not support tiling yet: set "
        'config.data.tile_size=0')


THRESHOLD_METHODS = ('quantile', 'f1', 'fixed')


def check_thresholds(e) -> None:
  """eval.threshold and the fields of its method
  (rcae_jax/evaluation/thresholds.py)."""
  choice(e.threshold, 'eval.threshold', THRESHOLD_METHODS)
  for name in ('image_quantile', 'pixel_quantile'):
    if not 0 < e[name] <= 1:
      raise ConfigError(f'config.eval.{name} must lie in (0, 1], got '
                        f'{e[name]!r}')
  if e.threshold == 'f1' and not 0 < e.f1_val_fraction < 1:
    raise ConfigError("config.eval.threshold='f1' holds out "
                      'config.eval.f1_val_fraction of the test images: it '
                      f'must lie in (0, 1), got {e.f1_val_fraction!r}')
  if e.threshold == 'fixed' and not e.fixed_image_threshold > 0:
    raise ConfigError("config.eval.threshold='fixed' needs "
                      'config.eval.fixed_image_threshold > 0 (an image '
                      'score: DEFECT when score >= it), got '
                      f'{e.fixed_image_threshold!r}')
def check_levers(config) -> None:
  """DPN's guide, CRD's inputs and map, and the pseudo-anomalies."""
  from rcae_jax.model import losses  # pylint: disable=g-import-not-at-top
  from rcae_jax.model import models  # pylint: disable=g-import-not-at-top
  from rcae_jax.training import anomalies  # pylint: disable=g-import-not-at-top
  m, e = config.model, config.eval
  choice(m.dpn_guide, 'model.dpn_guide', losses.DPN_GUIDES)
  choice(m.crd_head, 'model.crd_head', models.CRD_HEADS)
  choice(config.train.stage3.loss, 'train.stage3.loss', losses.CRD_LOSSES)
  if m.dpn_guide == 'blurred_grad' and not m.dpn_guide_sigma > 0:
    raise ConfigError('config.model.dpn_guide_sigma must be > 0 with '
                      f"dpn_guide='blurred_grad', got {m.dpn_guide_sigma}")
  if e.crd_sigma < 0:
    raise ConfigError(f'config.eval.crd_sigma must be >= 0, got '
                      f'{e.crd_sigma}')
  dropout = config.train.stage3.input_dropout
  if not 0 <= dropout < 1:
    raise ConfigError('config.train.stage3.input_dropout must lie in [0, 1), '
                      f'got {dropout}')
  if dropout and not m.crd_residual:
    raise ConfigError('config.train.stage3.input_dropout needs '
                      'config.model.crd_residual=True: without the residual '
                      'channels a dropped sample shows CRD nothing')
  try:
    anomalies.check_config(config.anomalies)
  except ValueError as err:
    raise ConfigError(f'config.anomalies: {err}') from None


def validate(config) -> None:
  m, d, t, e = config.model, config.data, config.train, config.eval
  choice(m.recursion, 'model.recursion', ('depth', 'iterative'))
  choice(m.dtype, 'model.dtype', ('float32', 'bfloat16'))
  choice(d.loader, 'data.loader', ('auto', 'tfdata', 'memory'))
  choice(d.format, 'data.format', ('mvtec', 'visa'))
  choice(e.scoring, 'eval.scoring', ('crd', 'recursion', 'fused', 'auto'))
  if e.scoring == 'auto' and d.tile_size:
    raise ConfigError("config.eval.scoring='auto' is not available for "
                      'tiled runs (config.data.tile_size): choose '
                      "'crd', 'recursion' or 'fused'")
  choice(e.recursion_reduce, 'eval.recursion_reduce',
          ('mean', 'max', 'last'))
  choice(e.image_score, 'eval.image_score', ('max', 'mean', 'top_mean'))
  choice(e.smoothing, 'eval.smoothing', ('box', 'box_valid', 'gaussian'))
  if not 0 < e.top_fraction <= 1:
    raise ConfigError('config.eval.top_fraction must lie in (0, 1], got '
                      f'{e.top_fraction!r}')
  choice(e.pixel_resolution, 'eval.pixel_resolution',
          ('ground_truth', 'model'))
  levels_in_use = m.depth if m.recursion == 'depth' else m.iterative_levels
  if (m.bottleneck_channels != 3 and levels_in_use > 1 and
      (m.share_weights or m.recursion == 'iterative')):
    raise ConfigError(
        f'config.model.bottleneck_channels={m.bottleneck_channels} needs '
        'config.model.share_weights=False: a shared encoder step reads both '
        'the 3-channel image and the previous code, so the code must have '
        '3 channels too')
  if m.skips and not 0 < m.skip_channels < 3 * m.bottleneck_channels:
    raise ConfigError(
        f'config.model.skip_channels={m.skip_channels} must lie in 1..'
        f'{3 * m.bottleneck_channels - 1}: bottleneck + skip must stay below '
        f'4 x bottleneck = {4 * m.bottleneck_channels} values per position, '
        'or the skip could carry the previous level losslessly (an identity '
        'path)')
  if m.depth < 1:
    raise ConfigError(f'config.model.depth must be >= 1, got {m.depth}')
  # DPN / CRD U-Nets have 4 levels; the recursion halves `levels_in_use`
  # times.
  factor = 2 ** max(levels_in_use, 4)
  from rcae_jax.data import geometry  # pylint: disable=g-import-not-at-top
  choice(d.resize, 'data.resize', geometry.RESIZE_MODES)
  height, width = geometry.as_hw(d.image_size)
  if height % factor or width % factor or min(height, width) < 1:
    raise ConfigError(
        f'config.data.image_size={d.image_size} must be divisible by '
        f'{factor}' + ('' if height == width else ' on both sides (H, W)') +
        ' (2**max(recursion levels, 4 U-Net levels))')
  if height != width and 'rot90' in str(d.augment):
    raise ConfigError(
        f"config.data.augment='{d.augment}': rot90 needs a square "
        f'config.data.image_size, got (H, W) = {(height, width)}')
  check_tiling(config, height, width)
  if config.mode == 'export' and (height != width or d.resize != 'squash'):
    raise ConfigError(
        "config.mode='export' supports a square config.data.image_size with "
        "config.data.resize='squash' only, got image_size="
        f'{d.image_size}, resize={d.resize!r}')
  if t.batch_size < 1 or e.batch_size < 1:
    raise ConfigError('config.train.batch_size and config.eval.batch_size '
                      'must be >= 1')
  for s in (1, 2, 3):
    stage = t[f'stage{s}']
    if stage.steps < 0 or stage.learning_rate <= 0:
      raise ConfigError(f'config.train.stage{s}: steps must be >= 0 and '
                        'learning_rate > 0')
    choice(stage.schedule, f'train.stage{s}.schedule',
            ('constant', 'cosine'))
  if t.crop_size and (t.crop_size > min(height, width) or
                      t.crop_size % factor):
    raise ConfigError(
        f'config.train.crop_size={t.crop_size} must be at most '
        f'data.image_size={d.image_size} (its shorter side) and divisible '
        f'by {factor}')
  check_thresholds(e)
  for s in (1, 2, 3):
    epochs = t[f'stage{s}'].epochs
    if epochs < 0:
      raise ConfigError(f'config.train.stage{s}.epochs must be >= 0 (0 = '
                        f'use steps), got {epochs}')
  if e.every_steps < 0:
    raise ConfigError('config.eval.every_steps must be >= 0 (0 = off)')
  check_levers(config)
  if t.stage1.steps == 0 and config.mode == 'train':
    raise ConfigError('config.train.stage1.steps must be > 0: every later '
                      'stage builds on the recursive autoencoder')
  scoring_checks.check_scoring(config)
  if config.mode == 'predict' and not config.predict.inputs:
    raise ConfigError("config.mode='predict' needs config.predict.inputs (a "
                      'folder or comma-separated image files)')
  if config.predict.flush_seconds < 0:
    raise ConfigError('config.predict.flush_seconds must be >= 0, got '
                      f'{config.predict.flush_seconds}')
  for platform in config.export.platforms:
    choice(platform, 'export.platforms[]', EXPORT_PLATFORMS)
  if not config.workdir_lock.stale_minutes > 0:
    raise ConfigError('config.workdir_lock.stale_minutes must be > 0, got '
                      f'{config.workdir_lock.stale_minutes}')
  if t.log_every < 1 or t.checkpoint_every < 1:
    raise ConfigError('config.train.log_every and checkpoint_every must be '
                      '>= 1')
