"""One run per workdir: a lock record naming its holder's host, pid and start.

Why: two runs on one workdir (a job submitted twice, a scheduler's retry
while the first attempt still lives) would write into each other's
checkpoints and metrics. The second one must refuse at once, with one line
that names the first.

How: `<workdir>/RUN_LOCK.json` is created by a conditional write, "only if
no such key exists", through tensorstore's key-value store (an Orbax
dependency, so nothing new to install). On gs:// that is one object upload
with the generation precondition `ifGenerationMatch=0`; on a local or
network disk tensorstore's file driver makes the same compare-and-swap
atomic across processes. Every later change (heartbeat, take-over,
release) is conditional on the generation its writer last read, so two
processes can never both believe they hold the lock.

Whether an existing lock still counts:
- its holder ran on this machine (same host name, boot and PID namespace):
  the process table decides. A process that is gone (killed, crashed, the
  machine rebooted) cannot write any more, so its lock is taken over at
  once, with a warning: "rerun the same command" after a SIGKILL must keep
  working (docs/reliability.md).
- its holder ran elsewhere (another VM of a preemptible pool, a workdir on
  gs:// or NFS): only its heartbeat tells. The holder rewrites the record
  every `workdir_lock.stale_minutes / 5`; a record older than
  `workdir_lock.stale_minutes` is stale. A stale lock is reported and
  taken over only with `workdir_lock.take_over=True`: its holder may be
  alive behind a network partition, and only the user can know.
A holder whose lock was taken over from it notices at its next heartbeat
and then refuses to write another checkpoint (`check_held`).

Multi-host runs: process 0 holds the lock; the others learn by broadcast
whether it got it and stop with it if not.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Callable, Optional

import jax
from jax.experimental import multihost_utils
import numpy as np
import tensorstore as ts

from rcae_jax.common import fileio

LOCK_NAME = 'RUN_LOCK.json'
# Modes that write into the workdir (checkpoints, metrics, thresholds,
# maps). `predict` and `benchmark` only read it and write their own files.
LOCKED_MODES = ('train', 'evaluate', 'depth_report', 'fusion_report',
                'shortcut_report')


class WorkdirLocked(RuntimeError):
  """The workdir is held by another run (or this run lost it); one line."""


# ------------------------------------------------------- who holds it


def _read_first_line(path: str) -> Optional[str]:
  try:
    with open(path, encoding='ascii') as f:
      return f.readline().strip()
  except OSError:
    return None


def machine_identity() -> dict:
  """Host name, boot id and PID namespace: two records with the same three
  were written on the same running kernel in the same process table, where
  a pid can be checked. The last two are None off Linux."""
  try:
    pid_ns = os.readlink('/proc/self/ns/pid')
  except OSError:
    pid_ns = None
  return {'host': socket.gethostname(),
          'boot_id': _read_first_line('/proc/sys/kernel/random/boot_id'),
          'pid_namespace': pid_ns}


def _proc_stat(pid: int) -> Optional[list[str]]:
  """Fields of /proc/<pid>/stat after the command name (state first)."""
  line = _read_first_line(f'/proc/{pid}/stat')
  if not line or ')' not in line:
    return None
  return line.rsplit(')', 1)[1].split()


def process_start(pid: int) -> Optional[str]:
  """The process's start time in clock ticks since boot (Linux): with the
  pid it names one process, even after the pid is reused."""
  fields = _proc_stat(pid)
  return fields[19] if fields and len(fields) > 19 else None


def process_running(pid: int, start: Optional[str]) -> bool:
  """True if process `pid` (started at `start`, when known) still runs."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # It exists, under another user.
  fields = _proc_stat(pid)
  if fields is None:
    return True  # No /proc (macOS): os.kill is all we can know.
  if fields[0] == 'Z':
    return False  # Dead, not yet reaped by its parent.
  return start is None or process_start(pid) == start


def new_record(now: float) -> dict:
  pid = os.getpid()
  return dict(machine_identity(), pid=pid, process_start=process_start(pid),
              started=_iso(now), started_unix=now, heartbeat_unix=now,
              token=uuid.uuid4().hex, command=' '.join(sys.argv)[:500])


def _iso(t: float) -> str:
  return datetime.datetime.fromtimestamp(
      t, datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')


def holder(record: dict) -> str:
  """`host vm-1, pid 4242, started 2026-11-30 10:00:00 UTC`."""
  return (f'host {record.get("host", "?")}, pid {record.get("pid", "?")}, '
          f'started {record.get("started", "?")}')


def judge(record: Optional[dict], here: dict, now: float, stale_s: float,
          running: Callable[[int, Optional[str]], bool] = process_running
          ) -> tuple[str, str]:
  """('live' | 'gone' | 'stale', why) for an existing lock record.

  'gone': its process provably ended (same machine); 'stale': written
  elsewhere and no heartbeat for `stale_s`; 'live' otherwise. A record
  that cannot be parsed is 'stale': nothing says who wrote it."""
  if not isinstance(record, dict):
    return 'stale', 'the lock record cannot be read'
  if record.get('host') == here['host']:
    if (record.get('boot_id') and here['boot_id'] and
        record['boot_id'] != here['boot_id']):
      return 'gone', 'this machine has rebooted since'
    if record.get('pid_namespace') == here['pid_namespace']:
      if running(int(record.get('pid', -1)), record.get('process_start')):
        return 'live', 'that process is still running on this machine'
      return 'gone', 'that process no longer exists'
  age = now - float(record.get('heartbeat_unix', 0.0))
  if age > stale_s:
    return 'stale', (f'no heartbeat for {age / 60:.1f} min, more than '
                     f'config.workdir_lock.stale_minutes={stale_s / 60:g}')
  return 'live', f'its last heartbeat was {age:.0f} s ago'


# -------------------------------------------------------------- storage


def open_store(workdir: str) -> ts.KvStore:
  """The key-value store of the workdir's folder: tensorstore's `file`
  driver locally, its `gcs` driver (conditional writes by generation) for
  gs://. Tests swap this for a fake bucket."""
  if fileio.is_remote(workdir):
    return ts.KvStore.open(workdir.rstrip('/') + '/').result()
  return ts.KvStore.open({'driver': 'file',
                          'path': fileio.absolute(workdir) + '/'}).result()


def _write_if(store: ts.KvStore, value: Optional[dict],
              generation: bytes) -> Optional[bytes]:
  """Writes (or deletes, value None) only if the key is still at
  `generation`; the new generation, or None if someone else wrote first."""
  data = None if value is None else json.dumps(value, indent=1).encode()
  result = store.write(LOCK_NAME, data, if_equal=generation).result()
  return result.generation or None  # Empty: the precondition failed.


def _parse(value: bytes) -> Optional[dict]:
  try:
    record = json.loads(value.decode('utf-8'))
  except (UnicodeDecodeError, ValueError):
    return None
  return record if isinstance(record, dict) else None


# ----------------------------------------------------------------- lock

# Locks this process holds, by workdir, for `check_held`.
_HELD: dict[str, 'Lock'] = {}


class Lock:
  """A held lock; a daemon thread renews its heartbeat until release."""

  def __init__(self, workdir: str, store: ts.KvStore, record: dict,
               generation: bytes, heartbeat_s: float):
    self.workdir, self.record = workdir, record
    self.key = fileio.absolute(workdir)  # As Checkpointer spells paths.
    self._store, self._generation = store, generation
    self.lost_to: Optional[dict] = None  # The record that replaced ours.
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat_every,
                                    args=(heartbeat_s,), daemon=True,
                                    name='workdir-lock-heartbeat')
    self._thread.start()

  def _beat_every(self, period: float) -> None:
    while not self._stop.wait(period):
      if not self.beat():
        return

  def beat(self, now: Optional[float] = None) -> bool:
    """Renews the heartbeat; False once the lock was taken from us.

    A failed write (full disk, network) is only logged: the next beat
    retries, and the record stays ours either way."""
    record = dict(self.record, heartbeat_unix=now or time.time())
    try:
      generation = _write_if(self._store, record, self._generation)
      if generation is None:  # The key changed since we wrote it.
        current = self._store.read(LOCK_NAME).result()
        found = _parse(current.value) if current.state == 'value' else {}
        if (found or {}).get('token') == self.record['token']:
          # Still our record (its generation moved, e.g. a copy of the
          # bucket): carry on from the new generation.
          self._generation = current.stamp.generation
          return True
        self.lost_to = found or {}
        logging.error('The lock on workdir %s was taken over (now: %s): '
                      'this run writes no further checkpoint.', self.workdir,
                      holder(self.lost_to or {}))
        return False
    except (ValueError, OSError) as e:  # tensorstore reports I/O as these.
      logging.warning('Could not renew the lock on %s (%s); retrying at the '
                      'next heartbeat.', self.workdir, e)
      return True
    self.record, self._generation = record, generation
    return True

  def release(self) -> None:
    self._stop.set()
    self._thread.join(timeout=10)
    _HELD.pop(self.key, None)
    if self.lost_to is not None:
      return  # Not ours any more: leave the new holder's record alone.
    try:
      if _write_if(self._store, None, self._generation) is None:
        logging.warning('The lock on %s changed hands before release; left '
                        'as it is.', self.workdir)
    except (ValueError, OSError) as e:
      logging.warning('Could not remove the lock %s/%s (%s): the next run '
                      'will find it and take it over if this process is '
                      'gone.', self.workdir, LOCK_NAME, e)


def acquire(workdir: str, lock_cfg, now: Callable[[], float] = time.time
            ) -> Lock:
  """Takes the lock of `workdir` or raises WorkdirLocked (one line)."""
  store = open_store(workdir)
  stale_s = 60.0 * lock_cfg.stale_minutes
  here = machine_identity()
  for _ in range(5):  # Retried only when another run wrote in between.
    current = store.read(LOCK_NAME).result()
    if current.state == 'value':
      existing = _parse(current.value)
      status, why = judge(existing, here, now(), stale_s)
      who = holder(existing or {})
      if status == 'live':
        hint = ('Stop that run or wait for it to end, or use another '
                '--workdir.' if 'running on this machine' in why else
                'Wait for it to end or use another --workdir; if it is gone, '
                f'its lock turns stale {lock_cfg.stale_minutes:g} min after '
                'its last heartbeat and '
                '--config.workdir_lock.take_over=True then takes it over.')
        raise WorkdirLocked(f'workdir {workdir} is in use by another run '
                            f'({who}; {why}). {hint}')
      if status == 'stale' and not lock_cfg.take_over:
        raise WorkdirLocked(
            f'workdir {workdir} holds a stale lock ({who}; {why}). If that '
            'run no longer runs, rerun with '
            '--config.workdir_lock.take_over=True to take the workdir over.')
      logging.warning('Taking over the lock of workdir %s from a run that is '
                      '%s (%s; %s).', workdir, status, who, why)
    record = new_record(now())
    generation = _write_if(store, record, current.stamp.generation)
    if generation is not None:
      lock = Lock(workdir, store, record, generation,
                  heartbeat_s=max(1.0, stale_s / 5))
      _HELD[lock.key] = lock
      logging.info('Locked workdir %s (%s/%s)', workdir, workdir, LOCK_NAME)
      return lock
  raise WorkdirLocked(f'workdir {workdir}: could not take its lock, which '
                      'kept changing (several runs starting at once?)')


@contextlib.contextmanager
def held(workdir: str, lock_cfg, mode: str):
  """Holds the workdir's lock for the body when `mode` writes into it and
  `lock_cfg` (config.workdir_lock) is enabled. Every process of a
  multi-host run must enter."""
  if not lock_cfg.enabled or mode not in LOCKED_MODES:
    yield None
    return
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = acquire(workdir, lock_cfg)
    except Exception as e:  # pylint: disable=broad-except
      # Raised after the broadcast: the other processes must not wait for
      # it (a storage error as much as a held lock).
      error = e
  if jax.process_count() > 1:
    ok = multihost_utils.broadcast_one_to_all(np.int32(lock is not None))
    if error is None and not int(ok):
      error = WorkdirLocked(f'workdir {workdir}: process 0 could not take '
                            'its lock; see its log for who holds it')
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()


def check_held(path: str) -> None:
  """Raises WorkdirLocked if `path` lies in a workdir whose lock this
  process held and lost: another run took it over and writes there now."""
  path = fileio.absolute(path)
  for key, lock in list(_HELD.items()):
    inside = path == key or path.startswith(key.rstrip('/') + '/')
    if inside and lock.lost_to is not None:
      raise WorkdirLocked(
          f'workdir {lock.workdir} was taken over by another run '
          f'({holder(lock.lost_to)}): this run stops without writing '
          f'{path}.')
