"""A trained workdir's parameters, for every mode that scores images.

Here, not in common/checkpoints.py, because it needs the model's shapes:
common/ sits below model/ and imports none of it."""

from __future__ import annotations

import os


from rcae_jax.common import checkpoints
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
  restored = ckpt.restore_latest(lambda _: {'params': params}, partial=True)
  ckpt.close()
  if restored is None:
    raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints: train '
                            'first (--config.mode=train)')
  return restored[1]['params']
