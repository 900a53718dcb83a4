"""Prediction on production images: maps, overlays, scores, decisions.

`config.mode='predict'` loads the trained workdir (its latest checkpoint
and thresholds.json) and scores `config.predict.inputs` (a folder, searched
recursively, or comma-separated folders and image files) of any size: each
image is resized to the model size, batches are padded to a fixed size
(one compiled program for every input, whatever its resolution), and each
map (its valid region, with data.resize='keep_aspect') is resized back to
the image's own resolution. Per image: a float32
TIFF map and an overlay PNG under its unique name (predict_inputs.py), and
a row with the image score and an OK/DEFECT decision at the stored image
threshold. With `data.tile_size` (tiling.py) each image is instead cut
into overlapping tiles at its working resolution, the tiles of a batch's
images share fixed-size batches, and the blended map goes back to the
image's own resolution.

Built for a production line's folders: an image that cannot be decoded
becomes an ERROR row with the reason and the rest are scored; rows are
appended to predictions.csv as they are produced (predict_report.py), with
progress and an ETA in the log, so an interrupted run keeps what it did and
a rerun skips it. predictions.json (all rows plus a summary) is written at
the end, and the command exits with PARTIAL_FAILURE_EXIT when any row is an
ERROR.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time

import numpy as np

from rcae_jax.common import fileio
from rcae_jax.common import sharding
from rcae_jax.data import decode
from rcae_jax.data import geometry
from rcae_jax.data import tiling as tiling_lib
from rcae_jax.evaluation import export_maps
from rcae_jax.evaluation import fusion
from rcae_jax.evaluation import maps as maps_lib
from rcae_jax.evaluation import scoring
from rcae_jax.evaluation import visualize
from rcae_jax.serving import params as params_lib
from rcae_jax.serving import predict_inputs
from rcae_jax.serving import predict_report

# Exit status of `main` when the reports are complete but some images could
# not be read: a caller can tell it from a failed run (status 1).
PARTIAL_FAILURE_EXIT = 3


def load_thresholds(workdir: str) -> dict:
  path = os.path.join(workdir, 'thresholds.json')
  if not fileio.exists(path):
    raise FileNotFoundError(
        f'{path} is missing: train the workdir first (--config.mode=train; '
        'it ends by evaluating, which writes thresholds.json), or, when '
        'it has checkpoints, run --config.mode=evaluate on it')
  return fileio.read_json(path)


def decode_or_reason(path: str):
  """(uint8 [H, W, 3] image, None), or (None, why it cannot be read).

  Any exception counts: a frame is untrusted input, and Pillow raises more
  than OSError on broken files (SyntaxError for some PNG chunks,
  DecompressionBombError, struct.error)."""
  try:
    return decode.load_image(path, None), None
  except Exception as e:  # pylint: disable=broad-except
    reason = str(e) if isinstance(e, decode.DataError) else (
        f'cannot decode image {path!r}: {type(e).__name__}: {e}')
    return None, reason


def decoded_chunks(inputs, batch_size: int, workers: int):
  """Yields (inputs, [(image | None, reason | None)]) per batch, decoding
  the next batch on `workers` threads while the current one is scored
  (Pillow releases the GIL while it decodes)."""
  chunks = [inputs[s:s + batch_size]
            for s in range(0, len(inputs), batch_size)]
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    submit = lambda chunk: [pool.submit(decode_or_reason, x.path)
                            for x in chunk]
    ahead = submit(chunks[0]) if chunks else None
    for i, chunk in enumerate(chunks):
      current = ahead
      ahead = submit(chunks[i + 1]) if i + 1 < len(chunks) else None
      yield chunk, [f.result() for f in current]


def padded_batch(images, batch_size: int, size, resize: str = 'squash'
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [batch_size, H, W, 3], int32 [batch_size, 2]): the images laid
  out at the model size `size` (S or (H, W); geometry.py), the batch
  zero-padded to a fixed size, and each image's valid region."""
  hw = geometry.as_hw(size)
  small = [geometry.layout_image(im, hw, resize) for im in images]
  pad = [np.zeros(hw + (3,), np.uint8)] * (batch_size - len(small))
  extents = [geometry.extent(im.shape[:2], hw, resize) for im in images]
  extents += [hw] * (batch_size - len(small))
  return np.stack(small + pad), np.asarray(extents, np.int32)


def tiled_maps(predict_fn, params, images, config
               ) -> tuple[list[np.ndarray], list[float]]:
  """Stitched maps at the working resolution and their image scores, for
  images at their own resolution (data.tile_size > 0)."""
  tiling = tiling_lib.from_config(config.data)
  working = (tiling_lib.to_working(im, tiling) for im in images)
  maps = [m for _, m in tiling_lib.stitch_stream(
      working, lambda batch, _: predict_fn(params, batch)['map'], tiling,
      config.eval.batch_size)]
  return maps, [scoring.map_score(m, config.eval) for m in maps]


def model_outputs(predict_fn, params, images, config
                  ) -> tuple[np.ndarray, list, np.ndarray]:
  """(maps, extents, scores) of uint8 images [H, W, 3] of any sizes, at
  most eval.batch_size of them: each map at the model's size (tiled: the
  stitched working-resolution map) with its valid region's extent, and
  each image's score. The one scoring path of `predict` and of the Python
  API (rcae_jax/api.py), so both give the same numbers."""
  if config.data.tile_size:
    maps, scores = tiled_maps(predict_fn, params, images, config)
    return maps, [m.shape for m in maps], np.asarray(scores)
  batch, extents = padded_batch(images, config.eval.batch_size,
                                config.data.image_size, config.data.resize)
  out = (predict_fn(params, batch) if config.data.resize == 'squash'
         else predict_fn(params, batch, extents))
  n = len(images)
  return (np.asarray(out['map'])[:n], list(extents[:n]),
          np.asarray(out['score'])[:n])


def image_size_map(amap: np.ndarray, ext, hw) -> np.ndarray:
  """A model-size map's valid region at its image's own size `hw`."""
  return maps_lib.upsample(geometry.crop(amap, ext), hw)


def score_chunk(predict_fn, params, chunk, decoded, config, thresholds,
                out_dir: str) -> list[dict]:
  """Rows for one batch; writes each readable image's map and overlay."""
  ok = [j for j, (image, _) in enumerate(decoded) if image is not None]
  row_of = {j: k for k, j in enumerate(ok)}  # Chunk index -> batch row.
  if ok:
    maps, extents, scores = model_outputs(
        predict_fn, params, [decoded[j][0] for j in ok], config)
  rows = []
  for j, (x, (image, reason)) in enumerate(zip(chunk, decoded)):
    row = {'file': x.path, 'name': x.name, 'threshold': thresholds['image']}
    if image is None:
      rows.append(dict(row, decision=predict_report.ERROR, error=reason))
      continue
    k = row_of[j]
    # predict.write_maps / write_overlays: False leaves the file out (and
    # the resize back to the image's size when both are) and its column
    # empty: high-volume lines keep the scores and decisions only.
    amap = map_path = overlay_path = None
    if config.predict.write_maps or config.predict.write_overlays:
      amap = image_size_map(maps[k], extents[k], image.shape[:2])
    if config.predict.write_maps:
      map_path = os.path.join(out_dir, x.name + '.tiff')
      export_maps.write_tiff_atomic(map_path, amap)
    if config.predict.write_overlays:
      overlay_path = os.path.join(out_dir, x.name + '.overlay.png')
      visualize.save_png(overlay_path, visualize.overlay(
          image, amap, thresholds['display_min'], thresholds['display_max'],
          threshold=thresholds['pixel']))
    score = float(scores[k])
    rows.append(dict(row, score=score,
                     decision=decision(score, thresholds['image']),
                     height=image.shape[0], width=image.shape[1],
                     map=map_path, overlay=overlay_path))
  return rows


def progress_line(done: int, total: int, errors: int,
                  elapsed_s: float) -> str:
  """'Predicted 1,200/100,000 images (3 errors), 45.2 images/s, ETA 36m
  30s' (the rate and ETA once anything is done)."""
  line = f'Predicted {done:,}/{total:,} images ({errors:,} errors)'
  if done and elapsed_s > 0:
    rate = done / elapsed_s
    left = int(round((total - done) / rate))
    h, m, s = left // 3600, left // 60 % 60, left % 60
    eta = f'{h}h {m:02d}m' if h else f'{m}m {s:02d}s'
    line += f', {rate:.1f} images/s, ETA {eta}'
  return line


def summarize(rows: list[dict]) -> dict:
  counts = {d: sum(r['decision'] == d for r in rows)
            for d in ('OK', 'DEFECT', predict_report.ERROR)}
  return {'images': len(rows), 'ok': counts['OK'],
          'defect': counts['DEFECT'], 'error': counts[predict_report.ERROR]}


def summary_line(summary: dict, rows: list[dict], report_path: str) -> str:
  """The one line a person or a line controller reads after the run."""
  line = (f'predict: {summary["images"]} images, {summary["ok"]} OK, '
          f'{summary["defect"]} DEFECT, {summary["error"]} ERROR; '
          f'report {report_path}')
  failed = [r for r in rows if r['decision'] == predict_report.ERROR]
  if failed:
    line += (f'; {len(failed)} could not be read, first: '
             f'{failed[0]["error"]}')
  return predict_report.one_line(line)


def predict_files(config, workdir: str) -> dict:
  """Scores `config.predict.inputs`; returns {'predictions': every row of
  the report, 'summary': counts, 'message': the summary line}."""
  thresholds = load_thresholds(workdir)
  # Read (or refused, in one line) now, not after the listing.
  normalisers = fusion.for_config(config, workdir)
  out_dir = config.predict.output or os.path.join(workdir, 'predictions')
  inputs = predict_inputs.list_inputs(config.predict.inputs, skip=out_dir)
  fileio.makedirs(out_dir)
  report = predict_report.Report(os.path.join(out_dir, 'predictions.csv'),
                                 thresholds['image'])
  todo = [x for x in inputs if x.path not in report.done]
  logging.info('Predict: %d images, %d already in %s, %d to score',
               len(inputs), len(inputs) - len(todo), report.path, len(todo))
  if todo:
    score_all(config, workdir, todo, report, thresholds, out_dir,
              normalisers)
  rows = report.rows()
  summary = summarize(rows)
  message = summary_line(summary, rows, report.path)
  fileio.write_json_atomic(os.path.join(out_dir, 'predictions.json'),
                           {'image_threshold': thresholds['image'],
                            'pixel_threshold': thresholds['pixel'],
                            'summary': summary, 'predictions': rows})
  logging.info('%s', message)
  return {'predictions': rows, 'summary': summary, 'message': message}


def load_scorer(config, workdir: str, normalisers=None):
  """(predict_fn, params): the workdir's latest parameters placed once on
  the devices of `config.mesh`, and the jitted maps-and-scores program
  that `model_outputs` runs (no reconstructions copied back per batch)."""
  full = maps_lib.make_predict_fn(
      config, normalisers=normalisers,
      mesh=sharding.make_mesh(config.mesh.num_devices))
  params = maps_lib.place_params(full, params_lib.load_params(config,
                                                               workdir))
  return maps_lib.map_score_fn(full), params


def decision(score: float, threshold: float) -> str:
  """'DEFECT' at or above the image threshold, else 'OK'."""
  return 'DEFECT' if score >= threshold else 'OK'


def score_all(config, workdir, todo, report, thresholds, out_dir,
              normalisers=None) -> None:
  """Streams `todo` through the model, appending rows to `report` at most
  every `predict.flush_seconds` (and whatever is pending on the way out,
  also on an exception or Ctrl-C)."""
  predict_fn, params = load_scorer(config, workdir, normalisers)
  start = last_flush = time.monotonic()
  pending, done, errors = [], 0, 0
  try:
    for chunk, decoded in decoded_chunks(todo, config.eval.batch_size,
                                         config.data.num_workers):
      rows = score_chunk(predict_fn, params, chunk, decoded, config,
                         thresholds, out_dir)
      pending += rows
      done += len(rows)
      errors += sum(r['decision'] == predict_report.ERROR for r in rows)
      now = time.monotonic()
      if now - last_flush >= config.predict.flush_seconds or done == len(
          todo):
        report.append(pending)
        pending, last_flush = [], now
        logging.info('%s', progress_line(done, len(todo), errors,
                                         now - start))
  finally:
    report.append(pending)
