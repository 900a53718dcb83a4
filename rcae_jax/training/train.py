"""Training: three independent stages, jitted steps, Orbax checkpoints.

Stage 1 trains RcAE (E, D) on normal images with a random depth per batch;
stage 2 trains DPN with RcAE frozen; stage 3 trains CRD on pseudo-anomalies
with RcAE and DPN frozen. "Frozen" is structural: a stage's step receives
the networks it does not train as a separate argument, never donated and
never returned, and its loss is differentiated with respect to its own
component only, so no gradient or optimizer state exists for the others.

Every step is a pure function of (state, batch, rng); the batch order and
the rng are pure functions of (seed, stage, step), so a resumed run sees the
same data and randomness as an uninterrupted one (bit-identical on CPU,
tests/test_reliability.py).

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
  finished.

Beside this module: the forward pass in inference.py, the state and its
optimizer in train_state.py, SIGTERM handling in preemption.py, the resume
signature and parameter loading in checkpoints.py.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rcae_jax.common import checkpoints
from rcae_jax.common import errors
from rcae_jax.common import programs
from rcae_jax.common import sharding
from rcae_jax.common import writers
from rcae_jax.data import geometry
from rcae_jax.data import loader as loader_lib
from rcae_jax.model import inference
from rcae_jax.model import losses
from rcae_jax.training import anomalies
from rcae_jax.training import nonfinite
from rcae_jax.training import preemption
from rcae_jax.training import train_state

def random_crop(x: jax.Array, rng: jax.Array, size: int) -> jax.Array:
  """An independent random `size` x `size` crop of each image (ours): the
  networks are fully convolutional, so training on crops of larger images
  keeps small defects' pixels at the cost per step of the crop size, and
  inference still runs on the whole image. 0 or a size >= the image's
  returns x unchanged."""
  b, h, w, c = x.shape
  if not size or (size >= h and size >= w):
    return x
  ky, kx = jax.random.split(jax.random.fold_in(rng, 0x63726f70))
  ys = jax.random.randint(ky, (b,), 0, h - size + 1)
  xs = jax.random.randint(kx, (b,), 0, w - size + 1)
  return jax.vmap(lambda im, y, x0: jax.lax.dynamic_slice(
      im, (y, x0, 0), (size, size, c)))(x, ys, xs)


# ------------------------------------------------------------- the steps


def _apply_grads(state: train_state.TrainState, grads, tx):
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1,
                       params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state)


def stage1_loss(nets: inference.Networks, rcae_params, x, depth: int,
                consistency_weight: float = 0.0):
  """L1 + gradient L1 of I_R^n for the drawn depth n."""
  apply = functools.partial(nets.rcae.apply, {'params': rcae_params})
  if nets.rcae.recursion == 'iterative':
    recs = apply(x)  # One scan yields every step; pick the drawn one.
    rec = recs[depth - 1]
  else:
    rec = apply(x, depth=depth)  # Only n encoder and n decoder steps run.
  loss = losses.l1_with_gradient(rec, x)
  if consistency_weight:
    # Ours (docs/method.md): neighbouring depths should agree on normal images.
    recs = apply(x)
    loss += consistency_weight * jnp.mean(jnp.abs(recs[1:] - recs[:-1]))
  return loss


def stage1_step(state, frozen, batch, rng, *, depth, nets, tx,
                consistency_weight=0.0, crop_size=0):
  """`depth` is static: drawn on the host per step (`stage1_depth`). A
  traced depth would need lax.switch, whose convolution gradients run ~25x
  slower on XLA:CPU (measured); one compiled program per depth does not."""
  del frozen  # RcAE comes first: it needs no other network.
  x = random_crop(inference.to_float(batch['image']), rng, crop_size)
  loss, grads = jax.value_and_grad(
      lambda p: stage1_loss(nets, p, x, depth, consistency_weight))(
          state.params)
  state = _apply_grads(state, grads, tx)
  return state, {'loss': loss, 'grad_norm': optax.tree.norm(grads)}


def stage1_depth(seed: int, step: int, max_depth: int) -> int:
  """The paper's random depth per batch, uniform in [1, N], a pure function
  of (seed, step) so resumed runs draw the same depths."""
  return int(np.random.default_rng([seed, 1, step]).integers(1, max_depth + 1))


def stage2_step(state, frozen, batch, rng, *, nets, tx, crop_size=0):
  x = random_crop(inference.to_float(batch['image']), rng, crop_size)
  recs = inference.reconstructions(nets, frozen, x)

  def loss_fn(dpn_params):
    dets = inference.details(nets, {'dpn': dpn_params}, recs, x,
                             use_dpn=True)
    return losses.l1_with_gradient(dets, jnp.broadcast_to(x, dets.shape))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  state = _apply_grads(state, grads, tx)
  return state, {'loss': loss, 'grad_norm': optax.tree.norm(grads)}


def input_keep(rng: jax.Array, batch: int, dropout: float):
  """Stage 3's input dropout: float [B], 0 where CRD's image channels are
  zeroed (probability `dropout`, per sample), or None when off (0)."""
  if not dropout:
    return None
  # A stream of its own, so the other draws of the step stay as they were.
  u = jax.random.uniform(jax.random.fold_in(rng, 0x64726f70), (batch,))
  return (u >= dropout).astype(jnp.float32)


def stage3_step(state, frozen, batch, rng, *, nets, tx, use_dpn,
                anomaly_cfg, crop_size=0, input_dropout=0.0, loss='l2'):
  x = random_crop(inference.to_float(batch['image']), rng, crop_size)
  # Pseudo-anomalies are made here, on the device, inside the jitted step.
  x_anom, mask = anomalies.synthesize(rng, x, anomaly_cfg)
  recs = inference.reconstructions(nets, frozen, x_anom)
  dets = inference.details(nets, frozen, recs, x_anom, use_dpn)
  keep = input_keep(rng, x.shape[0], input_dropout)

  def loss_fn(crd_params):
    logits = inference.crd_logits(nets, {'crd': crd_params}, dets, x_anom,
                                  keep)
    return losses.crd_loss(logits, mask, loss)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  state = _apply_grads(state, grads, tx)
  return state, {'loss': loss, 'grad_norm': optax.tree.norm(grads),
                 'anomalous_fraction': jnp.mean(mask)}


# Each stage's step program, once per process for its settings (a
# multi-category run trains the same steps for every category).
_STEPS = programs.Memo(maxsize=16)
# What a step program reads of the config (make_step below).
STEP_SECTIONS = ('seed', 'model', 'train', 'anomalies')


def make_step(config, stage: int, nets: inference.Networks, mesh=None,
              reuse: bool = True) -> Callable:
  """The jitted train step of `stage` (1, 2, 3); the same one as an earlier
  call's with the same networks, mesh and STEP_SECTIONS of the config
  (common/programs.py), unless `reuse` is False (a fresh program, e.g. to
  count what it compiles).

  Called as step_fn(state, frozen, batch, rng, step, health=None), with
  (state, frozen) from train_state.split: `state` (donated) holds what the
  stage trains and its optimizer, `frozen` (not donated, never updated)
  the other networks' parameters. `health` is the previous step's
  metrics' nonfinite.HEALTH_KEYS (None: a fresh count). With a `mesh`,
  everything but the batch is replicated and the batch is split on the
  `data` axis; XLA inserts the gradient all-reduce."""
  if not reuse:
    return _build_step(config, stage, nets, mesh)
  key = (stage, nets, mesh, programs.config_key(config, *STEP_SECTIONS))
  return _STEPS.get(key, lambda: _build_step(config, stage, nets, mesh))


def _build_step(config, stage: int, nets: inference.Networks, mesh
                ) -> Callable:
  stage_cfg = config.train[f'stage{stage}']
  tx = train_state.make_optimizer(stage_cfg)
  crop = config.train.crop_size
  if stage == 1:
    fn = functools.partial(stage1_step, nets=nets, tx=tx,
                           consistency_weight=config.train.consistency_weight,
                           crop_size=crop)
  elif stage == 2:
    fn = functools.partial(stage2_step, nets=nets, tx=tx, crop_size=crop)
  else:
    fn = functools.partial(stage3_step, nets=nets, tx=tx,
                           use_dpn=inference.uses_dpn(config),
                           anomaly_cfg=config.anomalies, crop_size=crop,
                           input_dropout=stage_cfg.input_dropout,
                           loss=stage_cfg.loss)
  guarded = nonfinite.guard(fn)

  # Depth (stage 1) is a static positional argument: one program per depth.
  # rng None: the step's key is derived from `step` inside the program, the
  # same key as step_rng's (measured: ~11 ms a step when built on the host
  # with eager ops on the loaded 2-core CPU, ~0.01 ms jitted).
  def positional(state, frozen, batch, rng, health, step, depth):
    if rng is None:
      rng = step_rng(config.seed, stage, step)
    return guarded(state, frozen, batch, rng, health,
                   **({'depth': depth} if stage == 1 else {}))

  shardings = {}
  if mesh is not None:
    rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    shardings = dict(in_shardings=(rep, rep, data, rep, rep, rep),
                     out_shardings=(rep, rep))
  jitted = jax.jit(positional, static_argnums=6, donate_argnums=0,
                   **shardings)

  def step_fn(state, frozen, batch, rng, step, health=None):
    """`rng` None: the step's key is made on the device from `step`."""
    depth = (stage1_depth(config.seed, step, config.model.depth)
             if stage == 1 else 0)
    if health is None:
      # On the mesh, as the step's outputs are: a count made elsewhere has
      # another type (no mesh in its sharding), and the next step, fed the
      # outputs, would compile a second program (measured: every stage
      # compiled its step twice; configs/cpu_real.py, 2 cores: ~26 s of
      # tracing and compiling a run, 16 s of it stage 3's).
      health = place(nonfinite.healthy(), mesh)
    return jitted(state, frozen, batch, rng, health, np.int32(step), depth)

  step_fn.jitted = jitted  # Its compiled programs: tests count them.
  return step_fn


def stage_batch_size(config, stage: int) -> int:
  """Global batch of a stage: its own `batch_size` if set, else the
  shared train.batch_size."""
  return config.train[f'stage{stage}'].batch_size or (
      config.train.batch_size)


def create_state(config, stage: int, nets: inference.Networks, mesh=None):
  """(state, frozen) of a fresh stage from the config's seed, replicated
  on `mesh`."""
  full = train_state.fresh_state(initial_params(nets, config), stage, config)
  return place(train_state.split(full, stage), mesh)


def place(tree, mesh):
  """Replicates `tree` over the mesh (sharding.replicate), or leaves it
  as it is without one.

  Not a jit with out_shardings (the usual advice for sharded init): the
  arrays come from a compiled init or an Orbax restore, committed to one
  device, which a jit onto the whole mesh refuses."""
  if mesh is None:
    return tree
  return sharding.replicate(tree, mesh)


def step_rng(seed: int, stage: int, step) -> jax.Array:
  """The key of a training step (also traced, inside the step)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed),
                                               stage), step)


# -------------------------------------------------------------- the loop


def run_unoptimised(fn, *args):
  """fn(*args), jitted and compiled without XLA:CPU's optimisations (other
  backends compile as usual): for programs that run once, where optimising
  costs more than it saves."""
  options = ({'xla_backend_optimization_level': 0}
             if jax.default_backend() == 'cpu' else None)
  return jax.jit(fn).lower(*args).compile(compiler_options=options)(*args)


def initial_params(nets: inference.Networks, config) -> dict:
  """`inference.init_params` from the config's seed, as new device arrays
  (the caller's step may donate them)."""
  return jax.device_put(_initial_host_params(
      nets, config.seed, geometry.as_hw(config.data.image_size)))


@functools.lru_cache(maxsize=8)
def _initial_host_params(nets: inference.Networks, seed: int,
                         image_hw: tuple[int, int]) -> dict:
  """Host copies of the initial parameters, once per process for each
  (networks, seed, size): a multi-category run initialises the same
  networks from the same seed for every category, and so do the tests.
  Each call costs 1.0-1.5 s even when the persistent compilation cache
  holds the program (measured: smoke config, 2-core CPU: tracing 0.3-0.5 s,
  loading the cached executable 0.5-0.7 s).

  Compiled unoptimised: it runs once, and the ~100 threefry initialisers
  took ~30 s to optimise on CPU (measured: smoke config, 2 cores) against
  ~5 s unoptimised. Values match the optimised build to float rounding
  (~1e-7)."""
  return jax.device_get(run_unoptimised(functools.partial(
      inference.init_params, nets, image_size=image_hw),
                                        jax.random.PRNGKey(seed)))


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
  params = initial_params(nets, config)
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
  batch_size = stage_batch_size(config, stage)
  sharding.check_batch(batch_size, mesh)
  step_fn = make_step(config, stage, nets, mesh)
  state, frozen = place(train_state.split(state, stage), mesh)
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
