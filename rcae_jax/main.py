"""Command line: python -m rcae_jax.main --config configs/X.py --workdir DIR."""

import logging as std_logging
import os
import sys
import warnings

# Quiet TensorFlow before anything can import it.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from rcae_jax import run as run_lib
from rcae_jax import validate
from rcae_jax.common import checkpoints
from rcae_jax.common import fileio
from rcae_jax.common import workdir_lock
from rcae_jax.data import folder

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs, metrics.')
config_flags.DEFINE_config_file('config', None, 'Config file (get_config()).',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietOrbax:
  """Drops Orbax's INFO chatter (a dozen lines per checkpoint); its
  warnings and errors still show."""

  def filter(self, record):
    return record.levelno >= 30 or '/orbax/' not in record.pathname


def initialize_distributed() -> None:
  """Multi-host runs (launch/): RCAE_JAX_COORDINATOR/_NUM_PROCESSES/
  _PROCESS_ID for GPU clusters; RCAE_JAX_DISTRIBUTED=1 on Cloud TPU, where
  JAX finds its peers by itself. Single-host runs set neither."""
  env = os.environ
  if env.get('RCAE_JAX_COORDINATOR') and jax.config.jax_platforms == 'cpu':
    # CPU-only clusters (and the localhost test) need CPU collectives.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if env.get('RCAE_JAX_COORDINATOR'):
    jax.distributed.initialize(
        coordinator_address=env['RCAE_JAX_COORDINATOR'],
        num_processes=int(env['RCAE_JAX_NUM_PROCESSES']),
        process_id=int(env['RCAE_JAX_PROCESS_ID']))
  elif env.get('RCAE_JAX_DISTRIBUTED') == '1':
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietOrbax())
  initialize_distributed()
  logging.info('JAX process %d/%d, local devices: %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  try:
    report = run_lib.run(FLAGS.config, FLAGS.workdir)
  except ONE_LINE_ERRORS as e:
    fail(str(e))
  except Exception as e:  # pylint: disable=broad-except
    hint = disk_full_hint(e, FLAGS.workdir) or (
        out_of_memory_hint(e) if isinstance(e, jax.errors.JaxRuntimeError)
        else None)
    if hint is None:
      raise
    fail(hint)
  if FLAGS.config.mode == 'predict' and report['summary']['error']:
    # Every readable image is scored and reported; the status says that
    # some were not, and the last line of stderr says which.
    from rcae_jax.serving import predict  # pylint: disable=g-import-not-at-top
    print(f'rcae_jax: {report["message"]}', file=sys.stderr)
    sys.exit(predict.PARTIAL_FAILURE_EXIT)


def fail(message: str) -> None:
  """Exits with `message` as the last line of stderr.

  A failed checkpoint write leaves Orbax's other asyncio writes failing with
  the same cause; the event loop logs them ("Task exception was never
  retrieved") when it is collected at exit, after our line, and Python warns
  about its writes that were never awaited ("coroutine ... was never
  awaited", a RuntimeWarning at garbage collection). They say nothing new,
  so they are silenced here, on the way out only."""
  logging.error('%s', message)
  std_logging.getLogger('asyncio').disabled = True
  sys.unraisablehook = lambda unraisable: None
  warnings.simplefilter('ignore')
  sys.exit(f'rcae_jax: error: {message}')


# Errors whose message is the whole story: one line, no traceback.
ONE_LINE_ERRORS = (validate.ConfigError, folder.DataError,
                   workdir_lock.WorkdirLocked, checkpoints.CheckpointError,
                   checkpoints.CheckpointWriteError, fileio.WriteError)


def disk_full_hint(error: Exception, workdir: str):
  """One line for a full disk met by a write that is not ours to wrap
  (TensorBoard's writer, a library's cache), else None."""
  if not fileio.disk_full(error):
    return None
  steps = checkpoints.complete_steps(os.path.join(workdir, 'checkpoints'))
  kept = (f'the newest complete checkpoint is {workdir}/checkpoints/'
          f'{steps[0]}' if steps else 'no checkpoint was complete yet')
  first = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return (f'the disk is full ({first[:200]}). Files written before are '
          f'unchanged and {kept}: free space and rerun the same command to '
          'resume.')


def out_of_memory_hint(error: Exception):
  """One actionable line for a device out-of-memory error, else None."""
  text = str(error)
  if 'RESOURCE_EXHAUSTED' not in text and 'out of memory' not in text.lower():
    return None
  return ('the device ran out of memory. Lower config.train.batch_size (or '
          'a stage\'s batch_size), config.eval.batch_size or '
          'config.data.image_size, or use more devices; '
          f'XLA said: {text.splitlines()[0][:300]}')


def parse_flags(argv):
  """absl's parsing, with an unknown config key as one clear line (the
  override parser raises AttributeError/KeyError from deep inside)."""
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError) as e:
    bad = [a for a in argv[1:] if a.startswith('--config.')]
    sys.exit(f'rcae_jax: error: unknown config field {e} in {bad}; see the '
             'config file for the fields that exist')
  except flags.Error as e:
    sys.exit(f'rcae_jax: error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
