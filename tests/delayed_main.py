"""`python tests/delayed_main.py ARGS`: rcae_jax.main, with a pause of
RCAE_TEST_STEP_DELAY seconds before each training batch.

The reliability tests signal or kill a run in the middle of a stage; at
smoke size a stage takes a second, so they slow the data instead of the
production loop carrying a sleep knob.
"""

import os
import runpy
import sys
import time

from rcae_jax.data import input_pipeline

DELAY = float(os.environ.get('RCAE_TEST_STEP_DELAY', '0'))
_make_loader = input_pipeline.make_loader


def slow_loader(*args, **kwargs):
  loader = _make_loader(*args, **kwargs)
  batches = loader.train_batches

  def train_batches(*a, **k):
    for batch in batches(*a, **k):
      time.sleep(DELAY)
      yield batch

  loader.train_batches = train_batches
  return loader


if __name__ == '__main__':
  input_pipeline.make_loader = slow_loader
  sys.argv = ['rcae_jax.main'] + sys.argv[1:]
  runpy.run_module('rcae_jax.main', run_name='__main__', alter_sys=True)
