"""The loops that run the jitted predict over a split: fixed-shape padded
batches (one compilation), tiled images stitched back, and only what is
needed kept on the host.

Tiled runs (`data.tile_size`, tiling.py) map each image at its working
resolution, blended from overlapping tiles; the image score is then taken
from the stitched map (`scoring.map_score`), and 'model' resolution means
the working resolution.
"""

from __future__ import annotations

import logging

import numpy as np

from rcae_jax.data import geometry
from rcae_jax.data import tiling as tiling_lib
from rcae_jax.evaluation import maps as maps_lib
from rcae_jax.evaluation import scoring


def collect(loader, batch_size: int, fn, split: str = 'test') -> dict:
  """Runs `fn(batch, valid) -> {name: array [B, ...]}` over a split and
  returns {name: array [n, ...]} without the padding rows, plus each
  example's 'label' and 'mask'. The last batch is padded to a fixed shape
  so that jit compiles once; `valid` marks its real rows. Only what `fn`
  returns is kept for the whole split, so per-batch work that must not
  hold host memory (keeping a few pictures) belongs inside `fn`.

  Batch k is read back only after batch k + 1 has been dispatched, so the
  device computes one batch while the host loads the next and copies the
  last one out: `fn` should return device arrays without waiting on them."""
  rows, pending = {}, None

  def read_back(out, valid):
    for name, value in out.items():
      rows.setdefault(name, []).append(np.asarray(value)[valid])

  for batch in loader.test_batches(batch_size, split=split):
    valid = np.asarray(batch['valid'], bool)
    out = dict(fn(batch, valid), label=batch['label'], mask=batch['mask'])
    if pending is not None:
      read_back(*pending)
    pending = (out, valid)
  if pending is not None:
    read_back(*pending)
  return {name: np.concatenate(parts) for name, parts in rows.items()}


def picture_outputs(predict_fn, params, items: dict, batch_size: int,
                    padded: bool) -> dict:
  """{index: (recs [N, H, W, 3], details, box)} for `items` {index: (image
  [H, W, 3], extent (h, w), box)}: the full predict (every depth's
  reconstructions) run on just these images, in batches of `batch_size`
  (the evaluation's shape), instead of reading every batch's
  reconstructions back for the few pictures."""
  kept, order = {}, sorted(items)
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    images = np.stack([items[i][0] for i in idx])
    extents = np.asarray([items[i][1] for i in idx], np.int32)
    pad = batch_size - len(idx)
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]),
                                              images.dtype)])
    extents = np.concatenate([extents, np.repeat(extents[:1], pad, 0)])
    out = (predict_fn(params, images, extents) if padded
           else predict_fn(params, images))
    recs, dets = np.asarray(out['recs']), np.asarray(out['details'])
    for j, i in enumerate(idx):
      kept[i] = (recs[:, j], dets[:, j], items[i][2])
  return kept


def run_predictions(params, loader, config, split: str = 'test',
                    predict_fn=None, keep=()):
  """Maps [n, S, S], scores [n], labels [n], model-size masks [n, S, S],
  and {index: (recs, details, box)} for the example indices in `keep` (for
  pictures; everything else is dropped at once to bound host memory; `box`
  (y, x, h, w): the region of the map that recs and details show, here the
  valid region). Tiled loaders: `run_tiled_predictions`."""
  predict_fn = predict_fn or maps_lib.make_predict_fn(config)
  if loader.tiling is not None:
    return run_tiled_predictions(params, loader, config, split, predict_fn,
                                 keep)
  keep, pictured, offset = set(keep), {}, 0
  map_score = maps_lib.map_score_fn(predict_fn)
  # Squashed images fill the model size: the program without extents.
  padded = config.data.resize != 'squash'

  def step(batch, valid):
    nonlocal offset
    args = ((batch['image'], batch['extent']) if padded
            else (batch['image'],))
    # Maps and scores only: the reconstructions stay on the device.
    out = map_score(params, *args)
    for j in np.flatnonzero(valid):
      if offset + j in keep:
        extent = tuple(int(v) for v in batch['extent'][j])
        pictured[offset + j] = (np.asarray(batch['image'][j]), extent,
                                (0, 0) + extent)
    offset += int(valid.sum())
    # A full predict function (a stand-in without `map_score`) hands back
    # the reconstructions too: only the map and score are rows.
    return {k: out[k] for k in maps_lib.MAP_SCORE}

  rows = collect(loader, config.eval.batch_size, step, split)
  kept = picture_outputs(predict_fn, params, pictured,
                         config.eval.batch_size, padded)
  return rows['map'], rows['score'], rows['label'], rows['mask'], kept


def run_tiled_predictions(params, loader, config, split: str, predict_fn,
                          keep=()):
  """`run_predictions` of a tiled loader: maps and masks are lists of
  each image's stitched map and mask at its working resolution; scores
  come from the stitched maps; `kept[i]` holds the tile of image i whose
  map peaks highest, with its box in the stitched map.

  Tiles run through the program without extents, the one untiled squashed
  images run through: an image of one tile's size maps bit for bit as it
  does untiled."""
  keep, best, labels, masks = set(keep), {}, [], []
  map_score = maps_lib.map_score_fn(predict_fn)
  tiles = 0

  def images():
    for image, mask, label in loader.tiled_examples(split):
      labels.append(label)
      masks.append(mask)
      yield image

  def predict_tiles(batch, pieces):
    nonlocal tiles
    tiles += len(pieces)
    maps = np.asarray(map_score(params, batch)['map'])
    for j, p in enumerate(pieces):
      if p.image in keep:
        peak = float(maps[j, :p.extent[0], :p.extent[1]].max())
        if p.image not in best or peak > best[p.image][0]:
          best[p.image] = (peak, np.asarray(batch[j]), tuple(p.extent),
                           p.origin + p.extent)
    return maps

  maps = [m for _, m in tiling_lib.stitch_stream(
      images(), predict_tiles, loader.tiling, config.eval.batch_size)]
  scores = np.asarray([scoring.map_score(m, config.eval) for m in maps], np.float32)
  t = loader.tiling
  logging.info('Tiled %s: %d images as %d tiles of %d source px (%d model '
               'px, overlap %.2f)', split, len(maps), tiles, t.tile, t.side,
               t.overlap)
  kept = picture_outputs(predict_fn, params,
                         {i: v[1:] for i, v in best.items()},
                         config.eval.batch_size, padded=False)
  return maps, scores, np.asarray(labels, np.int32), masks, kept


def valid_regions(masks, maps, extents) -> tuple[list, list]:
  """Model-size masks and maps as lists of their valid regions (masks as
  bool)."""
  return ([geometry.crop(m, e).astype(bool) for m, e in zip(masks, extents)],
          [geometry.crop(m, e) for m, e in zip(maps, extents)])
