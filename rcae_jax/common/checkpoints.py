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

A complete checkpoint can still be damaged later (a lost disk, a
half-synced bucket, a truncated copy). `restore_latest` then says so,
falls back to the newest checkpoint that restores and moves the damaged
newer ones aside (`<step>.damaged`; deleted on object stores, which have
no folder rename), so that the run goes on and saves its next steps again;
the run is deterministic from the restored step, so nothing is lost but
the time to recompute. When no checkpoint restores, it raises
CheckpointError naming every path it tried: never a silent start from
scratch.

A save that fails (a full disk, a quota) raises CheckpointWriteError,
which names the newest complete checkpoint: the failed one never became a
step folder, so that one is intact and a rerun resumes from it.

Beside the step folders (not step names, so Orbax ignores them):
`model_config.json`, the model fields the parameters were made with (a
resume with another model is refused, naming the fields), and
`TRAINING_COMPLETE` once every stage has run its steps. `load_params`
gives the latest parameters to evaluation, predict and export: it restores
`params` alone (an Orbax partial restore), so inference never builds the
optimizer's state and never imports optax.
"""

from __future__ import annotations

import logging
import os
import json
from typing import Any, Callable, Optional

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from rcae_jax.common import errors
from rcae_jax.common import fileio
from rcae_jax.common import workdir_lock

DAMAGED_SUFFIX = '.damaged'


class CheckpointError(RuntimeError):
  """No checkpoint of the folder can be restored; the message lists them."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written; says which one is intact."""


def complete_steps(directory: str) -> list[int]:
  """Steps whose folder is in place (Orbax renames a step folder into
  place only once it is completely written), newest first."""
  try:
    names = fileio.listdir(directory)
  except OSError:
    return []
  return sorted((int(n) for n in names if n.isdigit()), reverse=True)


def _one_line(error: BaseException, limit: int = 300) -> str:
  text = ' '.join(f'{type(error).__name__}: {error}'.split())
  return text if len(text) <= limit else text[:limit] + '...'


class Checkpointer:
  """A thin CheckpointManager wrapper: save, wait, restore the latest."""

  def __init__(self, directory: str, keep: int, read_only: bool = False):
    self._read_only = read_only
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
    # Async: training continues while the previous write finishes (its
    # errors surface here, at the next save, in wait() or in close()).
    saved = self._storage_errors_named(step, self._mngr.save, step,
                                       args=ocp.args.Composite(
                                           state=ocp.args.StandardSave(state),
                                           progress=ocp.args.JsonSave(
                                               progress)))
    if not saved:  # Orbax skips steps at or below its latest: say so.
      logging.warning('Checkpoint step %d in %s was not saved: Orbax holds a '
                      'step at or after it (%s).', step, self.directory,
                      self._mngr.latest_step())

  def wait(self) -> None:
    self._storage_errors_named(None, self._mngr.wait_until_finished)

  def _storage_errors_named(self, step: Optional[int], fn, *args, **kwargs):
    """fn(*args, **kwargs), with storage errors (OSError; tensorstore
    reports a full disk as ValueError text) raised as CheckpointWriteError;
    any other error as it is."""
    try:
      return fn(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      if not (isinstance(e, OSError) or fileio.disk_full(e)):
        raise
      raise self._write_error(step, e) from e

  def _write_error(self, step: Optional[int],
                   error: BaseException) -> CheckpointWriteError:
    intact = complete_steps(self.directory)
    where = f' (step {step} or the one before it)' if step else ''
    full = ('The disk is full: free space or point --workdir elsewhere. '
            if fileio.disk_full(error) else '')
    kept = (f'The newest complete checkpoint, {self.directory}/{intact[0]}, '
            'is intact and a rerun of the same command resumes from it.'
            if intact else 'No complete checkpoint exists yet: a rerun '
            'starts from the beginning.')
    return CheckpointWriteError(
        f'could not write a checkpoint in {self.directory}{where}: '
        f'{_one_line(error)}. {full}{kept}')

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def progress_of(self, step: int) -> dict:
    """The progress record ({stage, stage_step, global_step}) of a step."""
    return self._mngr.restore(step, args=ocp.args.Composite(
        progress=ocp.args.JsonRestore())).progress

  def latest_progress(self) -> Optional[dict]:
    """The newest checkpoint's progress, or None when there is none or it
    cannot be read (restore_latest then decides what to do)."""
    step = self.latest_step()
    if step is None:
      return None
    try:
      return self.progress_of(step)
    except Exception:  # pylint: disable=broad-except
      return None

  def saved_state_shapes(self, step: int):
    """The saved state's tree with each array's metadata (`.shape`,
    `.dtype`), read without restoring any array. (The manager's own
    item_metadata answers None for an item it has not handled yet in this
    process, so the handler reads the step's folder.)"""
    path = ocp.path.step.build_step_path(
        self.directory, ocp.path.step.standard_name_format(), step)
    return ocp.StandardCheckpointHandler().metadata(path / 'state').tree

  def _saved_shapes_or_none(self, step: int):
    """saved_state_shapes, or None (with a warning) if they cannot be
    read: the restore then goes on as if nothing were to be reconciled."""
    try:
      return self.saved_state_shapes(step)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Could not read the shapes saved in %s/%d (%s).',
                      self.directory, step, _one_line(e))
      return None

  def _restore(self, step: int, abstract_for_stage: Callable[[int], Any],
               partial: bool, reconcile: Optional[Callable] = None):
    progress = self.progress_of(step)
    target = abstract_for_stage(progress['stage'])
    if reconcile is not None:
      target = reconcile(progress, target,
                         lambda: self._saved_shapes_or_none(step))
    if partial:
      # Only the fields in `target`, as host numpy arrays.
      restore = ocp.args.PyTreeRestore(
          item=target, partial_restore=True,
          restore_args=jax.tree.map(
              lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target))
    else:
      restore = ocp.args.StandardRestore(target)
    state = self._mngr.restore(step, args=ocp.args.Composite(state=restore))
    return progress, state.state

  def restore_latest(self, abstract_for_stage: Callable[[int], Any],
                     partial: bool = False,
                     reconcile: Optional[Callable] = None):
    """(progress, state) of the newest checkpoint that restores, or None if
    there is no checkpoint. Damaged newer ones are reported and, unless
    read-only, moved aside; CheckpointError if none restores.

    `abstract_for_stage(stage)` gives the restore target's shapes; with
    `partial`, a dict of some of the saved state's fields (e.g. only
    'params'), restored alone as numpy arrays. `reconcile(progress, target,
    saved_shapes)`, when given, may adapt the target to the saved shapes
    (`saved_shapes()` reads them; None if it cannot); a ConfigError it
    raises is raised as it is, never taken for damage.
    """
    listed = sorted(self._mngr.all_steps(), reverse=True)
    # Step folders Orbax does not list (on object stores it wants their
    # commit marker, which a half-synced copy may lack) are damaged too.
    failed = [(s, FileNotFoundError('not a finished Orbax checkpoint'))
              for s in complete_steps(self.directory) if s not in listed]
    for step, _ in failed:
      logging.warning('Checkpoint folder %s/%d is not a finished checkpoint; '
                      'ignored.', self.directory, step)
    for step in listed:
      try:
        progress, state = self._restore(step, abstract_for_stage, partial,
                                        reconcile)
      except errors.ConfigError:
        raise  # The config does not fit: no reason to try older steps.
      except Exception as e:  # pylint: disable=broad-except
        # Orbax and tensorstore report a missing or truncated file as
        # ValueError, KeyError, OSError or a JSON error, depending on the
        # file: each means "this one cannot be used", so try the previous.
        failed.append((step, e))
        logging.warning('Checkpoint %s/%d cannot be restored (%s); trying '
                        'the one before it.', self.directory, step,
                        _one_line(e))
        continue
      self._agree_on(step)
      newer = [s for s, _ in failed if s > step]
      if newer:
        logging.warning('Fell back to checkpoint %s/%d: the newer %s could '
                        'not be restored.', self.directory, step,
                        ', '.join(f'{self.directory}/{s}' for s in newer))
        self._set_aside(newer)
      logging.info('Restored checkpoint %s/%d', self.directory, step)
      return progress, state
    if not failed:
      return None
    tried = '; '.join(f'{self.directory}/{s}: {_one_line(e, 200)}'
                      for s, e in failed)
    raise CheckpointError(
        f'no checkpoint in {self.directory} can be restored (tried {tried}). '
        'Nothing was started from scratch: if the model config changed, set '
        'it back; otherwise restore the folder from a copy, or move it aside '
        'to train from the beginning.')

  def _agree_on(self, step: int) -> None:
    """Every process must resume from the same step; a read error on one
    host only would otherwise split the run."""
    if jax.process_count() == 1:
      return
    chosen = int(multihost_utils.broadcast_one_to_all(np.int64(step)))
    if chosen != step:
      raise CheckpointError(
          f'process {jax.process_index()} restored {self.directory}/{step} '
          f'but process 0 restored step {chosen}: their storage differs')

  def _set_aside(self, steps: list[int]) -> None:
    """Moves damaged steps out of Orbax's sight, so that the resumed run
    can save those step numbers again (Orbax skips a step at or below its
    latest). Local: renamed to `<step>.damaged` for inspection; object
    stores have no folder rename, so there they are deleted."""
    if self._read_only:
      return
    if jax.process_index() == 0:
      for step in steps:
        path = os.path.join(self.directory, str(step))
        if fileio.is_remote(path):
          try:
            self._mngr.delete(step)
            logging.warning('Deleted the damaged checkpoint %s', path)
          except Exception as e:  # pylint: disable=broad-except
            logging.warning('Could not delete the damaged checkpoint %s (%s)'
                            '; delete it by hand if a later save of this '
                            'step fails.', path, _one_line(e))
          continue
        target, n = path + DAMAGED_SUFFIX, 1
        while os.path.exists(target):
          target, n = f'{path}{DAMAGED_SUFFIX}.{n}', n + 1
        os.rename(path, target)
        logging.warning('Moved the damaged checkpoint %s to %s', path, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('rcae_jax_checkpoints_set_aside')
    self._mngr.reload()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      # Orbax raises a failed background write again here.
      self._storage_errors_named(None, self._mngr.close)


# ------------------------------------------- resume signature and markers

# Files next to the Orbax step folders (Orbax ignores non-step names).
MODEL_CONFIG = 'model_config.json'
COMPLETE_MARKER = 'TRAINING_COMPLETE'
# Model fields that change speed only, never what the parameters mean.
RESUME_SAFE_FIELDS = ('model.scan_unroll', 'model.batch_decoding')
# Model fields that concern one network alone, by the stage that trains it
# (DPN: 2, CRD: 3); every other model field concerns RcAE, and through it
# everything. Until that stage begins the network is only initialised, so
# a resume (a fork of a workdir) may change them: the network is then
# re-initialised if its shapes changed (training/train.py).
NETWORK_FIELDS = {
    2: ('model.dpn_width', 'model.dpn_guide', 'model.dpn_guide_sigma'),
    3: ('model.crd_width', 'model.crd_normalize', 'model.crd_steps',
        'model.crd_residual', 'model.crd_head'),
}


def stage_begun(progress: Optional[dict], stage: int) -> bool:
  """Whether the checkpoint with `progress` has trained `stage` at all
  (None: no checkpoint, nothing begun)."""
  if progress is None:
    return False
  return progress['stage'] > stage or (progress['stage'] == stage and
                                       progress['stage_step'] > 0)


def untrained_fields(progress: Optional[dict]) -> tuple[str, ...]:
  """NETWORK_FIELDS of the networks whose stage `progress` has not begun."""
  return tuple(f for stage, fields in NETWORK_FIELDS.items()
               if not stage_begun(progress, stage) for f in fields)


def model_signature(config) -> dict:
  """The config fields a checkpoint's parameters depend on, dotted, in
  their JSON form (tuples become lists) so that they compare with the
  saved copy."""
  sig = {f'model.{k}': v for k, v in config.model.to_dict().items()}
  sig['data.image_size'] = config.data.image_size
  # Same shapes either way, but a model trained on padded images is not
  # one trained on squashed ones.
  sig['data.resize'] = config.data.resize
  # The scale a model was trained at (image_size / tile_size): applied at
  # another scale, its maps would mean nothing. (tile_overlap and
  # tile_sampling change how tiles are drawn, not what the model is.)
  sig['data.tile_size'] = config.data.tile_size
  return json.loads(json.dumps(sig, default=str))


def _shapes(tree) -> dict:
  """{path: shape} of a tree of arrays, ShapeDtypeStructs or Orbax array
  metadata (all have .shape)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): tuple(leaf.shape)
          for path, leaf in leaves}


def networks_of_other_shapes(saved: dict, target: dict) -> list[str]:
  """The networks ({name: parameters}) in both `saved` (a checkpoint's
  shapes) and `target` whose parameter shapes differ."""
  return [name for name, tree in target.items()
          if name in saved and _shapes(saved[name]) != _shapes(tree)]


def check_resume_compatible(config, ckpt_dir: str,
                            progress: Optional[dict] = None) -> None:
  """Refuses checkpoints of another model with one clear message
  (Orbax's own shape error does not say which field changed, and a change
  such as model.recursion keeps every shape). Other fields (steps, learning
  rates, logging, checkpointing, eval.*) may change on resume.

  Fields absent from the saved copy (added to the code since) pass. With
  the checkpoint's `progress` (training resumes), the fields of a network
  whose stage has not begun pass too (NETWORK_FIELDS); without it
  (evaluation), every field must match."""
  path = os.path.join(ckpt_dir, MODEL_CONFIG)
  if not fileio.exists(path):
    return
  saved = fileio.read_json(path)
  current = model_signature(config)
  free = RESUME_SAFE_FIELDS + (untrained_fields(progress)
                               if progress is not None else ())
  diffs = [f'{k}: {saved[k]!r} -> {current.get(k, "<unset>")!r}'
           for k in sorted(saved)
           if k not in free and current.get(k, '<unset>') != saved[k]]
  if diffs:
    raise errors.ConfigError(
        f'the checkpoints in {ckpt_dir} are of a different model than the '
        f'config ({"; ".join(diffs)}). Use a new --workdir, or set these '
        'fields back (steps, learning rates, logging, checkpointing and '
        'eval settings may change on resume, and a network\'s own fields '
        '(model.dpn_*, model.crd_*) until its stage begins).')


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
