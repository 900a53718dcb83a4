"""Every file the project reads or writes, local or on Cloud Storage.

A workdir (or a data root) may be a local folder or a `gs://` URL: TPU VMs
are deleted after a run, so their checkpoints, metrics and pictures must go
to a bucket. Local paths use the os module directly (fast, and atomic by
temp file + rename); URLs go through `etils.epath` (TensorFlow's gfile when
TensorFlow is installed, else fsspec, which needs `gcsfs` for gs://).

Why the two differ on "atomic": an object store has no rename (epath
emulates it by copy + delete), but an object only becomes visible once its
upload is complete, so a plain write is already all-or-nothing there. Nor
can an object be appended to: `writers.JsonlWriter` rewrites the file
instead (see there).
"""

from __future__ import annotations

import errno
import io
import json
import os
from typing import Optional, Union

from etils import epath

from rcae_jax.common import errors

PathLike = Union[str, os.PathLike]

# errno values that mean "no room left", whatever the storage.
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class WriteError(OSError):
  """A write that failed (full disk, quota, permissions), in one line that
  names the file and says that its previous version is intact."""


def disk_full(error: Optional[BaseException]) -> bool:
  """True if `error`, or an error it was raised from, says that the disk
  (or quota) is full. tensorstore reports such errors as text."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _FULL:
      return True
    text = str(error)
    if any(os.strerror(code) in text for code in _FULL):
      return True
    error = error.__cause__ or error.__context__
  return False


def write_error(path: PathLike, error: BaseException) -> WriteError:
  """The WriteError for a failed write of `path`."""
  cause = (error.strerror if isinstance(error, OSError) and error.strerror
           else str(error))
  full = ' (the disk is full: free space, then rerun)' if disk_full(
      error) else ''
  out = WriteError(f'could not write {os.fspath(path)}: {cause}{full}; its '
                   'previous version, if any, is unchanged')
  out.errno = getattr(error, 'errno', None)
  return out


def is_remote(path: PathLike) -> bool:
  """True for URLs (gs://, s3://, ...), False for local paths."""
  return '://' in os.fspath(path)


def absolute(path: PathLike) -> str:
  """Local paths expanded and made absolute (Orbax wants absolute paths);
  URLs unchanged (os.path.abspath would turn gs://b into /cwd/gs:/b)."""
  path = os.fspath(path)
  if is_remote(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def exists(path: PathLike) -> bool:
  if is_remote(path):
    return epath.Path(path).exists()
  return os.path.exists(path)


def isdir(path: PathLike) -> bool:
  if is_remote(path):
    return epath.Path(path).is_dir()
  return os.path.isdir(path)


def listdir(path: PathLike) -> list[str]:
  """Names (not paths) in a folder, like os.listdir."""
  if is_remote(path):
    return [p.name for p in epath.Path(path).iterdir()]
  return os.listdir(path)


def makedirs(path: PathLike) -> None:
  # Object stores have no folders (a prefix exists once an object under it
  # does), but epath's backends accept this and it keeps one code path.
  if is_remote(path):
    epath.Path(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def remove(path: PathLike) -> None:
  """Deletes a file if it exists."""
  if is_remote(path):
    p = epath.Path(path)
    if p.exists():
      p.unlink()
  elif os.path.exists(path):
    os.remove(path)


def read_bytes(path: PathLike) -> bytes:
  if is_remote(path):
    return epath.Path(path).read_bytes()
  with open(path, 'rb') as f:
    return f.read()


def read_text(path: PathLike) -> str:
  return read_bytes(path).decode('utf-8')


def read_json(path: PathLike):
  return json.loads(read_text(path))


def read_stored(path: str, needs: str, command: str) -> dict:
  """The JSON that an earlier mode wrote at `path` (e.g. evaluation's
  normalisers); missing, one ConfigError line: what `needs` it and the
  `command` that writes it."""
  if not exists(path):
    raise errors.ConfigError(f'{path} is missing: {needs}; run {command} '
                             'on this workdir first')
  return read_json(path)


def image_source(path: PathLike):
  """What PIL's Image.open should get: the path itself when local (PIL
  reads lazily from it), the downloaded bytes when remote."""
  if is_remote(path):
    return io.BytesIO(read_bytes(path))
  return os.fspath(path)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
  """Writes `data` so that readers see the old file or the new one, never a
  part: local via a temp file in the same folder + os.replace (same file
  system, so the rename is atomic), remote by one object upload."""
  path = os.fspath(path)
  try:
    _write_atomic(path, data)
  except WriteError:
    raise
  except OSError as e:
    # A full disk must stop the run with the file named, not a traceback
    # from deep inside the writer (docs/reliability.md, section 3).
    raise write_error(path, e) from e


def _write_atomic(path: str, data: bytes) -> None:
  if is_remote(path):
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp-{os.getpid()}')
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    # Also on KeyboardInterrupt: never leave the temp file behind (on a
    # full disk it would hold the last free blocks).
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text_atomic(path: PathLike, text: str) -> None:
  write_bytes_atomic(path, text.encode('utf-8'))


def write_json_atomic(path: PathLike, obj) -> None:
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True,
                                     default=str))
