"""Training: three independent stages, jitted steps, Orbax checkpoints.

Stage 1 trains RcAE (E, D) on normal images with a random depth per batch;
stage 2 trains DPN with RcAE frozen; stage 3 trains CRD on pseudo-anomalies
with RcAE and DPN frozen. "Frozen" is structural: each stage's loss is a
function of its own component's parameters only, so no gradient is ever
computed for the others.

Every step is a pure function of (state, batch, rng); the batch order and
the rng are pure functions of (seed, stage, step), so a resumed run sees the
same data and randomness as an uninterrupted one (bit-identical on CPU,
tests/test_reliability.py).

Reliability (preemptible machines, long runs):
- SIGTERM: the step in flight finishes, a checkpoint is written at it, and
  the process exits with code 143 (`Preempted`); rerunning the same command
  resumes there. Checkpoints are also written every `checkpoint_every` steps
  and every `checkpoint_minutes` minutes.
- A non-finite loss or gradient never reaches the parameters (the jitted
  step keeps the old ones); the run stops with FloatingPointError before
  the next checkpoint, or skips such batches with `skip_nonfinite`.
- Resuming with a config that changes the model is refused, naming the
  fields; `training_complete(workdir)` tells whether all stages finished.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Optional

import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rcae_jax import anomalies
from rcae_jax import checkpoints
from rcae_jax import fileio
from rcae_jax import geometry
from rcae_jax import input_pipeline
from rcae_jax import losses
from rcae_jax import models
from rcae_jax import sharding
from rcae_jax import validate
from rcae_jax import writers

STAGES = ('rcae', 'dpn', 'crd')  # Component trained by stage 1, 2, 3.


@dataclasses.dataclass(frozen=True)
class Networks:
  rcae: models.RcAE
  dpn: models.DPN
  crd: models.CRD
  crd_steps: tuple[int, ...]


def build_networks(model_cfg) -> Networks:
  return Networks(models.build_rcae(model_cfg), models.build_dpn(model_cfg),
                  models.build_crd(model_cfg),
                  tuple(models.crd_step_indices(model_cfg.depth,
                                                model_cfg.crd_steps)))


@flax.struct.dataclass
class TrainState:
  """What a stage updates. `params` holds every component; only
  `params[component]` changes in a stage, `opt_state` is that component's."""
  step: jax.Array
  params: Any
  opt_state: Any


def to_float(images: jax.Array) -> jax.Array:
  """uint8 batches from the loaders to float32 in [0, 1], on device."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def init_params(nets: Networks, rng: jax.Array, image_size) -> dict:
  """`image_size`: S or (H, W) (the shapes do not depend on it: the
  networks are fully convolutional)."""
  height, width = geometry.as_hw(image_size)
  x = jnp.zeros((1, height, width, 3), jnp.float32)
  k1, k2, k3 = jax.random.split(rng, 3)
  rcae = nets.rcae.init(k1, x)['params']
  recs = jnp.zeros((nets.rcae.depth, *x.shape), jnp.float32)
  dpn = nets.dpn.init(k2, recs, losses.gradient_image(x))['params']
  crd = nets.crd.init(k3, recs[jnp.array(nets.crd_steps)], x)['params']
  return {'rcae': rcae, 'dpn': dpn, 'crd': crd}


def learning_rate(stage_cfg):
  """The stage's learning rate: constant (the paper states no schedule), or
  linear warmup then cosine decay to zero over the stage (ours)."""
  if stage_cfg.schedule == 'constant':
    return stage_cfg.learning_rate
  return optax.warmup_cosine_decay_schedule(
      0.0, stage_cfg.learning_rate, stage_cfg.warmup_steps,
      max(stage_cfg.steps, stage_cfg.warmup_steps + 1))


def make_optimizer(stage_cfg) -> optax.GradientTransformation:
  """Adam (the paper's optimiser), after global-norm clipping (ours: one bad
  pseudo-anomaly batch must not wreck a long run)."""
  return optax.chain(optax.clip_by_global_norm(stage_cfg.clip_norm),
                     optax.adam(learning_rate(stage_cfg)))


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


# ----------------------------------------------------------- forward parts


def reconstructions(nets: Networks, params, x):
  """All N reconstructions I_R^n, [N, B, H, W, C]."""
  return nets.rcae.apply({'params': params['rcae']}, x)


def details(nets: Networks, params, recs, x, use_dpn: bool):
  """I_D^n = I_R^n + DPN residual, or I_R^n when DPN is not used."""
  if not use_dpn:
    return recs
  return nets.dpn.apply({'params': params['dpn']}, recs,
                        losses.gradient_image(x))


def crd_logits(nets: Networks, params, dets, x):
  return nets.crd.apply({'params': params['crd']},
                        dets[jnp.array(nets.crd_steps)], x)


# ------------------------------------------------------------- the steps


def _apply_grads(state: TrainState, component: str, grads, tx):
  updates, opt_state = tx.update(grads, state.opt_state,
                                 state.params[component])
  new = optax.apply_updates(state.params[component], updates)
  params = dict(state.params, **{component: new})
  return state.replace(step=state.step + 1, params=params,
                       opt_state=opt_state)


def stage1_loss(nets: Networks, rcae_params, x, depth: int,
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
    # Ours (METHOD.md): neighbouring depths should agree on normal images.
    recs = apply(x)
    loss += consistency_weight * jnp.mean(jnp.abs(recs[1:] - recs[:-1]))
  return loss


def stage1_step(state, batch, rng, *, depth, nets, tx,
                consistency_weight=0.0, crop_size=0):
  """`depth` is static: drawn on the host per step (`stage1_depth`). A
  traced depth would need lax.switch, whose convolution gradients run ~25x
  slower on XLA:CPU (measured); one compiled program per depth does not."""
  x = random_crop(to_float(batch['image']), rng, crop_size)
  loss, grads = jax.value_and_grad(
      lambda p: stage1_loss(nets, p, x, depth, consistency_weight))(
          state.params['rcae'])
  state = _apply_grads(state, 'rcae', grads, tx)
  return state, {'loss': loss, 'grad_norm': optax.global_norm(grads)}


def stage1_depth(seed: int, step: int, max_depth: int) -> int:
  """The paper's random depth per batch, uniform in [1, N], a pure function
  of (seed, step) so resumed runs draw the same depths."""
  return int(np.random.default_rng([seed, 1, step]).integers(1, max_depth + 1))


def stage2_step(state, batch, rng, *, nets, tx, crop_size=0):
  x = random_crop(to_float(batch['image']), rng, crop_size)
  recs = reconstructions(nets, state.params, x)  # Constant: not a grad arg.

  def loss_fn(dpn_params):
    params = dict(state.params, dpn=dpn_params)
    dets = details(nets, params, recs, x, use_dpn=True)
    return losses.l1_with_gradient(dets, jnp.broadcast_to(x, dets.shape))

  loss, grads = jax.value_and_grad(loss_fn)(state.params['dpn'])
  state = _apply_grads(state, 'dpn', grads, tx)
  return state, {'loss': loss, 'grad_norm': optax.global_norm(grads)}


def stage3_step(state, batch, rng, *, nets, tx, use_dpn, anomaly_cfg,
                crop_size=0):
  x = random_crop(to_float(batch['image']), rng, crop_size)
  # Pseudo-anomalies are made here, on the device, inside the jitted step.
  x_anom, mask = anomalies.synthesize(rng, x, anomaly_cfg)
  dets = details(nets, state.params, reconstructions(nets, state.params,
                                                     x_anom), x_anom, use_dpn)

  def loss_fn(crd_params):
    params = dict(state.params, crd=crd_params)
    pred = jax.nn.sigmoid(crd_logits(nets, params, dets, x_anom))
    return losses.l2_with_gradient(pred, mask)

  loss, grads = jax.value_and_grad(loss_fn)(state.params['crd'])
  state = _apply_grads(state, 'crd', grads, tx)
  return state, {'loss': loss, 'grad_norm': optax.global_norm(grads),
                 'anomalous_fraction': jnp.mean(mask)}


# Per-step health, carried from step to step on the device so that the host
# only looks at it when it logs or saves (no sync per step).
HEALTH_KEYS = ('nonfinite_steps', 'first_nonfinite_step')


def healthy() -> dict:
  return {'nonfinite_steps': jnp.zeros((), jnp.int32),
          'first_nonfinite_step': jnp.zeros((), jnp.int32)}


def guard_nonfinite(step_fn, component: str):
  """Wraps a stage step: a step whose loss or gradient is not finite leaves
  the parameters and optimizer state as they were (one NaN would otherwise
  poison every later step and checkpoint) and is counted in the health
  metrics, together with the first such step (1-based, as checkpoints).
  All on the device: a per-step host check would stall the pipeline."""

  def guarded(state, batch, rng, health, **kwargs):
    new, metrics = step_fn(state, batch, rng, **kwargs)
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(
        metrics['grad_norm'])
    keep = lambda n, o: jnp.where(finite, n, o)
    params = dict(new.params, **{component: jax.tree.map(
        keep, new.params[component], state.params[component])})
    new = new.replace(params=params, opt_state=jax.tree.map(
        keep, new.opt_state, state.opt_state))
    first_bad = (~finite) & (health['nonfinite_steps'] == 0)
    metrics = dict(
        metrics, finite=finite,
        param_norm=optax.global_norm(params[component]),
        nonfinite_steps=health['nonfinite_steps'] + (~finite).astype(
            jnp.int32),
        first_nonfinite_step=jnp.where(first_bad, state.step + 1,
                                       health['first_nonfinite_step']))
    return new, metrics

  return guarded


def make_step(config, stage: int, nets: Networks, mesh=None
              ) -> tuple[Callable, Any]:
  """The jitted train step of `stage` (1, 2, 3) and its optimizer.

  Called as step_fn(state, batch, rng, step, health=None); `health` is the
  previous step's metrics' HEALTH_KEYS (None: a fresh count). With a
  `mesh`, state/rng/health are replicated and the batch is split on the
  `data` axis; XLA inserts the gradient all-reduce."""
  stage_cfg = config.train[f'stage{stage}']
  tx = make_optimizer(stage_cfg)
  crop = config.train.crop_size
  if stage == 1:
    fn = functools.partial(stage1_step, nets=nets, tx=tx,
                           consistency_weight=config.train.consistency_weight,
                           crop_size=crop)
  elif stage == 2:
    fn = functools.partial(stage2_step, nets=nets, tx=tx, crop_size=crop)
  else:
    fn = functools.partial(stage3_step, nets=nets, tx=tx,
                           use_dpn=uses_dpn(config),
                           anomaly_cfg=config.anomalies, crop_size=crop)
  guarded = guard_nonfinite(fn, STAGES[stage - 1])
  # Depth (stage 1) is a static positional argument: one program per depth.
  positional = lambda state, batch, rng, health, depth: guarded(
      state, batch, rng, health, **({'depth': depth} if stage == 1 else {}))
  shardings = {}
  if mesh is not None:
    rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    shardings = dict(in_shardings=(rep, data, rep, rep),
                     out_shardings=(rep, rep))
  jitted = jax.jit(positional, static_argnums=4, donate_argnums=0,
                   **shardings)

  def step_fn(state, batch, rng, step, health=None):
    depth = (stage1_depth(config.seed, step, config.model.depth)
             if stage == 1 else 0)
    return jitted(state, batch, rng, healthy() if health is None else health,
                  depth)

  return step_fn, tx


def stage_batch_size(config, stage: int) -> int:
  """Global batch of a stage: its own `batch_size` if set, else the
  shared train.batch_size."""
  return config.train[f'stage{stage}'].batch_size or (
      config.train.batch_size)


def create_state(config, stage: int, nets: Networks, mesh=None
                 ) -> TrainState:
  """A fresh stage state from the config's seed, replicated on `mesh`."""
  state = fresh_state(initial_params(nets, config), stage, config)
  return place_state(state, mesh)


def place_state(state: TrainState, mesh) -> TrainState:
  """Replicates `state` over the mesh. The caller must not use `state`'s
  arrays afterwards: the (donating) step may reuse their buffers."""
  if mesh is None:
    return state
  return jax.device_put(state, sharding.replicated(mesh))


def uses_dpn(config) -> bool:
  return config.train.stage2.steps > 0


def uses_crd(config) -> bool:
  return config.train.stage3.steps > 0


def step_rng(seed: int, stage: int, step: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed),
                                               stage), step)


# -------------------------------------------------------------- the loop


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


# Files next to the Orbax step folders (Orbax ignores non-step names).
MODEL_CONFIG = 'model_config.json'
COMPLETE_MARKER = 'TRAINING_COMPLETE'
# Model fields that change speed only, never what the parameters mean.
RESUME_SAFE_FIELDS = ('model.scan_unroll', 'model.batch_decoding')


def model_signature(config) -> dict:
  """The config fields a checkpoint's parameters depend on, dotted, in
  their JSON form (tuples become lists) so that they compare with the
  saved copy."""
  sig = {f'model.{k}': v for k, v in config.model.to_dict().items()}
  sig['data.image_size'] = config.data.image_size
  # Same shapes either way, but a model trained on padded images is not
  # one trained on squashed ones.
  sig['data.resize'] = config.data.resize
  return json.loads(json.dumps(sig, default=str))


def check_resume_compatible(config, ckpt_dir: str) -> None:
  """Refuses checkpoints of another model with one clear message
  (Orbax's own shape error does not say which field changed, and a change
  such as model.recursion keeps every shape). Other fields (steps, learning
  rates, logging, checkpointing, eval.*) may change on resume.

  Fields absent from the saved copy (added to the code since) pass."""
  path = os.path.join(ckpt_dir, MODEL_CONFIG)
  if not fileio.exists(path):
    return
  saved = fileio.read_json(path)
  current = model_signature(config)
  diffs = [f'{k}: {saved[k]!r} -> {current.get(k, "<unset>")!r}'
           for k in sorted(saved)
           if k not in RESUME_SAFE_FIELDS and current.get(k, '<unset>') !=
           saved[k]]
  if diffs:
    raise validate.ConfigError(
        f'the checkpoints in {ckpt_dir} are of a different model than the '
        f'config ({"; ".join(diffs)}). Use a new --workdir, or set these '
        'fields back (steps, learning rates, logging, checkpointing and '
        'eval settings may change on resume).')


def record_model_config(config, ckpt_dir: str) -> None:
  """Saves the model fields that this workdir's checkpoints are made of.

  Called only once a checkpoint restored (or none exists): a file written
  from a mismatching config would make the right config be refused."""
  if jax.process_index() == 0:
    fileio.write_json_atomic(os.path.join(ckpt_dir, MODEL_CONFIG),
                             model_signature(config))


def training_complete(workdir: str) -> bool:
  """True once every stage has run all its steps (the marker is removed
  when a rerun with more steps trains again)."""
  return fileio.exists(os.path.join(workdir, 'checkpoints',
                                    COMPLETE_MARKER))


def set_complete(ckpt_dir: str, progress: Optional[dict]) -> None:
  """Writes the completion marker (`progress`) or removes it (None)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(ckpt_dir, COMPLETE_MARKER)
  if progress is not None:
    fileio.write_json_atomic(path, progress)
  else:
    fileio.remove(path)


def initial_params(nets: Networks, config) -> dict:
  """`init_params`, compiled without XLA:CPU's optimisations: it runs once,
  and the ~100 threefry initialisers took ~30 s to optimise on CPU
  (measured: smoke config, 2 cores) against ~5 s unoptimised. Values match
  the optimised build to float rounding (~1e-7)."""
  rng = jax.random.PRNGKey(config.seed)
  lowered = jax.jit(functools.partial(
      init_params, nets, image_size=config.data.image_size)).lower(rng)
  options = ({'xla_backend_optimization_level': 0}
             if jax.default_backend() == 'cpu' else None)
  return lowered.compile(compiler_options=options)(rng)


def train_and_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                         loader: input_pipeline.Loader,
                         on_eval: Optional[Callable] = None) -> dict:
  """Runs (or resumes) all stages; returns the final parameters.

  `on_eval(stage, global_step, params, writer)`, when given, is called every
  `config.eval.every_steps` steps of each stage and at each stage's end
  (learning curves; run.py passes evaluate.curve_point).

  Raises Preempted (exit code 143) after saving when SIGTERM arrives,
  FloatingPointError on a non-finite step (unless skip_nonfinite) without
  saving past it, and ConfigError when the workdir holds another model's
  checkpoints."""
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                  config.train.keep_checkpoints)
  writer = writers.create_writer(workdir, jax.process_index() == 0)
  try:
    if ckpt.latest_step() is not None:  # Something to resume: same model?
      check_resume_compatible(config, ckpt.directory)  # Before compiling.
    with StopRequest() as stop:
      return train_stages(config, loader, writer, ckpt, stop, on_eval)
  finally:
    ckpt.close()  # Waits for the last write, also when stopping on errors.
    writer.flush()


def train_stages(config, loader, writer, ckpt, stop: StopRequest,
                 on_eval: Optional[Callable] = None) -> dict:
  nets = build_networks(config.model)
  params = initial_params(nets, config)
  log_param_counts(params)
  progress = {'stage': 1, 'stage_step': 0, 'global_step': 0}
  restored = ckpt.restore_latest(
      lambda stage: abstract_state(params, stage, config))
  if restored is not None:
    progress, state = restored
    params = state.params
    logging.info('Resuming from checkpoint at stage %d step %d (global %d)',
                 progress['stage'], progress['stage_step'],
                 progress['global_step'])
  record_model_config(config, ckpt.directory)
  for stage in (1, 2, 3):
    steps = config.train[f'stage{stage}'].steps
    if stage < progress['stage'] or steps <= 0:
      continue
    start = progress['stage_step'] if stage == progress['stage'] else 0
    if restored is not None and stage == progress['stage'] and start:
      state = restored[1]
    else:
      state = fresh_state(params, stage, config)
    if start >= steps:
      params = state.params
      continue
    state, progress = run_stage(config, stage, nets, state, start, progress,
                                loader, writer, ckpt, stop, on_eval)
    params = state.params
  set_complete(ckpt.directory, progress)
  if stop.signalled:  # Arrived after the last step's check: all is saved.
    stop_preempted(ckpt, progress)
  return params


def fresh_state(params, stage: int, config) -> TrainState:
  tx = make_optimizer(config.train[f'stage{stage}'])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params[STAGES[stage - 1]]))


def abstract_state(params, stage: int, config) -> TrainState:
  """Shapes of a stage's state (Orbax restore target), nothing allocated."""
  return jax.eval_shape(lambda p: fresh_state(p, stage, config), params)


def run_stage(config, stage, nets, state, start, progress, loader, writer,
              ckpt, stop=None, on_eval=None):
  """Steps `start`..steps of one stage; returns (state, progress)."""
  stop = stop or StopRequest()
  steps = config.train[f'stage{stage}'].steps
  mesh = sharding.make_mesh(config.mesh.num_devices)
  batch_size = stage_batch_size(config, stage)
  sharding.check_batch(batch_size, mesh)
  step_fn, _ = make_step(config, stage, nets, mesh)
  state = place_state(state, mesh)
  batches = loader.train_batches(batch_size,
                                 seed=config.seed * 1000 + stage,
                                 start_step=start,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
  logging.info('Stage %d (%s): steps %d..%d', stage, STAGES[stage - 1],
               start, steps)
  set_complete(ckpt.directory, None)  # Training again: not complete.
  # Progress counts global steps (the x-axis of every other scalar); its
  # ETA is to the end of this stage.
  report = writers.progress_reporter(
      progress['global_step'] - start + steps, writer,
      every_steps=config.train.log_every, prefix=f'stage{stage}/')
  timer = SaveTimer(config.train.checkpoint_minutes)
  # Test / debugging knob: sleeps after each step so that tests can kill a
  # run mid-stage. Not for real runs.
  delay = config.train.get('step_delay_s', 0.0)
  global_step = progress['global_step']
  health = healthy()
  t0 = time.time()
  for step in range(start, steps):
    batch = sharding.to_global(next(batches), mesh)
    state, metrics = step_fn(state, batch, step_rng(config.seed, stage, step),
                             step, health)
    health = {k: metrics[k] for k in HEALTH_KEYS}
    global_step += 1
    done = step + 1
    report(global_step)
    if delay:
      time.sleep(delay)
    log_now = done % config.train.log_every == 0 or done == steps
    preempt = stop.requested(global_step)
    save_now = (done % config.train.checkpoint_every == 0 or done == steps or
                preempt or timer.due(log_now))
    if log_now or save_now:  # The only host syncs: never one per step.
      health = check_health(health, config, stage, done, ckpt)
    if log_now:
      write_step_scalars(writer, stage, global_step, metrics)
    every = config.eval.every_steps
    if on_eval is not None and every and (done % every == 0 or done == steps):
      # Synchronous: the next step donates these parameters' buffers.
      on_eval(stage, global_step, state.params, writer)
    if save_now:
      progress = {'stage': stage, 'stage_step': done,
                  'global_step': global_step}
      ckpt.save(global_step, state, progress)
      writer.flush()  # Scalars reach the workdir (gs:// too) with each save.
      timer.reset()
    if preempt:
      stop_preempted(ckpt, progress)
  logging.info('Stage %d done in %.1f s', stage, time.time() - t0)
  ckpt.wait()
  return state, progress


def check_health(health, config, stage: int, done: int, ckpt) -> dict:
  """Reads the non-finite count of the steps since the last check.

  Default: raises FloatingPointError, before anything past the bad step is
  saved, so the latest checkpoint is the last good state. With
  `config.train.skip_nonfinite`: those batches were skipped (the step kept
  the parameters), so warn and go on. Returns the count to carry on with."""
  h = jax.device_get(health)
  bad = int(h['nonfinite_steps'])
  if not bad:
    return health
  first = int(h['first_nonfinite_step'])
  name = STAGES[stage - 1]
  if not config.train.skip_nonfinite:
    ckpt.wait()
    raise FloatingPointError(
        f'non-finite loss or gradient in stage {stage} ({name}) at step '
        f'{first} ({bad} such step(s) up to step {done}). Nothing after it '
        f'was saved: the latest checkpoint, {ckpt.directory}/'
        f'{ckpt.latest_step()}, is from before it. A rerun resumes there and '
        'meets the same batches; config.train.skip_nonfinite=True skips '
        'such batches, a lower learning rate may avoid them.')
  logging.warning('Stage %d (%s): skipped %d batch(es) with a non-finite '
                  'loss or gradient (first at step %d, up to step %d); the '
                  'parameters were left unchanged by them.', stage, name,
                  bad, first, done)
  return healthy()


def write_step_scalars(writer, stage: int, global_step: int, metrics) -> None:
  values = jax.device_get({k: v for k, v in metrics.items()
                           if k not in HEALTH_KEYS + ('finite',)})
  # A skipped step's NaN would break the logs' plots and JSON readers.
  writer.write_scalars(global_step, {f'stage{stage}/{k}': v for k, v in
                                     values.items() if np.isfinite(v)})


def stop_preempted(ckpt, progress: dict) -> None:
  ckpt.wait()  # The checkpoint must be complete before the process ends.
  message = (f'Preempted (SIGTERM): saved a checkpoint at stage '
             f'{progress["stage"]} step {progress["stage_step"]} (global '
             f'step {progress["global_step"]}) in {ckpt.directory}; rerun '
             'the same command to resume. Exiting with code '
             f'{Preempted.EXIT_CODE}.')
  logging.warning(message)
  raise Preempted(message)


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def log_param_counts(params) -> dict[str, int]:
  counts = {k: count_params(v) for k, v in params.items()}
  logging.info('Parameters: %s (total %d)', ', '.join(
      f'{k} {v:,}' for k, v in counts.items()), sum(counts.values()))
  return counts


def load_params(config, workdir: str) -> dict:
  """The latest checkpoint's parameters (for evaluation / prediction)."""
  check_resume_compatible(config, os.path.join(workdir, 'checkpoints'))
  nets = build_networks(config.model)
  params = jax.eval_shape(functools.partial(
      init_params, nets, image_size=config.data.image_size),
                          jax.random.PRNGKey(0))
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'), 1,
                                  read_only=True)
  restored = ckpt.restore_latest(
      lambda stage: abstract_state(params, stage, config))
  ckpt.close()
  if restored is None:
    raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints: train '
                            'first (--config.mode=train)')
  return restored[1].params


def save_config(config, workdir: str, files) -> None:
  """The resolved config plus the actual data folder used."""
  fileio.makedirs(workdir)
  resolved = config.to_dict()
  resolved['resolved_data'] = {'root': files.root, 'category': files.category,
                               'num_train': len(files.train),
                               'num_test': len(files.test)}
  fileio.write_json_atomic(os.path.join(workdir, 'config.json'), resolved)
