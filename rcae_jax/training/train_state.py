"""What a training stage updates and saves: TrainState and its optimizer.

Apart from train.py because checkpoints.py needs the state's shapes to
restore parameters (evaluation, predict, export), and those must not import
the training loop.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

STAGES = ('rcae', 'dpn', 'crd')  # Component trained by stage 1, 2, 3.


@flax.struct.dataclass
class TrainState:
  """A stage's state. As saved in checkpoints and made by `fresh_state`,
  `params` holds every component and `opt_state` the stage's component's;
  inside a stage's steps (`split`) it holds that component alone, and the
  others ride apart, frozen."""
  step: jax.Array
  params: Any
  opt_state: Any


def split(full: TrainState, stage: int) -> tuple[TrainState, dict]:
  """(what stage `stage` trains, the other components' parameters)."""
  name = STAGES[stage - 1]
  frozen = {k: v for k, v in full.params.items() if k != name}
  return full.replace(params=full.params[name]), frozen


def join(state: TrainState, frozen: dict, stage: int) -> TrainState:
  """`split`'s inverse: every component's parameters in one state."""
  return state.replace(params=dict(frozen, **{STAGES[stage - 1]:
                                              state.params}))


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


def fresh_state(params, stage: int, config) -> TrainState:
  """Stage `stage`'s state at its step 0 around `params`."""
  tx = make_optimizer(config.train[f'stage{stage}'])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params[STAGES[stage - 1]]))


def abstract_state(params, stage: int, config) -> TrainState:
  """Shapes of a stage's state (Orbax restore target), nothing allocated."""
  return jax.eval_shape(lambda p: fresh_state(p, stage, config), params)
