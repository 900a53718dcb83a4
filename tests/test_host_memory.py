"""config.keep_freed_memory: glibc's allocator keeps XLA:CPU's freed buffers."""

import ctypes
import os

from conftest import REPO
from rcae_jax.common import host_memory
from rcae_jax.tools import step_timer


class _FakeMallopt:
  """Records its calls (a ctypes function: argtypes may be set on it);
  answers `accept` (1 = done)."""

  def __init__(self, accept):
    self.calls, self.accept, self.argtypes = [], accept, None

  def __call__(self, param, value):
    self.calls.append((param, value))
    return self.accept


class _FakeLibc:

  def __init__(self, accept=1):
    self.mallopt = _FakeMallopt(accept)


def test_sets_the_three_mallopt_parameters(monkeypatch):
  fake = _FakeLibc()
  monkeypatch.setattr(ctypes, 'CDLL', lambda name: fake)
  assert host_memory.keep_freed_memory() is True
  # M_MMAP_THRESHOLD (-3) at glibc's 64-bit maximum, M_TRIM_THRESHOLD (-1)
  # at mallopt's largest int, M_TOP_PAD (-2) 256 MiB.
  assert fake.mallopt.calls == [(-3, 32 * 2 ** 20), (-1, 2 ** 31 - 1),
                        (-2, 256 * 2 ** 20)]


def test_refused_or_missing_mallopt_changes_nothing(monkeypatch):
  monkeypatch.setattr(ctypes, 'CDLL', lambda name: _FakeLibc(accept=0))
  assert host_memory.keep_freed_memory() is False

  class NoMallopt:  # musl, macOS: no such symbol.
    pass
  monkeypatch.setattr(ctypes, 'CDLL', lambda name: NoMallopt())
  assert host_memory.keep_freed_memory() is False


def test_real_libc_accepts_it():
  # Linux with glibc, as CI and every supported accelerator host.
  assert host_memory.keep_freed_memory() is True


def test_step_timer_reports_the_tuned_step():
  report = step_timer.main(['--config', os.path.join(REPO, 'configs',
                                                     'smoke.py'),
                            '--stage', '1', '--steps', '2',
                            '--keep_freed_memory'])
  assert report['keep_freed_memory'] is True and report['stage'] == 1
  # Steps as the loop takes them compile one program; the first call
  # holds the tracing and compiling, milliseconds-long steps do not.
  assert report['programs'] == 1
  assert report['first_call_s'] > 10 * report['median_s'] > 0
