"""Preemption safety: kills, SIGTERM, torn checkpoints, changed configs, NaNs.

The resume test runs `python -m rcae_jax.main` in subprocesses, as a user or
a scheduler would, and demands bit-identical parameters and metrics on CPU
against an uninterrupted run started alongside it.
"""

import errno
import gc
import json
import os
import shutil
import select
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from conftest import subprocess_env
from rcae_jax import run as run_lib
from rcae_jax import validate
from rcae_jax.common import checkpoints
from rcae_jax.common import fileio
from rcae_jax.common import workdir_lock
from rcae_jax.common import writers
from rcae_jax.model import inference
from rcae_jax.serving import params as params_lib
from rcae_jax.training import nonfinite
from rcae_jax.training import preemption
from rcae_jax.training import loop
from rcae_jax.training import train
from rcae_jax.training import train_state

STEPS = 8  # Stage 1 only: the smallest run that evaluates.
# No TensorBoard: the subprocesses then never import TensorFlow (~5 CPU-s
# each); what these tests check does not depend on it, except the full
# disk, which TensorBoard's writer may meet first (that test turns it on).
OVERRIDES = {'train.stage1.steps': STEPS, 'train.stage2.steps': 0,
             'train.stage3.steps': 0, 'eval.scoring': 'recursion',
             'train.checkpoint_every': 1, 'eval.export_maps': False,
             'eval.pictures_per_type': 0, 'tensorboard': False}

# rcae_jax.main with a pause before each training batch (tests/
# delayed_main.py): a smoke stage is too fast to signal in its middle.
DELAYED_MAIN = os.path.join(REPO, 'tests', 'delayed_main.py')


def subprocess_config(**extra):
  """The subprocess runs' config, as checkpoints.load_params needs it here."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  overrides = dict(OVERRIDES, **extra)
  return tiny_config(**overrides)


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """Subprocess environment: one CPU device (not the tests' 8 fake ones)
  and the data cache. The session's compilation cache (conftest.py) comes
  with os.environ: the same programs load instead of compiling again, ~10 s
  per run on 2 cores."""
  root = tmp_path_factory.mktemp('reliability')
  return {'env': subprocess_env(),
          'config': os.path.join(REPO, 'configs', 'smoke.py'), 'root': root}


def start(env, workdir, delay=0.0, **overrides):
  """The run in a subprocess; `proc.events` reads the lines it writes at
  each training batch and stage end (tests/delayed_main.py)."""
  args = [sys.executable, DELAYED_MAIN, '--config', env['config'],
          '--workdir', str(workdir)]
  args += [f'--config.{k}={v}' for k, v in dict(OVERRIDES, **overrides)
           .items()]
  log = open(f'{workdir}.log', 'w', encoding='utf-8')
  read, write = os.pipe()
  proc = subprocess.Popen(
      args, env=dict(env['env'], RCAE_TEST_STEP_DELAY=str(delay),
                     RCAE_TEST_EVENT_FD=str(write)),
      stdout=log, stderr=subprocess.STDOUT, pass_fds=(write,))
  os.close(write)  # The child's copy is the only one: EOF when it exits.
  proc.events = open(read, 'rb', buffering=0)
  return proc


def next_event(proc, workdir, timeout=240) -> str | None:
  """The run's next event line, or None once it has exited (EOF). The
  timeout only turns a hung run into a failure."""
  ready, _, _ = select.select([proc.events], [], [], timeout)
  assert ready, f'no event from the run in {timeout} s: ' + (
      log_of(workdir)[-3000:])
  line = proc.events.readline()
  return line.decode().strip() if line else None


def log_of(workdir) -> str:
  with open(f'{workdir}.log', encoding='utf-8') as f:
    return f.read()


def finish(proc, workdir, expect=0, timeout=300):
  rc = proc.wait(timeout=timeout)
  proc.events.close()
  assert rc == expect, log_of(workdir)[-3000:]


def saved_steps(workdir) -> list[int]:
  """Complete checkpoints only: Orbax renames a step folder into place
  when its write is done."""
  try:
    names = os.listdir(os.path.join(workdir, 'checkpoints'))
  except FileNotFoundError:
    return []
  return sorted(int(n) for n in names if n.isdigit())


def wait_for_step(proc, workdir, above: int) -> int:
  """The newest complete checkpoint once one is above step `above`: looked
  at each time the run takes a training batch (its event), so the run is
  then between two steps, sleeping out its delay."""
  while True:
    steps = saved_steps(workdir)
    if steps and steps[-1] > above:
      return steps[-1]
    assert next_event(proc, workdir) is not None, (
        f'the run ended with no checkpoint above step {above}: '
        + log_of(workdir)[-3000:])


@pytest.fixture(scope='module')
def reference(env):
  """The uninterrupted run, started at once; the interrupted ones run
  while it evaluates (they mostly sleep between steps)."""
  workdir = env['root'] / 'straight'
  # Saves at steps STEPS - 1 and STEPS (the stage's end), which the tests
  # that copy its checkpoints need; a save at every step (OVERRIDES, for
  # the runs that are interrupted) changes no number and costs ~0.6 s each.
  proc = start(env, workdir, **{'train.checkpoint_every': STEPS - 1})
  state = {'done': False}

  def wait():
    if not state['done']:
      finish(proc, workdir)
      state['done'] = True
    return workdir

  def compiled():
    """Waits until its training programs are in the shared cache (its
    stage-1 training is over), so that the interrupted runs load them
    instead of compiling them again."""
    if state['done'] or state.get('compiled'):
      return
    while (event := next_event(proc, workdir)) != 'stage-done':
      assert event is not None, log_of(workdir)[-3000:]
    state['compiled'] = True

  wait.compiled = compiled
  yield wait
  if proc.poll() is None:
    proc.kill()
    proc.wait()
  proc.events.close()


def assert_same_run(a, b):
  config = subprocess_config()
  pa = params_lib.load_params(config, str(a))
  pb = params_lib.load_params(config, str(b))
  same = jax.tree.map(lambda x, y: np.array_equal(np.asarray(x),
                                                  np.asarray(y)), pa, pb)
  assert jax.tree.all(same), 'parameters differ'
  ma = json.load(open(os.path.join(a, 'metrics.json'), encoding='utf-8'))
  mb = json.load(open(os.path.join(b, 'metrics.json'), encoding='utf-8'))
  assert ma == mb


def test_sigkill_then_sigterm_then_resume_is_bit_identical(env, reference):
  workdir = env['root'] / 'interrupted'
  reference.compiled()
  # 1. SIGKILL (no warning) once an early step is saved: which one is
  # drawn, from a fixed seed so that a failure reruns the same way.
  target = int(np.random.default_rng(28).integers(1, 4))
  proc = start(env, workdir, delay=0.3)
  killed_after = wait_for_step(proc, workdir, above=target - 1)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc.events.close()
  assert not checkpoints.training_complete(str(workdir))
  assert (workdir / workdir_lock.LOCK_NAME).exists()  # Nobody removed it.
  # 2. Resume; SIGTERM (preemption) once it has saved a later step.
  proc = start(env, workdir, delay=0.3)
  wait_for_step(proc, workdir, above=saved_steps(workdir)[-1])
  proc.send_signal(signal.SIGTERM)
  finish(proc, workdir, expect=preemption.Preempted.EXIT_CODE)
  log = log_of(workdir)
  assert 'Preempted (SIGTERM): saved a checkpoint at stage 1 step' in log
  assert 'Traceback' not in log
  assert 'keeping freed memory (config.keep_freed_memory): True' in log
  # The killed run's lock was taken over (its pid is gone); this one
  # released its own on the way out.
  assert 'Taking over the lock of workdir' in log
  assert 'that process no longer exists' in log
  assert not (workdir / workdir_lock.LOCK_NAME).exists()
  stopped_at = saved_steps(workdir)[-1]
  assert killed_after < stopped_at <= STEPS, (killed_after, stopped_at)
  assert not checkpoints.training_complete(str(workdir))
  # 3. Resume to the end: the same numbers as the uninterrupted run.
  proc = start(env, workdir, **{'train.checkpoint_every': 1000})
  finish(proc, workdir)
  assert f'Resuming from checkpoint at stage 1 step {stopped_at}' in (
      log_of(workdir))
  assert checkpoints.training_complete(str(workdir))
  straight = reference()
  assert checkpoints.training_complete(str(straight))
  assert_same_run(straight, workdir)
  # config.tensorboard=False: no event files; the scalars still logged.
  assert not (workdir / 'tensorboard').exists()
  assert (workdir / 'scalars.jsonl').stat().st_size > 0


def test_changed_model_is_refused_harmless_changes_are_not(env, reference,
                                                           tmp_path):
  workdir = tmp_path / 'wd'
  shutil.copytree(reference() / 'checkpoints', workdir / 'checkpoints')
  ckpt_dir = str(workdir / 'checkpoints')
  harmless = subprocess_config(**{
      'train.stage1.steps': 50, 'train.log_every': 7,
      'train.checkpoint_every': 5, 'train.stage1.learning_rate': 0.1,
      'eval.smoothing_size': 5, 'eval.batch_size': 3})
  checkpoints.check_resume_compatible(harmless, ckpt_dir)
  changed = subprocess_config(**{'model.width': 8, 'model.depth': 3})
  with pytest.raises(validate.ConfigError) as e:
    loop.train_and_checkpoint(changed, str(workdir), loader=None)
  message = str(e.value)
  assert 'model.width: 4 -> 8' in message
  assert 'model.depth: 2 -> 3' in message
  assert 'train.' not in message
  with pytest.raises(validate.ConfigError, match='model.width: 4 -> 8'):
    params_lib.load_params(changed, str(workdir))  # Evaluate mode too.


def test_checkpoint_torn_mid_write_is_ignored(env, reference, tmp_path):
  """A crash during an Orbax write leaves `<step>.orbax-checkpoint-tmp`:
  never restored, deleted by the next writer, the step saved again."""
  straight = reference()
  workdir = tmp_path / 'wd'
  shutil.copytree(straight / 'checkpoints', workdir / 'checkpoints')
  last = saved_steps(workdir)[-1]
  torn = workdir / 'checkpoints' / f'{last + 1}.orbax-checkpoint-tmp'
  shutil.copytree(workdir / 'checkpoints' / str(last), torn)
  shutil.rmtree(torn / 'state')  # Half written.
  config = subprocess_config()
  params = params_lib.load_params(config, str(workdir))  # Read-only restore.
  expected = params_lib.load_params(config, str(straight))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               params, expected)
  assert torn.exists()  # A reader never deletes: a writer may be at work.


def test_torn_write_is_cleaned_up_and_saved_again(tmp_path):
  directory = str(tmp_path / 'ckpt')
  state = {'w': jnp.arange(4.0)}
  abstract = lambda stage: jax.eval_shape(lambda: state)
  ckpt = checkpoints.Checkpointer(directory, keep=3)
  ckpt.save(1, state, {'stage': 1, 'stage_step': 1, 'global_step': 1})
  ckpt.close()
  torn = os.path.join(directory, '2.orbax-checkpoint-tmp')
  shutil.copytree(os.path.join(directory, '1'), torn)
  os.remove(os.path.join(torn, 'progress', 'metadata'))
  ckpt = checkpoints.Checkpointer(directory, keep=3)
  progress, restored = ckpt.restore_latest(abstract)
  assert progress['global_step'] == 1
  np.testing.assert_array_equal(restored['w'], state['w'])
  assert not os.path.exists(torn)
  ckpt.save(2, {'w': state['w'] + 1}, dict(progress, global_step=2))
  ckpt.wait()
  assert ckpt.restore_latest(abstract)[0]['global_step'] == 2
  ckpt.close()


# --------------------------------------------------------- non-finite steps

NAN_CONFIG = {'model.depth': 1,  # One stage-1 program to compile.
              'train.stage1.steps': 6, 'train.stage2.steps': 0,
              'train.stage3.steps': 0, 'eval.scoring': 'recursion',
              # Saved by the clock (every step), checked by the loop.
              'train.checkpoint_every': 100, 'train.checkpoint_minutes': 1e-9,
              'train.log_every': 5}
NAN_STEP = 4  # 1-based, as checkpoints count; batch index 3.


class NaNAt:
  """A loader whose batch number `step` (1-based) holds a NaN pixel. All
  batches are float32 (inference.to_float passes them through), so one program
  serves the good and the bad batches."""

  def __init__(self, loader, step):
    self.loader, self.step = loader, step

  def train_batches(self, batch_size, seed, start_step=0, **kwargs):
    batches = self.loader.train_batches(batch_size, seed, start_step,
                                        **kwargs)
    for i, batch in enumerate(batches, start_step + 1):
      image = batch['image'].astype(np.float32) / 255.0
      if i == self.step:
        image[0, 0, 0, 0] = np.nan
      yield {'image': image}


def all_finite(tree) -> bool:
  return all(bool(np.isfinite(np.asarray(x)).all())
             for x in jax.tree.leaves(tree))


@pytest.mark.slow
def test_nonfinite_step_stops_without_saving_then_skip_mode_finishes(
    make_config, tmp_path, caplog):
  workdir = str(tmp_path / 'wd')
  config = make_config(**NAN_CONFIG)
  loader = NaNAt(run_lib.prepare(config, workdir), NAN_STEP)
  with pytest.raises(FloatingPointError,
                     match=f'stage 1 \\(rcae\\) at step {NAN_STEP}'):
    loop.train_and_checkpoint(config, workdir, loader)
  assert saved_steps(workdir)[-1] == NAN_STEP - 1  # The last good one.
  assert all_finite(params_lib.load_params(config, workdir))
  assert not checkpoints.training_complete(workdir)

  config.train.skip_nonfinite = True  # Resumes at step 3, skips step 4.
  with caplog.at_level('WARNING'):
    params = loop.train_and_checkpoint(config, workdir, loader)
  assert 'skipped 1 batch(es) with a non-finite loss' in caplog.text
  assert all_finite(params)
  assert saved_steps(workdir)[-1] == 6
  assert checkpoints.training_complete(workdir)
  scalars = [json.loads(l) for l in open(os.path.join(workdir,
                                                      'scalars.jsonl'))]
  logged = [r for r in scalars if 'stage1/param_norm' in r]
  assert logged and all('stage1/grad_norm' in r for r in logged)


def test_guarded_step_keeps_state_on_nonfinite_batch(make_config):
  """No host sync needed: the step itself leaves params and optimizer
  state untouched, and counts the step."""
  config = make_config(**{'model.depth': 1})  # One stage-1 program.
  nets = inference.build_networks(config.model)
  state, frozen = train_state.split(train_state.fresh_state(
      train.initial_params(nets, config), 1, config), 1)
  before = jax.tree.map(lambda x: np.array(x, copy=True), state)
  step_fn = train.make_step(config, 1, nets)
  good = np.full((4, 32, 32, 3), 0.5, np.float32)
  bad = good.copy()
  bad[1, 2, 3, 0] = np.inf
  state, m = step_fn(state, frozen, {'image': bad}, None, 0)
  assert not bool(m['finite'])
  assert int(m['nonfinite_steps']) == 1
  assert int(m['first_nonfinite_step']) == 1
  for part in ('params', 'opt_state'):
    same = jax.tree.map(np.array_equal, getattr(before, part),
                        getattr(state, part))
    assert jax.tree.all(same), part
  state, m = step_fn(state, frozen, {'image': good}, None, 1,
                     {k: m[k] for k in nonfinite.HEALTH_KEYS})
  assert bool(m['finite']) and int(m['nonfinite_steps']) == 1
  assert not jax.tree.all(jax.tree.map(
      np.array_equal, before.params, state.params))


def test_sigterm_handler_is_restored_after_training():
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.StopRequest() as stop:
    assert signal.getsignal(signal.SIGTERM) != previous
    # Delivered and handled before raise_signal returns (no waiting).
    signal.raise_signal(signal.SIGTERM)
    assert stop.requested(0)
  assert signal.getsignal(signal.SIGTERM) == previous


def test_relative_workdir_checkpoints(tmp_path, monkeypatch):
  """`--workdir workdirs/x` (relative): Orbax's writer needs absolute."""
  monkeypatch.chdir(tmp_path)
  ckpt = checkpoints.Checkpointer(os.path.join('wd', 'checkpoints'), keep=1)
  ckpt.save(1, {'w': jnp.ones(2)},
            {'stage': 1, 'stage_step': 1, 'global_step': 1})
  ckpt.wait()
  restored = ckpt.restore_latest(
      lambda stage: jax.eval_shape(lambda: {'w': jnp.ones(2)}))
  assert restored[0]['global_step'] == 1
  ckpt.close()


# ------------------------------------------------------ damaged checkpoints


def _three_checkpoints(directory):
  """Steps 1, 2, 3 of a small state whose values say which step it is."""
  ckpt = checkpoints.Checkpointer(directory, keep=3)
  for step in (1, 2, 3):
    ckpt.save(step, {'w': jnp.full(4, float(step))},
              {'stage': 1, 'stage_step': step, 'global_step': step})
  ckpt.close()


def _abstract(stage):
  del stage
  return jax.eval_shape(lambda: {'w': jnp.zeros(4)})


def _truncate_data(step_dir):
  """Halves every array data file of a step: a copy cut short."""
  for root, _, names in os.walk(os.path.join(step_dir, 'state')):
    if os.path.basename(root) == 'd':
      for name in names:
        path = os.path.join(root, name)
        data = open(path, 'rb').read()
        with open(path, 'wb') as f:
          f.write(data[:len(data) // 2])


def _delete_metadata(step_dir):
  """A file lost from inside the step (a half-synced bucket)."""
  os.remove(os.path.join(step_dir, 'state', '_METADATA'))


def _delete_progress(step_dir):
  os.remove(os.path.join(step_dir, 'progress', 'metadata'))


@pytest.mark.parametrize('damage', [_truncate_data, _delete_metadata,
                                    _delete_progress])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(
    tmp_path, caplog, damage):
  directory = str(tmp_path / 'ckpt')
  _three_checkpoints(directory)
  damage(os.path.join(directory, '3'))
  # Evaluate mode reads only: falls back, moves nothing.
  reader = checkpoints.Checkpointer(directory, keep=3, read_only=True)
  with caplog.at_level('WARNING'):
    progress, state = reader.restore_latest(_abstract)
  reader.close()
  assert progress['global_step'] == 2
  np.testing.assert_array_equal(state['w'], np.full(4, 2.0))
  assert f'Checkpoint {directory}/3 cannot be restored' in caplog.text
  assert os.path.isdir(os.path.join(directory, '3'))
  # A training run falls back too, sets the damaged one aside and saves
  # that step number again.
  ckpt = checkpoints.Checkpointer(directory, keep=3)
  progress, state = ckpt.restore_latest(_abstract)
  assert progress['global_step'] == 2
  assert sorted(os.listdir(directory)) == ['1', '2', '3.damaged']
  ckpt.save(3, {'w': jnp.full(4, 30.0)},
            {'stage': 1, 'stage_step': 3, 'global_step': 3})
  ckpt.wait()
  progress, state = ckpt.restore_latest(_abstract)
  ckpt.close()
  assert progress['global_step'] == 3
  np.testing.assert_array_equal(state['w'], np.full(4, 30.0))


def test_no_restorable_checkpoint_stops_naming_every_path(tmp_path):
  directory = str(tmp_path / 'ckpt')
  _three_checkpoints(directory)
  _truncate_data(os.path.join(directory, '3'))
  _delete_metadata(os.path.join(directory, '2'))
  shutil.rmtree(os.path.join(directory, '1', 'state'))
  ckpt = checkpoints.Checkpointer(directory, keep=3)
  with pytest.raises(checkpoints.CheckpointError) as e:
    ckpt.restore_latest(_abstract)
  ckpt.close()
  message = str(e.value)
  assert message.startswith(f'no checkpoint in {directory} can be restored')
  for step in (3, 2, 1):
    assert f'{directory}/{step}: ' in message
  assert 'Nothing was started from scratch' in message
  assert '\n' not in message
  assert sorted(os.listdir(directory)) == ['1', '2', '3']  # All left alone.


# ---------------------------------------------------------------- full disk


def disk_full_inside(monkeypatch, part: str):
  """Writes through epath (Orbax's metadata and JSON items) to a path that
  contains `part` fail as on a full disk."""
  from etils.epath import abstract_path  # pylint: disable=g-import-not-at-top
  real = abstract_path.Path.write_text

  def write_text(self, *args, **kwargs):
    if part in os.fspath(self):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(self))
    return real(self, *args, **kwargs)

  monkeypatch.setattr(abstract_path.Path, 'write_text', write_text)


# After a save fails, Orbax (0.12, which runs a save's coroutines on event
# loops of its own) leaves two kinds of debris that Python reports when
# they are garbage-collected: a callback scheduled on one of those loops
# after it closed (asyncio's call_soon_threadsafe raises 'Event loop is
# closed' where nobody can catch it: an unraisable exception), and the
# write coroutines the failed save never awaited (a RuntimeWarning). Not
# our code, and harmless (the save has already failed and been reported).
# Seen 2026-12-07 in 4 of the day's 9 runs of the suite and in both runs
# of this file alone, at whatever test was running at the next collection,
# so the two tests whose saves fail in this process collect at their end
# (`collect_orbax_debris`) and only they filter these two messages. (':'
# cannot appear in a filter's message, hence the '.'s.)
def orbax_failed_save_debris(test):
  test = pytest.mark.filterwarnings(
      r'ignore:Exception ignored in. None[\s\S]*Event loop is closed'
      ':pytest.PytestUnraisableExceptionWarning')(test)
  return pytest.mark.filterwarnings(
      "ignore:coroutine 'async_serialize_from_host.<locals>.write_fragment' "
      'was never awaited:RuntimeWarning')(test)


def collect_orbax_debris():
  """Collects the failed save's debris now, inside the filtered test."""
  gc.collect()


@orbax_failed_save_debris
def test_checkpoint_save_on_a_full_disk_names_the_intact_one(
    tmp_path, monkeypatch):
  directory = str(tmp_path / 'ckpt')
  ckpt = checkpoints.Checkpointer(directory, keep=3)
  for step in (1, 2):
    ckpt.save(step, {'w': jnp.full(4, float(step))},
              {'stage': 1, 'stage_step': step, 'global_step': step})
  ckpt.wait()
  disk_full_inside(monkeypatch, '/3.orbax-checkpoint-tmp')
  with pytest.raises(checkpoints.CheckpointWriteError) as e:
    ckpt.save(3, {'w': jnp.full(4, 3.0)},
              {'stage': 1, 'stage_step': 3, 'global_step': 3})
    ckpt.wait()  # The write is async: its error surfaces here at the latest.
  message = str(e.value)
  assert 'No space left on device' in message
  assert 'The disk is full' in message and '\n' not in message
  assert (f'The newest complete checkpoint, {directory}/2, is intact and a '
          'rerun of the same command resumes from it.') in message
  with pytest.raises(checkpoints.CheckpointWriteError):
    ckpt.close()  # The run stops: Orbax raises the failure again.
  assert sorted(os.listdir(directory)) == ['1', '2', '3.orbax-checkpoint-tmp']
  monkeypatch.undo()  # Space freed; the rerun:
  # As in the test below: the failed save's background writers may still
  # be finishing in this process, and the rerun's clean-up of their
  # folder must not race them (seen once: "Directory not empty").
  settle(directory)
  ckpt = checkpoints.Checkpointer(directory, keep=3)
  progress, state = ckpt.restore_latest(_abstract)
  assert progress['global_step'] == 2
  np.testing.assert_array_equal(state['w'], np.full(4, 2.0))
  ckpt.save(3, {'w': jnp.full(4, 3.0)},
            {'stage': 1, 'stage_step': 3, 'global_step': 3})
  ckpt.close()
  assert sorted(os.listdir(directory)) == ['1', '2', '3']
  collect_orbax_debris()


@pytest.mark.slow
@orbax_failed_save_debris
def test_training_goes_on_past_a_damaged_checkpoint_stops_on_a_full_disk(
    env, reference, tmp_path, monkeypatch, caplog):
  """One resumed run meets both (one in-process training, one rerun, not
  three runs): the latest checkpoint is damaged, so it resumes from the
  one before and trains on; the disk is full when it saves, so it stops
  naming the intact checkpoint; the rerun, a new process as a user's
  would be, resumes there and ends bit-identical to the run that met
  neither."""
  straight = reference()
  workdir = tmp_path / 'wd'
  shutil.copytree(straight / 'checkpoints', workdir / 'checkpoints')
  assert saved_steps(workdir) == [STEPS - 1, STEPS]
  _truncate_data(str(workdir / 'checkpoints' / str(STEPS)))
  config = subprocess_config()
  loader = run_lib.prepare(config, str(workdir))
  disk_full_inside(monkeypatch, f'/{STEPS}.orbax-checkpoint-tmp')
  with caplog.at_level('INFO'):
    with pytest.raises(checkpoints.CheckpointWriteError) as e:
      loop.train_and_checkpoint(config, str(workdir), loader)
  assert (f'Fell back to checkpoint {workdir}/checkpoints/{STEPS - 1}' in
          caplog.text)
  assert f'Resuming from checkpoint at stage 1 step {STEPS - 1}' in (
      caplog.text)
  assert 'No space left on device' in str(e.value)
  assert (f'The newest complete checkpoint, {workdir}/checkpoints/'
          f'{STEPS - 1}, is intact') in str(e.value)
  assert saved_steps(workdir) == [STEPS - 1]
  assert (workdir / 'checkpoints' / f'{STEPS}.damaged').is_dir()
  assert not checkpoints.training_complete(str(workdir))
  json.loads((workdir / 'config.json').read_text())  # Earlier outputs.
  for line in (workdir / 'scalars.jsonl').read_text().splitlines():
    json.loads(line)
  monkeypatch.undo()  # Space freed: the same command again.
  # Orbax's background writers of the failed save may still be finishing
  # in this process (a real rerun is a new process, and they died with
  # the old one): the rerun's clean-up of their folder must not race them.
  settle(workdir / 'checkpoints')
  proc = start(env, workdir)
  finish(proc, workdir)
  assert f'Resuming from checkpoint at stage 1 step {STEPS - 1}' in (
      log_of(workdir))
  assert saved_steps(workdir) == [STEPS - 1, STEPS]
  assert checkpoints.training_complete(str(workdir))
  assert_same_run(straight, workdir)
  collect_orbax_debris()


def settle(path, quiet_s=1.0, timeout_s=60.0) -> None:
  """Waits until nothing under `path` has changed for `quiet_s`."""
  def size(file):
    try:
      return os.path.getsize(file)
    except OSError:
      return -1  # Deleted between the listing and now.

  def snapshot():
    return sorted((root, name, size(os.path.join(root, name)))
                  for root, _, names in os.walk(path) for name in names)
  t0, last, since = time.time(), snapshot(), time.time()
  while time.time() - since < quiet_s and time.time() - t0 < timeout_s:
    time.sleep(0.1)
    now = snapshot()
    if now != last:
      last, since = now, time.time()


def test_output_write_on_a_full_disk_keeps_the_old_file(tmp_path,
                                                        monkeypatch):
  path = tmp_path / 'metrics.json'
  fileio.write_json_atomic(path, {'pixel_auroc': 0.9})
  real_open = open

  class FullDisk:
    def __init__(self, name, mode):
      self.name, self.f = name, real_open(name, mode)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

    def write(self, data):
      self.f.write(data[:3])
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(fileio, 'open', FullDisk, raising=False)
  with pytest.raises(fileio.WriteError) as e:
    fileio.write_json_atomic(path, {'pixel_auroc': 0.1})
  assert str(e.value) == (
      f'could not write {path}: No space left on device (the disk is full: '
      'free space, then rerun); its previous version, if any, is unchanged')
  assert json.loads(path.read_text()) == {'pixel_auroc': 0.9}
  assert os.listdir(tmp_path) == ['metrics.json']  # No temp file left.


def test_scalars_log_cut_short_is_repaired_on_resume(tmp_path):
  """A full disk (or a kill) can leave half a row; the resumed run's rows
  must not be glued to it."""
  path = tmp_path / 'scalars.jsonl'
  path.write_text('{"step": 1}\n{"step": 2}\n{"st')
  w = writers.JsonlWriter(str(tmp_path))
  w.write_scalars(3, {'loss': 0.5})
  w.close()
  rows = [json.loads(l) for l in path.read_text().splitlines()]
  assert [r['step'] for r in rows] == [1, 2, 3]


def tmpfs_available(where) -> bool:
  """A private mount namespace with a small tmpfs: root, or a kernel that
  lets users mount in their own namespaces. Not on every machine."""
  if not shutil.which('unshare'):
    return False
  os.makedirs(where, exist_ok=True)
  probe = subprocess.run(
      ['unshare', '-m', '--propagation', 'private', 'sh', '-c',
       f'mount -t tmpfs -o size=1m tmpfs {where}'],
      capture_output=True, check=False)
  return probe.returncode == 0


FULL_DISK_SCRIPT = r'''
set -u
mount -t tmpfs -o size=64m tmpfs "$MNT"
mkfifo "$OUT/events"
RCAE_TEST_STEP_DELAY=0.5 RCAE_TEST_EVENT_FD=3 "$@" --workdir "$MNT/wd" \
  > "$OUT/first.log" 2>&1 3> "$OUT/events" &
run=$!
# One line per training batch the run takes (tests/delayed_main.py); EOF
# when it has exited.
while read -r event; do
  [ -d "$MNT/wd/checkpoints/2" ] && break
done < "$OUT/events"
dd if=/dev/zero of="$MNT/filler" bs=64k 2>/dev/null  # Until ENOSPC.
wait $run
echo $? > "$OUT/first.rc"
cp -a "$MNT/wd" "$OUT/after_full"
rm "$MNT/filler"
"$@" --workdir "$MNT/wd" > "$OUT/rerun.log" 2>&1
echo $? > "$OUT/rerun.rc"
cp -a "$MNT/wd" "$OUT/after_rerun"
'''


@pytest.mark.slow
def test_real_full_disk_stops_in_one_line_and_the_rerun_resumes(env,
                                                                 tmp_path):
  """The real thing where the machine allows it: the workdir on a 64 MiB
  tmpfs that fills up mid-training (everything else stays on the normal
  disk)."""
  mnt = tmp_path / 'mnt'
  if not tmpfs_available(mnt):
    pytest.skip('cannot mount a tmpfs in a private mount namespace here')
  out = tmp_path / 'out'
  out.mkdir()
  args = [sys.executable, DELAYED_MAIN, '--config', env['config']]
  args += [f'--config.{k}={v}'
           for k, v in dict(OVERRIDES, tensorboard=True).items()]
  subprocess.run(
      ['unshare', '-m', '--propagation', 'private', 'bash', '-c',
       FULL_DISK_SCRIPT, 'full_disk', *args],
      env=dict(env['env'], MNT=str(mnt), OUT=str(out)), check=True,
      timeout=600)
  first = (out / 'first.log').read_text()
  assert (out / 'first.rc').read_text().strip() == '1', first[-3000:]
  last = first.strip().splitlines()[-1]
  assert last.startswith('rcae_jax: error: '), first[-3000:]
  assert 'No space left on device' in last or 'disk is full' in last, last
  # What the failed run left is readable: its newest complete checkpoint
  # restores, and the files written before are whole.
  full = out / 'after_full'
  kept = saved_steps(full)[-1]
  assert 2 <= kept < STEPS, first[-3000:]
  params_lib.load_params(subprocess_config(), str(full))
  json.loads((full / 'config.json').read_text())
  for line in (full / 'scalars.jsonl').read_text().splitlines()[:-1]:
    json.loads(line)  # (Its last line may be torn: repaired on resume.)
  rerun = (out / 'rerun.log').read_text()
  assert (out / 'rerun.rc').read_text().strip() == '0', rerun[-3000:]
  assert f'Resuming from checkpoint at stage 1 step {kept}' in rerun
  done = out / 'after_rerun'
  assert checkpoints.training_complete(str(done))
  assert json.loads((done / 'metrics.json').read_text())
  for line in (done / 'scalars.jsonl').read_text().splitlines():
    json.loads(line)


# ------------------------------------------------------- numbers, end to end

# The reference run (8 steps) is not trained enough to detect anything: its
# pixel AUROC is 0.22, below a noise map's. Trained on to 200 stage-1 steps
# (resumed from its checkpoint; ~7 s of steps, its programs are in the
# compilation cache) it scores, measured on 2026-11-30 (XLA:CPU, 2 cores;
# the run is deterministic there): pixel AUROC 0.9071, AU-PRO 0.5094,
# pixel AP 0.1011. Noise maps on the same 12 test images (48 defect pixels)
# score at most 0.536, 0.173 and 0.006 over seeds 0-4. The margins below
# keep about two thirds of those gaps. Image AUROC is not pinned: 0.53 at
# this budget, within the noise's 0.25-0.69 on 12 images.
TRAINED_STEPS = 200
MARGINS = {'pixel_auroc': 0.25, 'au_pro': 0.2, 'pixel_ap': 0.05}


def noise_metrics(config, workdir, seeds=range(5)) -> dict:
  """The best of several uniform-noise maps on the test set, per metric."""
  from rcae_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  loader = run_lib.prepare(config, str(workdir))
  labels = np.array([e.label for e in loader.files.test])
  masks = loader.full_masks()
  best = {}
  for seed in seeds:
    rng = np.random.default_rng(seed)
    maps = [rng.random(m.shape).astype(np.float32) for m in masks]
    scores = np.array([m.max() for m in maps])
    out = metrics.compute_metrics(labels, scores, masks, maps)
    for key in MARGINS:
      best[key] = max(best.get(key, 0.0), out[key])
  return best


def test_trained_smoke_model_beats_a_noise_map(env, reference, tmp_path):
  workdir = tmp_path / 'trained'
  shutil.copytree(reference() / 'checkpoints', workdir / 'checkpoints')
  proc = start(env, workdir, **{'train.stage1.steps': TRAINED_STEPS,
                                'train.checkpoint_every': 1000,
                                'train.log_every': 1000})
  finish(proc, workdir)
  assert f'Resuming from checkpoint at stage 1 step {STEPS}' in (
      log_of(workdir))
  trained = json.loads((workdir / 'metrics.json').read_text())['synthetic']
  noise = noise_metrics(subprocess_config(), tmp_path / 'noise')
  for key, margin in MARGINS.items():
    assert trained[key] >= noise[key] + margin, (key, trained[key],
                                                 noise[key])
