"""rcae_jax: RcAE anomaly detection. Train on good images, then score new ones.

  python -m rcae_jax.main --config CONFIG.py --workdir DIR [--config.FIELD=VALUE ...]

Modes (--config.mode=..., default 'train'):
  train          train all three stages into DIR, then evaluate (rerun to resume)
  evaluate       score DIR's test set with its latest checkpoint: metrics.json,
                 thresholds.json (eval.threshold: quantile | f1 | fixed)
  predict        score new images: --config.predict.inputs=FOLDER; maps, overlays,
                 DIR/predictions/predictions.csv with an OK/DEFECT decision each
  export         write DIR/export/: the inference function as StableHLO
Research tools (reports on a trained workdir, not needed to use the model):
  benchmark      inference latency and throughput (configs/benchmark.py)
  depth_report   reconstruction error per recursion depth on defects
  fusion_report  test metrics of CRD's map, the recursion map and fusions
  shortcut_report  does CRD read the recursion? its metrics fed I or grey
                 in place of every depth's reconstruction
  (separate command lines: python -m rcae_jax.tools.pipeline_benchmark --help,
   python -m rcae_jax.tools.scaling_benchmark --help,
   python -m rcae_jax.tools.torch_benchmark --help (the same network in PyTorch),
   python -m rcae_jax.tools.step_timer --help (one stage's training step),
   python -m rcae_jax.evaluation.learning_curves DIR: redraw DIR's curves)

A workdir remembers its config (DIR/config.json): on an existing workdir
--config may be left out, and --config.X=Y changes only X, e.g.
  python -m rcae_jax.main --workdir DIR --config.mode=predict --config.predict.inputs=FOLDER
A new workdir needs --config: configs/default.py (built-in data) or
configs/cpu_real.py (your own folder: --config.data.root, --config.data.category).
Every field and what it does: configs/default.py.
"""

import logging as std_logging
import os
import re
import sys
import warnings

# Quiet TensorFlow before anything can import it.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

from rcae_jax.common import fileio

# JAX and the rest of the package are imported in main(), once the flags
# are parsed: --help, a misspelt field or a missing config file then answer
# in 0.13-0.19 s instead of ~1.7 s (`time python -m rcae_jax.main --help`
# and two bad flags, on the 2-core AMD EPYC, 2026-12-07).

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs, metrics '
                    '(local or gs://).')
config_flags.DEFINE_config_file(
    'config', None, 'Config file (get_config()), e.g. configs/default.py, '
    'whose comments say what every field does. Optional on a workdir that '
    'has a config.json: that config is used.', lock_config=True)
flags.mark_flags_as_required(['workdir'])

class _QuietOrbax:
  """Drops Orbax's INFO chatter (a dozen lines per checkpoint); its
  warnings and errors still show."""

  def filter(self, record):
    return record.levelno >= 30 or '/orbax/' not in record.pathname


def initialize_distributed() -> None:
  """Multi-host runs (launch/): RCAE_JAX_COORDINATOR/_NUM_PROCESSES/
  _PROCESS_ID for GPU clusters; RCAE_JAX_DISTRIBUTED=1 on Cloud TPU, where
  JAX finds its peers by itself. Single-host runs set neither."""
  import jax  # pylint: disable=g-import-not-at-top
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
  from rcae_jax import validate  # pylint: disable=g-import-not-at-top
  try:
    # The config's own mistakes before JAX is imported (run() checks again).
    validate.validate(FLAGS.config)
  except validate.ConfigError as e:
    fail(str(e))
  # pylint: disable=g-import-not-at-top
  import jax
  from rcae_jax import run as run_lib
  from rcae_jax.common import host_memory
  # pylint: enable=g-import-not-at-top
  logging.get_absl_handler().addFilter(_QuietOrbax())
  initialize_distributed()
  logging.info('JAX process %d/%d, local devices: %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  if jax.default_backend() == 'cpu' and FLAGS.config.keep_freed_memory:
    logging.info('Host allocator: keeping freed memory (config.'
                 'keep_freed_memory): %s', host_memory.keep_freed_memory())
  try:
    report = run_lib.run(FLAGS.config, FLAGS.workdir)
  except one_line_errors() as e:
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
  std_logging.getLogger('asyncio').disabled = True
  sys.unraisablehook = lambda unraisable: None
  warnings.simplefilter('ignore')
  sys.exit(f'rcae_jax: error: {message}')


def one_line_errors() -> tuple:
  """Errors whose message is the whole story: one line, no traceback."""
  # pylint: disable=g-import-not-at-top
  from rcae_jax import run as run_lib
  from rcae_jax import validate
  from rcae_jax.common import checkpoints
  from rcae_jax.common import workdir_lock
  from rcae_jax.data import folder
  # pylint: enable=g-import-not-at-top
  return (validate.ConfigError, folder.DataError, workdir_lock.WorkdirLocked,
          checkpoints.CheckpointError, checkpoints.CheckpointWriteError,
          fileio.WriteError, run_lib.WorkdirError)


def disk_full_hint(error: Exception, workdir: str):
  """One line for a full disk met by a write that is not ours to wrap
  (TensorBoard's writer, a library's cache), else None."""
  if not fileio.disk_full(error):
    return None
  from rcae_jax.common import checkpoints  # pylint: disable=g-import-not-at-top
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


def _flag_value(argv, name: str):
  """The value of --name=V or --name V in argv, else None."""
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def with_saved_config(argv):
  """argv with `--config=<config_files.py>:<workdir>/config.json` added
  when --config is absent, so that a workdir's own config is used (--help
  and a missing --workdir are left to absl)."""
  if any(a.split('=')[0] in ('--config', '-help', '--help', '--helpfull',
                             '--helpshort', '-h') for a in argv[1:]):
    return argv
  workdir = _flag_value(argv, 'workdir')
  if not workdir:
    return argv
  saved = os.path.join(workdir, 'config.json')
  if not fileio.exists(saved):
    where = ('does not exist' if not fileio.exists(workdir) else
             'has no config.json (it was never trained)')
    sys.exit(f'rcae_jax: error: no --config given and --workdir {workdir} '
             f'{where}: to train a new workdir give a config, e.g. --config '
             'configs/default.py (built-in data) or --config '
             'configs/cpu_real.py --config.data.root=FOLDER '
             '--config.data.category=NAME (your images); to use a trained '
             'one, give its --workdir')
  from rcae_jax import config_files  # pylint: disable=g-import-not-at-top
  try:
    config_files.read_saved(saved)
  except (OSError, ValueError) as e:
    sys.exit(f'rcae_jax: error: cannot read {saved} ({type(e).__name__}: '
             f'{str(e).splitlines()[0] if str(e) else ""}): give --config '
             'explicitly')
  return [argv[0], f'--config={config_files.__file__}:{saved}'] + argv[1:]


def unknown_field_message(error: Exception, argv) -> str:
  """One line for a --config.X override naming a field that does not
  exist (ml_collections raises a KeyError/AttributeError whose text holds
  the quoted, escaped name and maybe a 'Did you mean "Y"' suggestion)."""
  text = str(error.args[0]) if error.args else str(error)
  found = re.search(r'[A-Za-z_]\w*', text)
  name = found.group(0) if found else '?'
  overrides = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
  bad = [a for a in overrides if name in a.split('.')] or overrides
  suggestion = re.search(r'Did you mean\W+(\w+)', text)
  hint = f" (did you mean '{suggestion.group(1)}'?)" if suggestion else ''
  where = f' in {", ".join(bad)}' if bad else ''
  return (f'unknown config field {name!r}{where}{hint}; every field and '
          'what it does is in configs/default.py')


def parse_flags(argv):
  """absl's parsing, with every mistake as one line: an unknown config key
  (the override parser raises AttributeError/KeyError from deep inside),
  a config file that cannot be loaded, a missing --config on a workdir
  that has none saved."""
  argv = with_saved_config(argv)
  try:
    parsed = FLAGS(argv)
    if FLAGS.config is None and not any(
        a.split('=')[0] in ('--help', '--helpfull', '--helpshort', '-h')
        for a in argv[1:]):
      sys.exit('rcae_jax: error: --config is required for a new workdir '
               '(e.g. --config configs/default.py); see --help')
    FLAGS.config.mode  # A config file that failed to load raises here.  pylint: disable=pointless-statement
    return parsed
  except (AttributeError, KeyError) as e:
    sys.exit('rcae_jax: error: ' + unknown_field_message(e, argv))
  except OSError:
    path = _flag_value(argv, 'config')
    sys.exit(f'rcae_jax: error: cannot load the config file {path!r} '
             f'(--config): check the path, e.g. configs/default.py')
  except flags.Error as e:
    sys.exit('rcae_jax: error: ' + ' '.join(str(e).split()))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
