"""The training steps: one `train_step` for every stage, and the table of
the stages' losses.

Stage 1 trains RcAE (E, D) on normal images with a random depth per batch;
stage 2 trains DPN with RcAE frozen; stage 3 trains CRD on pseudo-anomalies
with RcAE and DPN frozen. "Frozen" is structural: a stage's step receives
the networks it does not train as a separate argument, never donated and
never returned, and its loss is differentiated with respect to its own
component only, so no gradient or optimizer state exists for the others.

Every step is a pure function of (state, batch, rng); the batch order and
the rng are pure functions of (seed, stage, step), so a resumed run sees the
same data and randomness as an uninterrupted one (bit-identical on CPU,
tests/test_reliability.py). A non-finite loss or gradient never reaches
the parameters: the step keeps the old ones and counts it (nonfinite.py).

The loop that takes these steps, with checkpoints, resume and preemption,
is loop.py; the state and its optimizer are train_state.py.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rcae_jax.common import programs
from rcae_jax.common import sharding
from rcae_jax.data import geometry
from rcae_jax.model import inference
from rcae_jax.model import losses
from rcae_jax.training import anomalies
from rcae_jax.training import nonfinite
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


# ------------------------------------------------------------ the losses
# Each is loss(params, frozen, x, rng, **settings) -> (loss, extra
# metrics): `params` the stage's own network, `frozen` the others.


def stage1_loss(params, frozen, x, rng, *, nets: inference.Networks,
                depth: int, consistency_weight: float = 0.0):
  """L1 + gradient L1 of I_R^n for the drawn depth n (the paper)."""
  del frozen, rng  # RcAE comes first: it needs no other network.
  apply = functools.partial(nets.rcae.apply, {'params': params})
  if nets.rcae.recursion == 'iterative':
    rec = apply(x)[depth - 1]  # One scan yields every step.
  else:
    rec = apply(x, depth=depth)  # Only n encoder and n decoder steps run.
  loss = losses.l1_with_gradient(rec, x)
  if consistency_weight:
    # Ours (docs/method.md): neighbouring depths should agree on normal images.
    recs = apply(x)
    loss += consistency_weight * jnp.mean(jnp.abs(recs[1:] - recs[:-1]))
  return loss, {}


def stage2_loss(params, frozen, x, rng, *, nets: inference.Networks):
  """L1 + gradient L1 of every I_D^n against I (the paper)."""
  del rng
  recs = inference.reconstructions(nets, frozen, x)
  dets = inference.details(nets, {'dpn': params}, recs, x, use_dpn=True)
  return losses.l1_with_gradient(dets, jnp.broadcast_to(x, dets.shape)), {}


def stage3_loss(params, frozen, x, rng, *, nets: inference.Networks,
                use_dpn: bool, anomaly_cfg, input_dropout: float = 0.0,
                loss: str = 'l2'):
  """`train.stage3.loss` of CRD's map on pseudo-anomalies, which are made
  here, on the device, inside the jitted step."""
  x_anom, mask = anomalies.synthesize(rng, x, anomaly_cfg)
  recs = inference.reconstructions(nets, frozen, x_anom)
  dets = inference.details(nets, frozen, recs, x_anom, use_dpn)
  keep = input_keep(rng, x.shape[0], input_dropout)
  logits = inference.crd_logits(nets, {'crd': params}, dets, x_anom, keep)
  return (losses.crd_loss(logits, mask, loss),
          {'anomalous_fraction': jnp.mean(mask)})


# stage: (the network it trains, its loss).
STAGES = {1: ('rcae', stage1_loss), 2: ('dpn', stage2_loss),
          3: ('crd', stage3_loss)}


def loss_settings(config, stage: int) -> dict:
  """The config's settings of `stage`'s loss (besides the networks)."""
  if stage == 1:
    return {'consistency_weight': config.train.consistency_weight}
  if stage == 2:
    return {}
  stage3 = config.train.stage3
  return {'use_dpn': inference.uses_dpn(config),
          'anomaly_cfg': config.anomalies,
          'input_dropout': stage3.input_dropout, 'loss': stage3.loss}


def stage1_depth(seed: int, step: int, max_depth: int) -> int:
  """The paper's random depth per batch, uniform in [1, N], a pure function
  of (seed, step) so resumed runs draw the same depths."""
  return int(np.random.default_rng([seed, 1, step]).integers(1, max_depth + 1))


def input_keep(rng: jax.Array, batch: int, dropout: float):
  """Stage 3's input dropout: float [B], 0 where CRD's image channels are
  zeroed (probability `dropout`, per sample), or None when off (0)."""
  if not dropout:
    return None
  # A stream of its own, so the other draws of the step stay as they were.
  u = jax.random.uniform(jax.random.fold_in(rng, 0x64726f70), (batch,))
  return (u >= dropout).astype(jnp.float32)


# -------------------------------------------------------------- the step


def train_step(state, frozen, batch, rng, health, *, loss_fn: Callable, tx,
               crop_size: int = 0):
  """One step of any stage: `loss_fn(params, frozen, x, rng)` differentiated
  with respect to the stage's own `state.params`, then Adam. A step whose
  loss or gradient is not finite leaves the parameters and optimizer
  state as they were and is counted in the carried `health`
  (nonfinite.HEALTH_KEYS): all on the device, no host sync per step."""
  x = random_crop(inference.to_float(batch['image']), rng, crop_size)
  (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, frozen, x, rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new = state.replace(step=state.step + 1,
                      params=optax.apply_updates(state.params, updates),
                      opt_state=opt_state)
  metrics = dict(extra, loss=loss, grad_norm=optax.tree.norm(grads))
  return nonfinite.keep_finite(state, new, metrics, health)


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
  tx = train_state.make_optimizer(config.train[f'stage{stage}'])
  loss = functools.partial(STAGES[stage][1], nets=nets,
                           **loss_settings(config, stage))

  # Depth (stage 1) is a static positional argument: one program per depth.
  # A traced depth would need lax.switch, whose convolution gradients run
  # ~25x slower on XLA:CPU (measured); one compiled program per depth does
  # not. rng None: the step's key is derived from `step` inside the
  # program, the same key as step_rng's (measured: ~11 ms a step when
  # built on the host with eager ops on the loaded 2-core CPU, ~0.01 ms
  # jitted).
  def positional(state, frozen, batch, rng, health, step, depth):
    if rng is None:
      rng = step_rng(config.seed, stage, step)
    loss_fn = functools.partial(loss, depth=depth) if stage == 1 else loss
    return train_step(state, frozen, batch, rng, health, loss_fn=loss_fn,
                      tx=tx, crop_size=config.train.crop_size)

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


# ------------------------------------------------------- initial parameters


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
  return jax.device_get(programs.run_unoptimised(functools.partial(
      inference.init_params, nets, image_size=image_hw),
                                        jax.random.PRNGKey(seed)))
