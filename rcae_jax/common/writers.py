"""Metric writers and progress reports that work with or without TensorFlow.

With clu + TensorFlow installed: clu's TensorBoard SummaryWriter and
LoggingWriter, and clu's ReportProgress (steps/s, ETA). Without them (some
GPU images ship JAX alone, and `clu.metric_writers` imports TensorFlow
eagerly): logging only, with one notice saying what is disabled. In both
cases every scalar also goes to `<workdir>/scalars.jsonl`, so runs can be
compared without TensorBoard.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Mapping

import numpy as np

from rcae_jax.common import fileio


class JsonlWriter:
  """One JSON object per write in `<logdir>/scalars.jsonl`.

  Local: appended line by line (a crash loses at most the unflushed
  lines). gs://: objects cannot be appended to, so the rows are kept and
  the whole file is rewritten on each flush (a run logs a few thousand
  short rows, so this stays small); a resumed run first reads the rows
  already there, so the file still grows across restarts.
  """

  def __init__(self, logdir: str):
    self._path = os.path.join(logdir, 'scalars.jsonl')
    self._remote = fileio.is_remote(logdir)
    fileio.makedirs(logdir)
    if self._remote:
      self._rows = [fileio.read_text(self._path)] if fileio.exists(
          self._path) else []
      self._dirty = False
    else:
      drop_torn_line(self._path)
      self._f = open(self._path, 'a', encoding='utf-8')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {'step': int(step), 'time': time.time()}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    line = json.dumps(row) + '\n'
    if self._remote:
      self._rows.append(line)
      self._dirty = True
    else:
      try:
        self._f.write(line)
      except OSError as e:  # The buffer spilled onto a full disk.
        raise fileio.write_error(self._path, e) from e

  def write_images(self, step, images):
    del step, images

  def flush(self):
    if not self._remote:
      try:
        self._f.flush()
      except OSError as e:  # A full disk: one clear line, not a traceback.
        raise fileio.write_error(self._path, e) from e
    elif self._dirty:
      fileio.write_text_atomic(self._path, ''.join(self._rows))
      self._dirty = False

  def close(self):
    self.flush()
    if not self._remote:
      self._f.close()


def drop_torn_line(path: str) -> None:
  """Cuts a last line that lacks its newline (a write cut short by a full
  disk or a kill), so that rows appended by the resumed run start on a line
  of their own and every line stays one JSON object."""
  if not os.path.exists(path):
    return
  with open(path, 'rb+') as f:
    data = f.read()
    if not data or data.endswith(b'\n'):
      return
    keep = data.rfind(b'\n') + 1
    f.truncate(keep)
  logging.warning('%s: dropped a torn last line of %d bytes', path,
                  len(data) - keep)


class _PlainLoggingWriter:
  """Stand-in for clu's LoggingWriter when clu cannot be imported."""

  def write_scalars(self, step, scalars):
    logging.info('[%d] %s', step, ', '.join(
        f'{k}={float(np.asarray(v)):.6g}' for k, v in sorted(scalars.items())))

  def write_images(self, step, images):
    del step, images

  def flush(self):
    pass

  def close(self):
    pass


class MultiWriter:
  def __init__(self, writers):
    self.writers = list(writers)

  def write_scalars(self, step, scalars):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_images(self, step, images):
    for w in self.writers:
      w.write_images(step, images)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()


def _clu_writers():
  """clu's writers, or None when clu / TensorFlow / TensorBoard is absent."""
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    return metric_writers
  except ImportError as e:
    logging.warning('TensorBoard summaries and clu progress reports are '
                    'disabled (%s); scalars go to the log and scalars.jsonl.',
                    e)
    return None


def create_writer(workdir: str, primary: bool = True,
                  tensorboard: bool = True) -> MultiWriter:
  """Writers for this process; only the primary process writes files.
  `tensorboard` False (config.tensorboard): no clu, so no TensorFlow."""
  if not primary:
    return MultiWriter([])
  writers = [JsonlWriter(workdir)]
  mw = _clu_writers() if tensorboard else None
  if mw is None:
    writers.append(_PlainLoggingWriter())
  else:
    writers += [mw.LoggingWriter(),
                mw.SummaryWriter(os.path.join(workdir, 'tensorboard'))]
  return MultiWriter(writers)


class _PlainProgress:
  """Steps/s and ETA in the log, like clu's ReportProgress."""

  def __init__(self, num_train_steps, writer, every_steps, prefix):
    self.num_steps, self.writer = num_train_steps, writer
    self.every, self.prefix = every_steps, prefix
    self._t0 = self._t = time.time()
    self._last = None

  def __call__(self, step: int):
    if self._last is None:
      self._last, self._t = step, time.time()
      return
    if step % self.every and step != self.num_steps:
      return
    now = time.time()
    rate = (step - self._last) / max(now - self._t, 1e-9)
    eta = (self.num_steps - step) / max(rate, 1e-9)
    logging.info('%s step %d/%d: %.2f steps/s, ETA %.0f min %.0f s',
                 self.prefix, step, self.num_steps, rate, eta // 60, eta % 60)
    self.writer.write_scalars(step, {f'{self.prefix}steps_per_sec': rate})
    self._last, self._t = step, now


def progress_reporter(num_train_steps: int, writer, every_steps: int,
                      prefix: str = '', use_clu: bool = True):
  """clu's ReportProgress when available (and `use_clu`), else a plain
  equivalent."""
  if not use_clu:
    return _PlainProgress(num_train_steps, writer, every_steps, prefix)
  try:
    from clu import periodic_actions  # pylint: disable=g-import-not-at-top
    return periodic_actions.ReportProgress(
        num_train_steps=num_train_steps, writer=writer,
        every_steps=every_steps)
  except ImportError:
    return _PlainProgress(num_train_steps, writer, every_steps, prefix)
