"""The Python API: train a workdir, load it, score arrays in memory.

    import rcae_jax
    det = rcae_jax.Detector.load('workdirs/parts')
    result = det.score(frames)            # uint8 [B, H, W, 3], a list, paths
    result.scores, result.decisions, result.maps[0]

The same functions serve the command line: `train` and
`Detector.evaluate` / `Detector.export` run `run.run` as `main` does, and
`Detector.score` runs the one scoring path of `--config.mode=predict`
(serving/predict.py `model_outputs`), so its scores are predict's numbers.
Every error a caller can cause is a `DetectorError` (a `ValueError`) that
names what is wrong; nothing is printed (logging stays absl's).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence, Union

import ml_collections
import numpy as np
from PIL import Image

from rcae_jax import config_files
from rcae_jax.common import checkpoints
from rcae_jax.common import fileio
from rcae_jax.common.errors import ConfigError
from rcae_jax.data import decode
from rcae_jax.evaluation import fusion
from rcae_jax.evaluation import scoring_choice

# What `Detector.score` accepts: one image or a batch as an array, a PIL
# image, a path, or a list of any of these but batches.
ImageLike = Union[np.ndarray, Image.Image, str, os.PathLike]
Images = Union[ImageLike, Sequence[ImageLike]]


class DetectorError(ConfigError):
  """An input, workdir or setting the API cannot use; the message says
  which and what is wrong. A `ValueError` (through ConfigError)."""


@dataclasses.dataclass(frozen=True)
class Result:
  """What `Detector.score` returns for B images, in input order.

  maps: float32 [H, W] per image, at that image's own size (as predict's
    TIFF maps); scores: float32 [B] image scores; decisions: 'OK' or
    'DEFECT' per image at the workdir's image threshold; pixel_masks: bool
    [H, W] per image, the map at or above the pixel threshold."""
  maps: list[np.ndarray]
  scores: np.ndarray
  decisions: list[str]
  pixel_masks: list[np.ndarray]

  def __len__(self) -> int:
    return len(self.decisions)


@dataclasses.dataclass(frozen=True)
class Detector:
  """A trained workdir held in memory: its config, thresholds, parameters
  placed on the device once, and the jitted predict program (compiled on
  the first batch of each input shape). Make one with `Detector.load` or
  `rcae_jax.train`."""
  workdir: str
  config: ml_collections.ConfigDict
  thresholds: dict
  params: Any = dataclasses.field(repr=False)
  predict_fn: Callable = dataclasses.field(repr=False)

  @classmethod
  def load(cls, workdir: str, **overrides: Any) -> 'Detector':
    """The latest checkpoint of `workdir`, its config.json (with
    `overrides`, dotted names, e.g. **{'eval.batch_size': 4}) and its
    thresholds.json."""
    from rcae_jax.serving import predict  # pylint: disable=g-import-not-at-top
    config = _trained_config(workdir, overrides)
    try:
      config = scoring_choice.resolve(config, workdir)
      normalisers = fusion.for_config(config, workdir)
      predict_fn, params = predict.load_scorer(config, workdir, normalisers)
    except (ValueError, FileNotFoundError) as e:
      raise DetectorError(f'cannot load {workdir}: {e}') from e
    return cls(workdir, config, predict.load_thresholds(workdir), params,
               predict_fn)

  def score(self, images: Images) -> Result:
    """Maps, scores, decisions and pixel masks of `images`: one array
    [H, W], [H, W, C] or a batch [B, H, W, C] (C = 1 or 3; uint8, or float
    in [0, 1], quantised to 8 bits as a saved PNG would be), a PIL image,
    a path, or a list of these of any sizes. Batched at eval.batch_size,
    resized, laid out or tiled exactly as `--config.mode=predict` does."""
    from rcae_jax.serving import predict  # pylint: disable=g-import-not-at-top
    arrays = as_rgb8_images(images)
    size = self.config.eval.batch_size
    maps, scores = [], []
    for start in range(0, len(arrays), size):
      chunk = arrays[start:start + size]
      small, extents, chunk_scores = predict.model_outputs(
          self.predict_fn, self.params, chunk, self.config)
      maps += [predict.image_size_map(m, e, im.shape[:2])
               for m, e, im in zip(small, extents, chunk)]
      scores.append(np.asarray(chunk_scores, np.float32))
    scores = np.concatenate(scores)
    return Result(
        maps=maps, scores=scores,
        decisions=[predict.decision(float(s), self.thresholds['image'])
                   for s in scores],
        pixel_masks=[m >= self.thresholds['pixel'] for m in maps])

  def evaluate(self, **overrides: Any) -> dict:
    """`--config.mode=evaluate` on the workdir (metrics.json,
    thresholds.json, pictures); returns the metrics report. This
    Detector keeps the thresholds it was loaded with: load it again to
    use new ones."""
    return _run(self.workdir, self.config_for('evaluate', overrides))

  def export(self, **overrides: Any) -> dict:
    """`--config.mode=export`: the inference function as StableHLO under
    <workdir>/export/; returns its model.json contents."""
    return _run(self.workdir, self.config_for('export', overrides))

  def config_for(self, mode: str, overrides: dict) -> ml_collections.ConfigDict:
    """The workdir's saved config (as the CLI reads it without --config)
    in `mode`, with `overrides`."""
    config = _trained_config(self.workdir, overrides)
    config.mode = mode
    return config


def train(workdir: str, config: Union[str, ml_collections.ConfigDict, None]
          = None, **overrides: Any) -> Detector:
  """Trains (or resumes) a workdir as `python -m rcae_jax.main --config
  CONFIG --workdir WORKDIR` does, evaluation included, and returns its
  Detector. `config`: a config file's path, a ConfigDict, or None for the
  workdir's own config.json; `overrides`: dotted names, e.g.
  **{'data.root': '/data', 'train.stage1.steps': 100}."""
  if config is None:
    config = _saved_config(workdir)
  elif isinstance(config, (str, os.PathLike)):
    if not os.path.isfile(config):
      raise DetectorError(f'config file {os.fspath(config)!r} does not exist')
    config = config_files.load(os.fspath(config))
  else:
    config = config.copy_and_resolve_references()
  config = with_overrides(config, overrides)
  config.mode = 'train'
  _run(workdir, config)
  return Detector.load(workdir)


def with_overrides(config: ml_collections.ConfigDict, overrides: dict
                   ) -> ml_collections.ConfigDict:
  """A copy of `config` with each dotted field of `overrides` set; an
  unknown field is a DetectorError naming it."""
  config = config.copy_and_resolve_references()
  for name, value in overrides.items():
    *parents, leaf = name.split('.')
    node = config
    for part in parents:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) \
          else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise DetectorError(f'unknown config field {name!r} (configs/default.py '
                          'lists every field)')
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise DetectorError(f'config field {name!r}: {e}') from None
  return config


def as_rgb8_images(images: Images) -> list[np.ndarray]:
  """`images` (see Detector.score) as uint8 [H, W, 3] arrays, the form
  predict decodes files to (data/decode.py)."""
  if isinstance(images, (list, tuple)):
    if not images:
      raise DetectorError('no images to score: the list is empty')
    return [_one(x, f'item {i} of the list') for i, x in enumerate(images)]
  if not isinstance(images, (Image.Image, str, os.PathLike)):
    array = _array(images, 'the input')
    if array.ndim == 4:
      if not len(array):
        raise DetectorError('no images to score: the batch is empty')
      return [_rgb8(a, f'image {i} of the batch')
              for i, a in enumerate(array)]
  return [_one(images, 'the image')]


def _array(value, where: str) -> np.ndarray:
  """A numpy (or JAX, or array-like) image as a numpy array."""
  try:
    array = np.asarray(value)
  except (TypeError, ValueError):
    array = None
  if array is None or array.dtype == object:
    raise DetectorError(f'cannot score {where}, a {type(value).__name__}: '
                        'give a numpy array, a PIL image, a path, or a list '
                        'of these')
  return array


def _one(image: ImageLike, where: str) -> np.ndarray:
  if isinstance(image, Image.Image):
    return np.asarray(decode.to_rgb8(image), np.uint8)
  if isinstance(image, (str, os.PathLike)):
    try:
      return decode.load_image(os.fspath(image), None)
    except (OSError, ValueError) as e:
      raise DetectorError(f'{where}: {e}') from None
  array = _array(image, where)
  if array.ndim == 4:
    raise DetectorError(f'{where} is a batch {array.shape}: pass a batch '
                        'as one array, or a list of single images')
  return _rgb8(array, where)


def _rgb8(array: np.ndarray, where: str) -> np.ndarray:
  """One image [H, W] or [H, W, C] (C = 1 or 3) to uint8 [H, W, 3]."""
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3):
    raise DetectorError(
        f'{where} has shape {array.shape}: expected [H, W], [H, W, 1] or '
        '[H, W, 3] (a batch: [B, H, W, C])')
  if min(array.shape[:2]) < 1:
    raise DetectorError(f'{where} has shape {array.shape}: it is empty')
  if array.dtype == np.uint8:
    pass
  elif np.issubdtype(array.dtype, np.floating):
    low, high = float(np.min(array)), float(np.max(array))
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 1:
      raise DetectorError(
          f'{where} is {array.dtype} with values in [{low:g}, {high:g}]: '
          'float images must lie in [0, 1] (or pass uint8 in [0, 255])')
    array = np.round(array * 255.0).astype(np.uint8)
  else:
    raise DetectorError(f'{where} has dtype {array.dtype}: expected uint8, '
                        'or float in [0, 1]')
  return np.ascontiguousarray(np.broadcast_to(array, (*array.shape[:2], 3)))


def _saved_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not fileio.exists(path):
    raise DetectorError(f'{workdir} has no config.json: it is not a '
                        'workdir this package trained (give a config to '
                        'train a new one)')
  return config_files.from_saved(config_files.read_saved(path))


def _trained_config(workdir: str, overrides: dict
                    ) -> ml_collections.ConfigDict:
  """The workdir's config with `overrides`, after checking the workdir has
  what scoring needs (checkpoints and thresholds.json)."""
  if not fileio.exists(workdir):
    raise DetectorError(f'workdir {workdir} does not exist')
  config = with_overrides(_saved_config(workdir), overrides)
  if not checkpoints.complete_steps(os.path.join(workdir, 'checkpoints')):
    raise DetectorError(f'{workdir} has no checkpoint: train it first '
                        '(rcae_jax.train or --config.mode=train)')
  if not fileio.exists(os.path.join(workdir, 'thresholds.json')):
    raise DetectorError(f'{workdir} has checkpoints but no thresholds.json '
                        '(training did not reach its evaluation): run '
                        'Detector.evaluate or --config.mode=evaluate first')
  return config


def _run(workdir: str, config: ml_collections.ConfigDict) -> dict:
  """run.run, its errors as DetectorError."""
  from rcae_jax import run  # pylint: disable=g-import-not-at-top
  try:
    return run.run(config, workdir)
  except (ValueError, FileNotFoundError) as e:  # Config, data, workdir.
    raise DetectorError(str(e)) from e
