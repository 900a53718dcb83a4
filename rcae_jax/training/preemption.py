"""Stopping a long run cleanly: SIGTERM, and time-based checkpoints.

Preemptible machines (spot VMs, Cloud TPU) get SIGTERM some seconds before
they go. The loop (loop.run_stage) asks `StopRequest.requested` after each
step, saves, and raises `Preempted`; `SaveTimer` bounds what a kill without
warning loses.
"""

from __future__ import annotations

import signal
import threading
import time

import jax
from jax.experimental import multihost_utils
import numpy as np


class Preempted(SystemExit):
  """Raised once the checkpoint of a run stopped by SIGTERM is written.

  A SystemExit, so `python -m rcae_jax.main` ends without a traceback and
  with code 143 (128 + SIGTERM, what schedulers report for a terminated
  job): a wrapper can tell "stopped, rerun to resume" from a crash (1)."""

  EXIT_CODE = 143

  def __init__(self, message: str):
    super().__init__(self.EXIT_CODE)
    self.message = message

  def __str__(self):
    return self.message


class StopRequest:
  """SIGTERM turns into a flag that the loop reads after each step.

  The handler only sets the flag: saving from inside it could interleave
  with a half-dispatched step or a checkpoint write. It is installed while
  training runs and the previous handler is put back afterwards, so a
  SIGTERM during evaluation ends the process the ordinary way. Multi-process
  runs use JAX's preemption sync point instead (its service catches SIGTERM
  on any process), because every process must save at the same step."""

  def __init__(self):
    self.signalled = False
    self._installed = False
    self._previous = None

  def __enter__(self):
    # signal.signal works in the main thread only (not in e.g. a notebook
    # worker thread): there the run is simply not preemption-safe.
    if (jax.process_count() == 1 and
        threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.signalled = True

  def __exit__(self, *exc):
    if self._installed:
      # None: the previous handler was not set from Python; default it.
      signal.signal(signal.SIGTERM, self._previous
                    if self._previous is not None else signal.SIG_DFL)
      self._installed = False

  def requested(self, global_step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(global_step)
    return self.signalled


class SaveTimer:
  """`checkpoint_minutes` (0: off) bounds the work a kill without warning
  loses, whatever the step time. With several processes only process 0's
  clock counts, read at log points (one broadcast there), so that all of
  them save at the same step."""

  def __init__(self, minutes: float):
    self.period = 60.0 * minutes
    self.reset()

  def reset(self) -> None:
    self._last = time.monotonic()

  def due(self, at_log_point: bool) -> bool:
    if self.period <= 0:
      return False
    expired = time.monotonic() - self._last >= self.period
    if jax.process_count() == 1:
      return expired
    if not at_log_point:
      return False
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(expired)))
