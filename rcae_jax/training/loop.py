"""The training loop: all stages in order, Orbax checkpoints, resume,
forks and preemption, around the steps of train.py.

Reliability (preemptible machines, long runs):
- SIGTERM: the step in flight finishes, a checkpoint is written at it, and
  the process exits with code 143 (`preemption.Preempted`); rerunning the
  same command resumes there. Checkpoints are also written every
  `checkpoint_every` steps and every `checkpoint_minutes` minutes.
- A non-finite loss or gradient never reaches the parameters (the jitted
  step keeps the old ones); the run stops with FloatingPointError before
  the next checkpoint, or skips such batches with `skip_nonfinite`.
- Resuming with a config that changes the model is refused, naming the
  fields; `checkpoints.training_complete(workdir)` tells whether all stages
  finished. A network whose stage has not begun may change shape (a fork):
  it is re-initialised from the config.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Callable, Optional

import jax
import ml_collections
import numpy as np

from rcae_jax.common import checkpoints
from rcae_jax.common import errors
from rcae_jax.common import sharding
from rcae_jax.common import writers
from rcae_jax.data import loader as loader_lib
from rcae_jax.model import inference
from rcae_jax.training import nonfinite
from rcae_jax.training import preemption
from rcae_jax.training import train
from rcae_jax.training import train_state


def train_and_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                         loader: loader_lib.Loader,
                         on_eval: Optional[Callable] = None) -> dict:
  """Runs (or resumes) all stages; returns the final parameters.

  `on_eval(stage, global_step, params, writer)`, when given, is called every
  `config.eval.every_steps` steps of each stage and at each stage's end
  (learning curves; run.py passes evaluate.curve_point).

  Raises preemption.Preempted (exit code 143) after saving when SIGTERM
  arrives, FloatingPointError on a non-finite step (unless skip_nonfinite)
  without saving past it, and ConfigError when the workdir holds another
  model's checkpoints."""
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                  config.train.keep_checkpoints)
  writer = writers.create_writer(workdir, jax.process_index() == 0,
                                 config.tensorboard)
  try:
    if ckpt.latest_step() is not None:  # Something to resume: same model?
      # Before compiling. A network not trained yet may change (forks).
      checkpoints.check_resume_compatible(config, ckpt.directory,
                                          ckpt.latest_progress())
    with preemption.StopRequest() as stop:
      return train_stages(config, loader, writer, ckpt, stop, on_eval)
  finally:
    ckpt.close()  # Waits for the last write, also when stopping on errors.
    writer.flush()


def train_stages(config, loader, writer, ckpt, stop: preemption.StopRequest,
                 on_eval: Optional[Callable] = None) -> dict:
  nets = inference.build_networks(config.model)
  params = train.initial_params(nets, config)
  log_param_counts(params)
  progress = {'stage': 1, 'stage_step': 0, 'global_step': 0}
  reinit = {}
  restored = ckpt.restore_latest(
      lambda stage: train_state.abstract_state(params, stage, config),
      reconcile=functools.partial(reconcile_networks, reinit=reinit))
  if restored is not None:
    progress, state = restored
    if reinit:  # Untrained networks of other shapes: the config's instead.
      state = state.replace(params=dict(state.params,
                                        **{k: params[k] for k in reinit}))
      restored = progress, state
    params = state.params
    logging.info('Resuming from checkpoint at stage %d step %d (global %d)',
                 progress['stage'], progress['stage_step'],
                 progress['global_step'])
  checkpoints.record_model_config(config, ckpt.directory)
  for stage in (1, 2, 3):
    steps = config.train[f'stage{stage}'].steps
    if stage < progress['stage'] or steps <= 0:
      continue
    start = progress['stage_step'] if stage == progress['stage'] else 0
    if restored is not None and stage == progress['stage'] and start:
      state = restored[1]
    else:
      state = train_state.fresh_state(params, stage, config)
    if start >= steps:
      params = state.params
      continue
    state, progress = run_stage(config, stage, nets, state, start, progress,
                                loader, writer, ckpt, stop, on_eval)
    params = state.params
  checkpoints.set_complete(ckpt.directory, progress)
  if stop.signalled:  # Arrived after the last step's check: all is saved.
    stop_preempted(ckpt, progress)
  return params


def reconcile_networks(progress: dict, target, saved_shapes, reinit: dict):
  """The restore target, adapted for forks (checkpoints.Checkpointer's
  `reconcile`): a network whose saved shapes differ from the config's
  (e.g. model.crd_residual or model.dpn_guide changed) is restored with
  the saved shapes and marked in `reinit` to be re-initialised, if its
  stage has not begun; if it has, ConfigError: a trained network must
  match."""
  saved = saved_shapes()
  if saved is None:  # Unreadable: restore as before, Orbax decides.
    return target
  saved = saved['params']
  other = checkpoints.networks_of_other_shapes(saved, target.params)
  for stage, name in enumerate(train_state.STAGES, start=1):
    if name not in other:
      continue
    if stage == 1 or checkpoints.stage_begun(progress, stage):
      raise errors.ConfigError(
          f'the checkpoint (stage {progress["stage"]} step '
          f'{progress["stage_step"]}) holds a trained {name.upper()} whose '
          'parameter shapes differ from the config\'s: set its model fields '
          'back, or fork a workdir saved before stage '
          f'{stage} began')
    if name not in reinit:
      logging.warning(
          'Re-initialising %s: its saved parameter shapes differ from the '
          "config's and stage %d has not begun (checkpoint at stage %d step "
          '%d).', name.upper(), stage, progress['stage'],
          progress['stage_step'])
    reinit[name] = True
    target = target.replace(params=dict(target.params, **{
        name: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                           saved[name])}))
  return target


def run_stage(config, stage, nets, state, start, progress, loader, writer,
              ckpt, stop=None, on_eval=None):
  """Steps `start`..steps of one stage; returns (state, progress). The
  state in and out holds every component (as checkpoints do)."""
  stop = stop or preemption.StopRequest()
  steps = config.train[f'stage{stage}'].steps
  mesh = sharding.make_mesh(config.mesh.num_devices)
  batch_size = train.stage_batch_size(config, stage)
  sharding.check_batch(batch_size, mesh)
  step_fn = train.make_step(config, stage, nets, mesh)
  state, frozen = train.place(train_state.split(state, stage), mesh)
  batches = loader.train_batches(batch_size,
                                 seed=config.seed * 1000 + stage,
                                 start_step=start,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
  logging.info('Stage %d (%s): steps %d..%d', stage,
               train_state.STAGES[stage - 1], start, steps)
  # Training again: not complete.
  checkpoints.set_complete(ckpt.directory, None)
  # Progress counts global steps (the x-axis of every other scalar); its
  # ETA is to the end of this stage.
  report = writers.progress_reporter(
      progress['global_step'] - start + steps, writer,
      every_steps=config.train.log_every, prefix=f'stage{stage}/',
      use_clu=config.tensorboard)
  timer = preemption.SaveTimer(config.train.checkpoint_minutes)
  global_step = progress['global_step']
  health = None  # A fresh count (step_fn).
  t0 = time.time()
  for step in range(start, steps):
    batch = sharding.to_global(next(batches), mesh)
    state, metrics = step_fn(state, frozen, batch, None, step, health)
    health = {k: metrics[k] for k in nonfinite.HEALTH_KEYS}
    global_step += 1
    done = step + 1
    report(global_step)
    log_now = done % config.train.log_every == 0 or done == steps
    preempt = stop.requested(global_step)
    save_now = (done % config.train.checkpoint_every == 0 or done == steps or
                preempt or timer.due(log_now))
    if log_now or save_now:  # The only host syncs: never one per step.
      health = nonfinite.check(health, config, stage, done, ckpt)
    if log_now:
      write_step_scalars(writer, stage, global_step, metrics)
    every = config.eval.every_steps
    if on_eval is not None and every and (done % every == 0 or done == steps):
      # Synchronous: the next step donates these parameters' buffers.
      on_eval(stage, global_step,
              train_state.join(state, frozen, stage).params, writer)
    if save_now:
      progress = {'stage': stage, 'stage_step': done,
                  'global_step': global_step}
      ckpt.save(global_step, train_state.join(state, frozen, stage),
                progress)
      writer.flush()  # Scalars reach the workdir (gs:// too) with each save.
      timer.reset()
    if preempt:
      stop_preempted(ckpt, progress)
  logging.info('Stage %d done in %.1f s', stage, time.time() - t0)
  ckpt.wait()
  return train_state.join(state, frozen, stage), progress


def write_step_scalars(writer, stage: int, global_step: int, metrics) -> None:
  values = jax.device_get({k: v for k, v in metrics.items()
                           if k not in nonfinite.HEALTH_KEYS + ('finite',)})
  # A skipped step's NaN would break the logs' plots and JSON readers.
  writer.write_scalars(global_step, {f'stage{stage}/{k}': v for k, v in
                                     values.items() if np.isfinite(v)})


def stop_preempted(ckpt, progress: dict) -> None:
  ckpt.wait()  # The checkpoint must be complete before the process ends.
  message = (f'Preempted (SIGTERM): saved a checkpoint at stage '
             f'{progress["stage"]} step {progress["stage_step"]} (global '
             f'step {progress["global_step"]}) in {ckpt.directory}; rerun '
             'the same command to resume. Exiting with code '
             f'{preemption.Preempted.EXIT_CODE}.')
  logging.warning(message)
  raise preemption.Preempted(message)


def log_param_counts(params) -> dict[str, int]:
  counts = {k: inference.count_params(v) for k, v in params.items()}
  logging.info('Parameters: %s (total %d)', ', '.join(
      f'{k} {v:,}' for k, v in counts.items()), sum(counts.values()))
  return counts
