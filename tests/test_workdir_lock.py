"""One run per workdir: refusal, stale locks, take-over, gs://, multi-host."""

import json
import os
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import ml_collections
import pytest
import tensorstore as ts

from conftest import REPO
from conftest import subprocess_env
from rcae_jax.common import checkpoints
from rcae_jax.common import workdir_lock
from rcae_jax.common.workdir_lock import LOCK_NAME


def lock_cfg(**overrides):
  cfg = ml_collections.ConfigDict({'enabled': True, 'stale_minutes': 10.0,
                                   'take_over': False})
  cfg.update(overrides)
  return cfg


def read_record(workdir):
  with open(os.path.join(workdir, LOCK_NAME), encoding='utf-8') as f:
    return json.load(f)


def plant(workdir, **fields):
  """A lock record as another run would have left it."""
  os.makedirs(workdir, exist_ok=True)
  record = dict(workdir_lock.new_record(time.time()), **fields)
  with open(os.path.join(workdir, LOCK_NAME), 'w', encoding='utf-8') as f:
    json.dump(record, f)
  return record


def test_second_run_is_refused_with_one_line_naming_the_first(tmp_path):
  workdir = str(tmp_path / 'wd')
  os.makedirs(workdir)
  lock = workdir_lock.acquire(workdir, lock_cfg())
  record = read_record(workdir)
  assert record['pid'] == os.getpid()
  assert record['host'] and record['started'].endswith('UTC')
  with pytest.raises(workdir_lock.WorkdirLocked) as e:
    workdir_lock.acquire(workdir, lock_cfg(take_over=True))
  message = str(e.value)
  assert message.startswith(f'workdir {workdir} is in use by another run')
  assert (f'host {record["host"]}, pid {os.getpid()}, started '
          f'{record["started"]}') in message
  assert 'still running on this machine' in message and '\n' not in message
  lock.release()
  assert not os.path.exists(os.path.join(workdir, LOCK_NAME))
  workdir_lock.acquire(workdir, lock_cfg()).release()  # Free again.


def test_lock_of_a_process_that_is_gone_is_taken_over(tmp_path, caplog):
  """SIGKILL leaves the lock behind; the rerun on this machine sees that
  its process no longer exists (resume after a kill must still work)."""
  workdir = str(tmp_path / 'wd')
  dead = subprocess.Popen(['true'])
  dead.wait()  # Reaped: its pid names no process now.
  plant(workdir, pid=dead.pid, process_start=None)
  with caplog.at_level('WARNING'):
    lock = workdir_lock.acquire(workdir, lock_cfg())
  assert 'that process no longer exists' in caplog.text
  assert read_record(workdir)['pid'] == os.getpid()
  lock.release()


def test_reused_pid_does_not_keep_a_dead_lock_alive(tmp_path):
  here = workdir_lock.machine_identity()
  record = dict(here, pid=os.getpid(), process_start='1',
                heartbeat_unix=time.time())
  if workdir_lock.process_start(os.getpid()) is None:
    pytest.skip('no /proc: process start times are unknown here')
  status, why = workdir_lock.judge(record, here, time.time(), 600)
  assert (status, why) == ('gone', 'that process no longer exists')


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
  """gs://bucket/... served by tensorstore's file driver in a temp folder:
  the same conditional-write interface as its gcs driver (whose writes
  carry ifGenerationMatch), without a network."""
  root = tmp_path / 'gcs'

  def open_store(workdir):
    assert workdir.startswith('gs://'), workdir
    local = root / workdir[len('gs://'):]
    return ts.KvStore.open({'driver': 'file',
                            'path': str(local) + '/'}).result()

  monkeypatch.setattr(workdir_lock, 'open_store', open_store)
  return root


def test_gs_workdir_goes_to_the_gcs_driver():
  store = workdir_lock.open_store('gs://bucket/runs/a')
  assert store.spec().to_json() == {'driver': 'gcs', 'bucket': 'bucket',
                                    'path': 'runs/a/'}


def test_stale_lock_on_an_object_store_needs_the_explicit_flag(fake_bucket):
  workdir = 'gs://bucket/run'
  old = time.time() - 25 * 60
  plant(str(fake_bucket / 'bucket' / 'run'), host='vm-gone', pid=77,
        boot_id='x', heartbeat_unix=old, started=workdir_lock._iso(old))
  with pytest.raises(workdir_lock.WorkdirLocked) as e:
    workdir_lock.acquire(workdir, lock_cfg())
  message = str(e.value)
  assert 'holds a stale lock (host vm-gone, pid 77' in message
  assert 'no heartbeat for 25.0 min' in message
  assert '--config.workdir_lock.take_over=True' in message
  lock = workdir_lock.acquire(workdir, lock_cfg(take_over=True))
  assert read_record(str(fake_bucket / 'bucket' / 'run'))['pid'] == (
      os.getpid())
  lock.release()


def test_fresh_lock_from_another_machine_is_never_taken(fake_bucket):
  plant(str(fake_bucket / 'bucket' / 'run'), host='vm-busy', pid=5,
        heartbeat_unix=time.time() - 30)
  with pytest.raises(workdir_lock.WorkdirLocked,
                     match='in use by another run \\(host vm-busy, pid 5'):
    workdir_lock.acquire('gs://bucket/run', lock_cfg(take_over=True))


def test_create_is_conditional_only_one_of_racing_runs_wins(tmp_path):
  workdir = str(tmp_path / 'wd')
  os.makedirs(workdir)
  # Two runs both saw "no lock", then both write: the second write fails.
  a, b = (workdir_lock.open_store(workdir) for _ in range(2))
  missing = a.read(LOCK_NAME).result().stamp.generation
  assert workdir_lock._write_if(a, {'run': 'a'}, missing) is not None
  assert workdir_lock._write_if(b, {'run': 'b'}, missing) is None
  assert read_record(workdir) == {'run': 'a'}
  # And through acquire, from many threads at once: exactly one holds it.
  os.remove(os.path.join(workdir, LOCK_NAME))
  start, won, refused = threading.Barrier(6), [], []

  def race():
    start.wait()
    try:
      won.append(workdir_lock.acquire(workdir, lock_cfg()))
    except workdir_lock.WorkdirLocked:
      refused.append(1)

  threads = [threading.Thread(target=race) for _ in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert (len(won), len(refused)) == (1, 5)
  won[0].release()


def test_heartbeat_renews_and_a_taken_lock_stops_checkpoints(tmp_path):
  workdir = str(tmp_path / 'wd')
  os.makedirs(workdir)
  lock = workdir_lock.acquire(workdir, lock_cfg())
  assert lock.beat(now=time.time() + 60)
  assert read_record(workdir)['heartbeat_unix'] == lock.record[
      'heartbeat_unix']
  # Someone took the workdir over (take_over=True after a long stall).
  other = plant(workdir, host='vm-2', pid=9)
  assert not lock.beat()
  assert lock.lost_to['host'] == 'vm-2'
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'), 1)
  with pytest.raises(workdir_lock.WorkdirLocked,
                     match='taken over by another run \\(host vm-2, pid 9'):
    ckpt.save(1, {'w': jnp.ones(2)}, {'stage': 1})
  ckpt.close()
  lock.release()
  assert read_record(workdir) == other  # The new holder's, untouched.


def test_other_processes_of_a_multi_host_run_follow_process_0(
    tmp_path, monkeypatch):
  wl = workdir_lock
  workdir = str(tmp_path / 'wd')
  os.makedirs(workdir)
  monkeypatch.setattr(wl.jax, 'process_index', lambda: 1)
  monkeypatch.setattr(wl.jax, 'process_count', lambda: 2)
  got = {}
  monkeypatch.setattr(wl.multihost_utils, 'broadcast_one_to_all',
                      lambda x: got.setdefault('value', 1))
  with wl.held(workdir, lock_cfg(), 'train') as lock:
    assert lock is None  # Process 1 holds nothing and writes nothing...
    assert not os.path.exists(os.path.join(workdir, LOCK_NAME))
  got['value'] = 0  # ...and stops when process 0 could not take it.
  with pytest.raises(wl.WorkdirLocked, match='process 0 could not take'):
    with wl.held(workdir, lock_cfg(), 'train'):
      pass


def test_modes_that_only_read_take_no_lock(tmp_path):
  workdir = str(tmp_path / 'wd')
  os.makedirs(workdir)
  for mode, cfg in (('predict', lock_cfg()), ('benchmark', lock_cfg()),
                    ('train', lock_cfg(enabled=False))):
    with workdir_lock.held(workdir, cfg, mode) as lock:
      assert lock is None
      assert not os.path.exists(os.path.join(workdir, LOCK_NAME))


def test_main_refuses_a_busy_workdir_in_one_line(tmp_path):
  """The command line, as a double-submitted job meets it."""
  workdir = str(tmp_path / 'wd')
  os.makedirs(workdir)
  lock = workdir_lock.acquire(workdir, lock_cfg())
  env = subprocess_env()
  try:
    result = subprocess.run(
        [sys.executable, '-m', 'rcae_jax.main', '--config',
         os.path.join(REPO, 'configs', 'smoke.py'), '--workdir', workdir],
        capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
  finally:
    lock.release()
  assert result.returncode == 1, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f'rcae_jax: error: workdir {workdir} is in use by '
                         f'another run (host {lock.record["host"]}, pid '
                         f'{os.getpid()}, started {lock.record["started"]}')
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(os.path.join(workdir, 'config.json'))
