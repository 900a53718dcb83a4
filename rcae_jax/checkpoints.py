"""Orbax checkpoints of the train state plus a JSON progress record.

Each checkpoint holds `state` (TrainState: params of every component and
the optimizer state of the stage being trained) and `progress` ({stage,
stage_step, global_step}). The progress item is read first because the
optimizer state's shape depends on the stage. Orbax's commit protocol
(write to `<step>.orbax-checkpoint-tmp`, rename to `<step>` when complete)
means a checkpoint interrupted mid-write (a crash, SIGKILL, a full disk) is
never listed as the latest: the previous complete one is restored, and the
leftover folder is deleted when the next run opens the folder for writing
(tests/test_reliability.py).

Other files in the folder (train.py's model_config.json and
TRAINING_COMPLETE) are not step names, so Orbax ignores them.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import orbax.checkpoint as ocp

from rcae_jax import fileio
from rcae_jax import workdir_lock


class Checkpointer:
  """A thin CheckpointManager wrapper: save, wait, restore the latest."""

  def __init__(self, directory: str, keep: int, read_only: bool = False):
    # Orbax's OCDBT writer refuses relative paths (`--workdir workdirs/x`);
    # gs:// URLs go to Orbax as they are.
    self.directory = fileio.absolute(directory)
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only,
            # Leftovers of interrupted writes would pile up otherwise (a
            # reader must not delete them: a writer may be at work).
            cleanup_tmp_directories=not read_only),
        item_names=('state', 'progress'))

  def save(self, step: int, state: Any, progress: dict) -> None:
    # A run whose workdir lock was taken over must not write into the new
    # holder's checkpoints.
    workdir_lock.check_held(self.directory)
    # Async: training continues while the previous write finishes.
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        progress=ocp.args.JsonSave(progress)))

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def restore_latest(self, abstract_for_stage: Callable[[int], Any]):
    """(progress, state) of the latest checkpoint, or None if there is none.

    `abstract_for_stage(stage)` gives the restore target's shapes.
    """
    step = self._mngr.latest_step()
    if step is None:
      return None
    progress = self._mngr.restore(step, args=ocp.args.Composite(
        progress=ocp.args.JsonRestore())).progress
    target = abstract_for_stage(progress['stage'])
    try:
      state = self._mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target))).state
    except (ValueError, KeyError) as e:
      raise ValueError(
          f'checkpoint {self.directory}/{step} does not match the model in '
          f'the config (different model shape?): {e}') from e
    logging.info('Restored checkpoint %s/%d', self.directory, step)
    return progress, state

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
