"""`python tests/delayed_main.py ARGS`: rcae_jax.main, with a pause of
RCAE_TEST_STEP_DELAY seconds before each training batch, and events for the
test that runs it.

The reliability tests signal or kill a run in the middle of a stage; at
smoke size a stage takes a second, so they slow the data instead of the
production loop carrying a sleep knob.

With RCAE_TEST_EVENT_FD set (the write end of a pipe the test holds), the
run writes one line there per event, so that the test waits for what it
needs rather than polling on a clock:
- `batch`: a training batch is about to be handed to the loop (after the
  pause, so the save of the step before has had that long to finish);
- `stage-done`: a stage's training is over (its programs are compiled).
"""

import logging
import os
import runpy
import sys
import time

from rcae_jax.data import input_pipeline

DELAY = float(os.environ.get('RCAE_TEST_STEP_DELAY', '0'))
EVENT_FD = os.environ.get('RCAE_TEST_EVENT_FD')
_make_loader = input_pipeline.make_loader


def emit(event: str) -> None:
  """One line to the test's pipe, if it listens; a test that has stopped
  reading (it closed its end) is no reason to stop the run."""
  if EVENT_FD is None:
    return
  try:
    os.write(int(EVENT_FD), f'{event}\n'.encode())
  except OSError:
    pass


class StageDone(logging.Handler):
  """`stage-done` when the training loop logs 'Stage N done ...'."""

  def emit(self, record):  # pylint: disable=invalid-name
    if str(record.msg).startswith('Stage %d done'):
      emit('stage-done')


def slow_loader(*args, **kwargs):
  loader = _make_loader(*args, **kwargs)
  batches = loader.train_batches

  def train_batches(*a, **k):
    for batch in batches(*a, **k):
      time.sleep(DELAY)
      emit('batch')
      yield batch

  loader.train_batches = train_batches
  return loader


if __name__ == '__main__':
  input_pipeline.make_loader = slow_loader
  logging.getLogger().addHandler(StageDone())
  sys.argv = ['rcae_jax.main'] + sys.argv[1:]
  runpy.run_module('rcae_jax.main', run_name='__main__', alter_sys=True)
