"""Training: three independent stages, jitted steps, Orbax checkpoints.

Stage 1 trains RcAE (E, D) on normal images with a random depth per batch;
stage 2 trains DPN with RcAE frozen; stage 3 trains CRD on pseudo-anomalies
with RcAE and DPN frozen. "Frozen" is structural: each stage's loss is a
function of its own component's parameters only, so no gradient is ever
computed for the others.

Every step is a pure function of (state, batch, rng); the batch order and
the rng are pure functions of (seed, stage, step), so a resumed run sees the
same data and randomness as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rcae_jax import anomalies
from rcae_jax import checkpoints
from rcae_jax import input_pipeline
from rcae_jax import losses
from rcae_jax import models
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


def init_params(nets: Networks, rng: jax.Array, image_size: int) -> dict:
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  k1, k2, k3 = jax.random.split(rng, 3)
  rcae = nets.rcae.init(k1, x)['params']
  recs = jnp.zeros((nets.rcae.depth, *x.shape), jnp.float32)
  dpn = nets.dpn.init(k2, recs, losses.gradient_image(x))['params']
  crd = nets.crd.init(k3, recs[jnp.array(nets.crd_steps)], x)['params']
  return {'rcae': rcae, 'dpn': dpn, 'crd': crd}


def make_optimizer(stage_cfg) -> optax.GradientTransformation:
  """Adam (the paper's optimiser), after global-norm clipping (ours: one bad
  pseudo-anomaly batch must not wreck a long run)."""
  return optax.chain(optax.clip_by_global_norm(stage_cfg.get('clip_norm', 1.0)),
                     optax.adam(stage_cfg.learning_rate))


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
                consistency_weight=0.0):
  """`depth` is static: drawn on the host per step (`stage1_depth`). A
  traced depth would need lax.switch, whose convolution gradients run ~25x
  slower on XLA:CPU (measured); one compiled program per depth does not."""
  del rng
  x = to_float(batch['image'])
  loss, grads = jax.value_and_grad(
      lambda p: stage1_loss(nets, p, x, depth, consistency_weight))(
          state.params['rcae'])
  state = _apply_grads(state, 'rcae', grads, tx)
  return state, {'loss': loss, 'grad_norm': optax.global_norm(grads)}


def stage1_depth(seed: int, step: int, max_depth: int) -> int:
  """The paper's random depth per batch, uniform in [1, N], a pure function
  of (seed, step) so resumed runs draw the same depths."""
  return int(np.random.default_rng([seed, 1, step]).integers(1, max_depth + 1))


def stage2_step(state, batch, rng, *, nets, tx):
  del rng
  x = to_float(batch['image'])
  recs = reconstructions(nets, state.params, x)  # Constant: not a grad arg.

  def loss_fn(dpn_params):
    params = dict(state.params, dpn=dpn_params)
    dets = details(nets, params, recs, x, use_dpn=True)
    return losses.l1_with_gradient(dets, jnp.broadcast_to(x, dets.shape))

  loss, grads = jax.value_and_grad(loss_fn)(state.params['dpn'])
  state = _apply_grads(state, 'dpn', grads, tx)
  return state, {'loss': loss, 'grad_norm': optax.global_norm(grads)}


def stage3_step(state, batch, rng, *, nets, tx, use_dpn, anomaly_cfg):
  x = to_float(batch['image'])
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


def make_step(config, stage: int, nets: Networks) -> tuple[Callable, Any]:
  """The jitted train step of `stage` (1, 2, 3) and its optimizer."""
  stage_cfg = config.train[f'stage{stage}']
  tx = make_optimizer(stage_cfg)
  if stage == 1:
    fn = functools.partial(stage1_step, nets=nets, tx=tx,
                           consistency_weight=config.train.consistency_weight)
  elif stage == 2:
    fn = functools.partial(stage2_step, nets=nets, tx=tx)
  else:
    fn = functools.partial(stage3_step, nets=nets, tx=tx,
                           use_dpn=uses_dpn(config),
                           anomaly_cfg=config.anomalies)
  if stage == 1:
    jitted = jax.jit(fn, static_argnames='depth', donate_argnums=0)
    return (lambda state, batch, rng, step: jitted(
        state, batch, rng,
        depth=stage1_depth(config.seed, step, config.model.depth))), tx
  jitted = jax.jit(fn, donate_argnums=0)
  return (lambda state, batch, rng, step: jitted(state, batch, rng)), tx


def uses_dpn(config) -> bool:
  return config.train.stage2.steps > 0


def uses_crd(config) -> bool:
  return config.train.stage3.steps > 0


def step_rng(seed: int, stage: int, step: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed),
                                               stage), step)


# -------------------------------------------------------------- the loop


def train_and_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                         loader: input_pipeline.Loader) -> dict:
  """Runs (or resumes) all stages; returns the final parameters."""
  nets = build_networks(config.model)
  writer = writers.create_writer(workdir, jax.process_index() == 0)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                  config.train.keep_checkpoints)
  params = jax.jit(functools.partial(init_params, nets,
                                     image_size=config.data.image_size))(
                                         jax.random.PRNGKey(config.seed))
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
                                loader, writer, ckpt)
    params = state.params
  ckpt.close()
  writer.flush()
  return params


def fresh_state(params, stage: int, config) -> TrainState:
  tx = make_optimizer(config.train[f'stage{stage}'])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params[STAGES[stage - 1]]))


def abstract_state(params, stage: int, config) -> TrainState:
  """Shapes of a stage's state (Orbax restore target), nothing allocated."""
  return jax.eval_shape(lambda p: fresh_state(p, stage, config), params)


def run_stage(config, stage, nets, state, start, progress, loader, writer,
              ckpt):
  stage_cfg = config.train[f'stage{stage}']
  steps = stage_cfg.steps
  step_fn, _ = make_step(config, stage, nets)
  batches = loader.train_batches(config.train.batch_size,
                                 seed=config.seed * 1000 + stage,
                                 start_step=start,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
  name = STAGES[stage - 1]
  logging.info('Stage %d (%s): steps %d..%d', stage, name, start, steps)
  report = writers.progress_reporter(steps, writer,
                                     every_steps=config.train.log_every,
                                     prefix=f'stage{stage}/')
  global_step = progress['global_step']
  t0 = time.time()
  metrics = None
  for step in range(start, steps):
    batch = next(batches)
    state, metrics = step_fn(state, batch, step_rng(config.seed, stage, step),
                             step)
    global_step += 1
    done = step + 1
    report(done)
    if done % config.train.log_every == 0 or done == steps:
      scalars = {f'stage{stage}/{k}': v for k, v in
                 jax.device_get(metrics).items()}
      loss = float(scalars[f'stage{stage}/loss'])
      if not np.isfinite(loss):
        raise FloatingPointError(
            f'non-finite loss {loss} in stage {stage} ({name}) at step '
            f'{done}; the last good checkpoint is kept in '
            f'{ckpt.directory}')
      writer.write_scalars(global_step, scalars)
    if done % config.train.checkpoint_every == 0 or done == steps:
      progress = {'stage': stage, 'stage_step': done,
                  'global_step': global_step}
      ckpt.save(global_step, state, progress)
  logging.info('Stage %d done in %.1f s', stage, time.time() - t0)
  ckpt.wait()
  return state, progress


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def log_param_counts(params) -> dict[str, int]:
  counts = {k: count_params(v) for k, v in params.items()}
  logging.info('Parameters: %s (total %d)', ', '.join(
      f'{k} {v:,}' for k, v in counts.items()), sum(counts.values()))
  return counts


def load_params(config, workdir: str) -> dict:
  """The latest checkpoint's parameters (for evaluation / prediction)."""
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
  os.makedirs(workdir, exist_ok=True)
  resolved = config.to_dict()
  resolved['resolved_data'] = {'root': files.root, 'category': files.category,
                               'num_train': len(files.train),
                               'num_test': len(files.test)}
  path = os.path.join(workdir, 'config.json')
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(resolved, f, indent=2, default=str)
  os.replace(tmp, path)
