"""A trained workdir's parameters, for every mode that scores images.

Here, not in common/checkpoints.py, because it needs the model's shapes:
common/ sits below model/ and imports none of it."""

from __future__ import annotations

import os


from rcae_jax.common import checkpoints
from rcae_jax.common import errors
from rcae_jax.model import inference


def load_params(config, workdir: str) -> dict:
  """The latest checkpoint's parameters (for evaluation / prediction), as
  host arrays: the caller places them on its device once (evaluate,
  predict, benchmark), since host arrays handed to a jitted call are copied
  to the device again at every call."""
  checkpoints.check_resume_compatible(config, os.path.join(workdir, 'checkpoints'))
  params = inference.abstract_params(
      inference.build_networks(config.model), config.data.image_size)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'), 1,
                      read_only=True)
  # The parameters alone: inference neither reads the optimizer's state
  # nor needs optax to know its shape.
  restored = ckpt.restore_latest(lambda _: {'params': params}, partial=True,
                                 reconcile=same_shapes_or_refuse)
  ckpt.close()
  if restored is None:
    raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints: train '
                            'first (--config.mode=train)')
  return restored[1]['params']


def same_shapes_or_refuse(progress, target, saved_shapes):
  """Checkpoints.restore_latest's `reconcile` for inference: every
  network's saved shapes must be the config's. model_config.json catches
  a changed field, but not one added to the code since the workdir was
  trained whose default in this config builds other shapes (e.g.
  configs/cpu_real.py's CRD reading the residual): without this check
  the restore succeeds and the first forward pass fails deep in Flax."""
  saved = saved_shapes()
  if saved is None:  # Unreadable: restore as before, Orbax decides.
    return target
  wrong = checkpoints.networks_of_other_shapes(saved['params'],
                                              target['params'])
  if wrong:
    raise errors.ConfigError(
        f'the checkpoint (stage {progress["stage"]} step '
        f'{progress["stage_step"]}) holds {", ".join(n.upper() for n in wrong)}'
        ' of other parameter shapes than the config builds: it was trained '
        'with other model fields (a field added since may default otherwise '
        'in this config). Leave out --config to use the workdir\'s own '
        'config.json, or set the model fields it was trained with')
  return target
