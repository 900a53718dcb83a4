"""predictions.csv: a report that grows while predict runs, and resumes.

A folder of 100,000 frames must not lose its results to one interrupt, so
rows are appended as batches finish, in flushes (`Report.append`):

- Local files: one flush is one write() of whole lines to the file opened
  for appending, then fsync. The file on disk is always the header and
  complete rows, except if the machine dies inside that write: then the
  next run cuts the torn last line off before appending.
- gs:// and other object stores: an object cannot be appended to, so each
  flush re-uploads the whole report (one upload, all-or-nothing).

A rerun into the same folder keeps the scored rows (those images are
skipped) and drops the ERROR rows, so failed images are tried again.
Each row records the image threshold its decision used; a report written
by another model (a different threshold) is refused rather than mixed.
"""

from __future__ import annotations

import csv
import io
import logging
import os

from rcae_jax.common import fileio
from rcae_jax.data import folder

FIELDS = ('file', 'name', 'decision', 'score', 'threshold', 'height',
          'width', 'map', 'overlay', 'error')
ERROR = 'ERROR'


def one_line(value) -> str:
  """CSV cell text on one line: a report line is then a row, which is what
  makes a torn last line detectable."""
  text = '' if value is None else str(value)
  return ' '.join(text.splitlines())


def to_csv(rows) -> str:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator='\n')
  writer.writerows({k: one_line(r.get(k)) for k in FIELDS} for r in rows)
  return buf.getvalue()


def header() -> str:
  return ','.join(FIELDS) + '\n'


def parse(text: str) -> list[dict]:
  """Rows of a report, typed as predict produces them (score / threshold
  float, height / width int, empty cells None); a torn last line (no
  newline yet) is left out."""
  text = text[:text.rfind('\n') + 1]
  rows = []
  for r in csv.DictReader(io.StringIO(text)):
    row = {k: (r.get(k) or None) for k in FIELDS}
    for k, kind in (('score', float), ('threshold', float), ('height', int),
                    ('width', int)):
      if row[k] is not None:
        row[k] = kind(row[k])
    rows.append(row)
  return rows


class Report:
  """predictions.csv at `path`; `done` holds the files already scored."""

  def __init__(self, path: str, threshold: float):
    self.path = path
    self._remote = fileio.is_remote(path)
    kept = self._previous_rows(threshold)
    self.done = {r['file'] for r in kept}
    # One atomic rewrite: the header, the kept rows, nothing torn.
    text = header() + to_csv(kept)
    fileio.write_text_atomic(path, text)
    self._text = text if self._remote else None  # What gs:// re-uploads.

  def _previous_rows(self, threshold: float) -> list[dict]:
    if not fileio.exists(self.path):
      return []
    text = fileio.read_text(self.path)
    if not text.startswith(header()):
      logging.warning('%s has other columns (an older version wrote it): '
                      'starting a new report', self.path)
      return []
    rows = parse(text)
    other = {r['threshold'] for r in rows} - {float(threshold)}
    if other:
      raise folder.DataError(
          f'{self.path} holds decisions made at image threshold '
          f'{sorted(other)[0]}, the model now has {threshold} (retrained or '
          're-evaluated?): set another config.predict.output or delete '
          'that file')
    kept = [r for r in rows if r['decision'] != ERROR]
    if rows:
      logging.info('%s: %d images already scored (skipped), %d failed '
                   'before (tried again)', self.path, len(kept),
                   len(rows) - len(kept))
    return kept

  def append(self, rows: list[dict]) -> None:
    if not rows:
      return
    chunk = to_csv(rows)
    self.done.update(r['file'] for r in rows)
    if self._remote:
      self._text += chunk
      fileio.write_text_atomic(self.path, self._text)
      return
    # O_APPEND and one write() call: the rows land whole after what is
    # there, even if something else appended meanwhile.
    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
    try:
      data = chunk.encode('utf-8')
      written = os.write(fd, data)
      while written < len(data):  # Regular files: only when the disk fills.
        written += os.write(fd, data[written:])
      os.fsync(fd)
    finally:
      os.close(fd)

  def rows(self) -> list[dict]:
    return parse(fileio.read_text(self.path))
