"""Non-finite steps: kept out of the parameters, counted, then reported.

One NaN in a loss or gradient would otherwise poison every later step and
checkpoint. The jitted step itself keeps the previous parameters
(`keep_finite`)
and counts such steps on the device; the host reads the count only at log
and save points (`check`), so there is no host sync per step.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import optax

from rcae_jax.training import train_state

# Per-step health, carried from step to step on the device so that the host
# only looks at it when it logs or saves (no sync per step).
HEALTH_KEYS = ('nonfinite_steps', 'first_nonfinite_step')


def healthy() -> dict:
  return {'nonfinite_steps': jnp.zeros((), jnp.int32),
          'first_nonfinite_step': jnp.zeros((), jnp.int32)}


def keep_finite(state, new, metrics: dict, health: dict):
  """(state, metrics) after a step from `state` to `new`: `new`, unless
  the step's loss or gradient is not finite; then `state`'s parameters
  and optimizer state are kept (one NaN would otherwise poison every later
  step and checkpoint), and the step is counted in the health metrics
  with the first such step (1-based, as checkpoints). Traced inside the
  jitted step: a per-step host check would stall the pipeline."""
  finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
  keep = lambda n, o: jnp.where(finite, n, o)
  new = new.replace(
      params=jax.tree.map(keep, new.params, state.params),
      opt_state=jax.tree.map(keep, new.opt_state, state.opt_state))
  first_bad = (~finite) & (health['nonfinite_steps'] == 0)
  metrics = dict(
      metrics, finite=finite,
      param_norm=optax.tree.norm(new.params),
      nonfinite_steps=health['nonfinite_steps'] + (~finite).astype(jnp.int32),
      first_nonfinite_step=jnp.where(first_bad, state.step + 1,
                                     health['first_nonfinite_step']))
  return new, metrics


def check(health, config, stage: int, done: int, ckpt) -> dict | None:
  """Reads the non-finite count of the steps since the last check.

  Default: raises FloatingPointError, before anything past the bad step is
  saved, so the latest checkpoint is the last good state. With
  `config.train.skip_nonfinite`: those batches were skipped (the step kept
  the parameters), so warn and go on. Returns the count to carry on with
  (None: a fresh one)."""
  h = jax.device_get(health)
  bad = int(h['nonfinite_steps'])
  if not bad:
    return health
  first = int(h['first_nonfinite_step'])
  name = train_state.STAGES[stage - 1]
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
  return None  # A fresh count: train.make_step's step_fn makes it.
