"""What `main` does, as importable functions (tests call them directly)."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os

import jax
import numpy as np

from rcae_jax import validate
from rcae_jax.common import checkpoints
from rcae_jax.common import fileio
from rcae_jax.common import workdir_lock
from rcae_jax.common import writers
from rcae_jax.data import check
from rcae_jax.data import folder
from rcae_jax.data import geometry
from rcae_jax.data import input_pipeline
from rcae_jax.data import sources
from rcae_jax.evaluation import evaluate
from rcae_jax.evaluation import report as report_lib
from rcae_jax.evaluation import scoring_choice
from rcae_jax.evaluation import thresholds
from rcae_jax.evaluation import curve_hook
from rcae_jax.model import flops
from rcae_jax.serving import params as params_lib
from rcae_jax.training import loop
from rcae_jax.training import train


# Modes that load a trained workdir and summarise its test set.
REPORT_MODES = ('depth_report', 'fusion_report', 'shortcut_report')
# Modes that need a trained workdir (its checkpoints).
TRAINED_MODES = ('evaluate', 'predict', 'export') + REPORT_MODES


class WorkdirError(ValueError):
  """--workdir is not what the mode needs (e.g. predict on an untrained
  workdir); the message says what to run first."""


def check_workdir(config, workdir: str) -> None:
  """One line naming what to do when `config.mode` needs a trained
  workdir and `workdir` is not one (before anything is compiled)."""
  if config.mode not in TRAINED_MODES:
    return
  if not checkpoints.complete_steps(os.path.join(workdir, 'checkpoints')):
    raise WorkdirError(
        f"config.mode='{config.mode}' needs a trained workdir, and {workdir} "
        'has no checkpoint: train it first (--config.mode=train, the '
        'default), or give the --workdir of a trained run')
  if (config.mode in ('predict', 'export') and
      not fileio.exists(os.path.join(workdir, 'thresholds.json'))):
    raise WorkdirError(
        f'{workdir} has checkpoints but no thresholds.json (training did not '
        'reach its evaluation): run --config.mode=evaluate on it first, or '
        'rerun the training command to finish it')


def epochs_to_steps(config, num_examples: int) -> dict:
  """Sets train.stageN.steps of each stage given in epochs (epochs > 0)
  to that many passes over `num_examples` training examples (images, or
  tiles with data.tile_sampling='grid'): ceil(epochs * n / batch size),
  batches straddle epochs (order.batch_indices). Returns
  {stage: steps} of the converted stages."""
  converted = {}
  for s in (1, 2, 3):
    stage = config.train[f'stage{s}']
    if stage.epochs > 0:
      batch = train.stage_batch_size(config, s)
      steps = math.ceil(stage.epochs * num_examples / batch)
      stage.steps = steps
      converted[s] = steps
  return converted


def hold_out_labelled(files, fraction: float, seed: int):
  """(files with a smaller test set, held-out labelled examples): for
  eval.threshold='f1', `fraction` of the test images of each label (at
  least one good and one defective) are kept apart to choose the
  thresholds on; the reported metrics use only the rest, so no threshold
  is tuned on the images it is measured on. Deterministic from the seed."""
  rng = np.random.default_rng([seed, 11])
  held = set()
  for label in (0, 1):
    idx = [i for i, e in enumerate(files.test) if e.label == label]
    if len(idx) < 2:
      raise folder.DataError(
          "config.eval.threshold='f1' needs at least two "
          f"{'good' if label == 0 else 'defective'} test images (one to "
          f'choose the threshold on, one to measure), found {len(idx)} in '
          f'{os.path.join(files.root, files.category)!r}: add test images '
          "or use eval.threshold='quantile'")
    k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
    held |= {idx[j] for j in rng.permutation(len(idx))[:k]}
  rest = tuple(e for i, e in enumerate(files.test) if i not in held)
  val = tuple(e for i, e in enumerate(files.test) if i in held)
  return dataclasses.replace(files, test=rest), val


def prepare(config, workdir: str):
  """Checks the data folder, converts stages given in epochs to steps,
  holds out the labelled threshold split; returns the loader."""
  files = sources.resolve_files(config.data, seed=config.seed)
  logging.info('Data: %s/%s, %d train, %d test images', files.root,
               files.category, len(files.train), len(files.test))
  if config.data.check_files:
    # Tiled runs scale every image by image_size / tile_size by choice:
    # no image is enlarged to fit the model, so there is nothing to report.
    check.validate_category(files, workers=config.data.num_workers,
                            image_size=(None if config.data.tile_size else
                                        geometry.model_hw(config.data)),
                            resize=config.data.resize)
  train_files, val = sources.split_validation(
      files, config.data.val_fraction, config.seed)
  labelled = ()
  if config.eval.threshold == 'f1':
    if folder.good_only(files):
      raise folder.DataError(
          "config.eval.threshold='f1' needs labelled test images (test/good "
          'and test/<defect>), and '
          f'{os.path.join(files.root, files.category)!r} has no test/ folder: '
          "use eval.threshold='quantile' (the default) or 'fixed'")
    train_files, labelled = hold_out_labelled(
        train_files, config.eval.f1_val_fraction, config.seed)
    logging.info('eval.threshold=f1: %d labelled test images held out to '
                 'choose the thresholds on; metrics use the other %d',
                 len(labelled), len(train_files.test))
  loader = input_pipeline.make_loader(config.data, train_files, val)
  if labelled:
    loader.examples[thresholds.LABELLED_VAL] = labelled
  converted = epochs_to_steps(config, loader.num_train_examples)
  for s, steps in converted.items():
    logging.info('Stage %d: %s epochs of %d training examples at batch %d = '
                 '%d steps', s, config.train[f'stage{s}'].epochs,
                 loader.num_train_examples,
                 train.stage_batch_size(config, s),
                 steps)
  if jax.process_index() == 0:
    save_config(config, workdir, files, loader.num_train_examples)
  return loader


def save_config(config, workdir: str, files, num_train_examples=None
                ) -> None:
  """The resolved config (stages given in epochs with their steps) plus
  the actual data folder used."""
  fileio.makedirs(workdir)
  resolved = config.to_dict()
  resolved['resolved_data'] = {'root': files.root, 'category': files.category,
                               'num_train': len(files.train),
                               'num_test': len(files.test)}
  if num_train_examples is not None:
    # What the epochs were counted over (train/good less held-out images).
    resolved['resolved_data']['num_train_examples'] = num_train_examples
  fileio.write_json_atomic(os.path.join(workdir, 'config.json'), resolved)


def run(config, workdir: str) -> dict:
  """Dispatches on config.mode; returns that mode's report.

  Modes that write into the workdir hold its lock throughout
  (workdir_lock.py): a second run on the same workdir refuses at once."""
  # Before anything is read or compiled. The mode's names are MODES'.
  validate.choice(config.mode, 'mode', tuple(MODES))
  validate.validate(config)
  if not (config.data.categories and config.mode in ('train', 'evaluate')):
    check_workdir(config, workdir)
  fileio.makedirs(workdir)
  with workdir_lock.held(workdir, config.workdir_lock, config.mode):
    return dispatch(config, workdir)


def dispatch(config, workdir: str) -> dict:
  if config.data.categories and config.mode in ('train', 'evaluate'):
    return run_categories(config, workdir)
  return MODES[config.mode](config, workdir)


def train_mode(config, workdir: str) -> dict:
  """Trains (or resumes) every stage, then evaluates."""
  from rcae_jax.evaluation import learning_curves  # pylint: disable=g-import-not-at-top
  loader = prepare(config, workdir)
  hook = None
  # A good-only category has no test set to draw curves from (evaluate
  # says so once, when it skips the test metrics). A resumed run's
  # wall-time axis carries on from its last point.
  if config.eval.every_steps and not folder.good_only(loader.files):
    hook = curve_hook.make_curve_hook(
        config, loader, learning_curves.last_wall_minutes(workdir))
  params = loop.train_and_checkpoint(config, workdir, loader, hook)
  if hook is not None and jax.process_index() == 0:
    logging.info('Learning curves: %s', learning_curves.write(
        workdir, title=loader.files.category))
  return evaluate_params(config, workdir, loader, params)


def evaluate_mode(config, workdir: str) -> dict:
  """Evaluates the workdir's latest checkpoint."""
  # A config that does not fit the checkpoints is refused before prepare()
  # writes it over the workdir's config.json: leaving out --config then
  # still finds the config the workdir was trained with.
  params = params_lib.load_params(config, workdir)
  loader = prepare(config, workdir)
  if not checkpoints.training_complete(workdir):
    logging.warning('%s: training is not finished (no TRAINING_COMPLETE '
                    'marker); evaluating its latest checkpoint, and '
                    'metrics.json says training_complete=false', workdir)
  return evaluate_params(config, workdir, loader, params)


def evaluate_params(config, workdir: str, loader, params) -> dict:
  """Metrics, thresholds and pictures of `params` on the loader's test
  set (evaluate.evaluate), after the choice of eval.scoring='auto'."""
  # Evaluation runs the same program on every process over the whole test
  # set, each on its own device, from a host copy of the replicated params.
  params = jax.device_get(params)
  if config.eval.scoring == 'auto':  # Chosen on held-out good images.
    from rcae_jax.training import proxy_anomalies  # pylint: disable=g-import-not-at-top
    config = scoring_choice.choose_scoring(
        params, loader, config, workdir, functools.partial(
            proxy_anomalies.proxy_set, anomaly_cfg=config.anomalies))
  log_checksum(params)
  log_model_cost(config, params, workdir)
  writer = writers.create_writer(workdir, jax.process_index() == 0,
                                 config.tensorboard)
  # Eval scalars at the last training step, beside the training curves.
  last_step = sum(config.train[f'stage{s}'].steps for s in (1, 2, 3))
  report = evaluate.evaluate(params, loader, config, workdir, writer=writer,
                             step=last_step,
                             extra={'training_complete':
                                    checkpoints.training_complete(workdir)})
  writer.close()
  return report


def predict_mode(config, workdir: str) -> dict:
  from rcae_jax.serving import predict  # pylint: disable=g-import-not-at-top
  return predict.predict_files(scoring_choice.resolve(config, workdir),
                               workdir)


def export_mode(config, workdir: str) -> dict:
  from rcae_jax.serving import export  # pylint: disable=g-import-not-at-top
  return export.run_export(scoring_choice.resolve(config, workdir), workdir)


def benchmark_mode(config, workdir: str) -> dict:
  from rcae_jax.tools import benchmark  # pylint: disable=g-import-not-at-top
  return benchmark.run_benchmark(config, workdir)


def report_mode(config, workdir: str) -> dict:
  """A REPORT_MODES mode on the trained workdir (write_report)."""
  config = scoring_choice.resolve(config, workdir)
  if config.mode == 'shortcut_report':
    from rcae_jax.tools import shortcut_report  # pylint: disable=g-import-not-at-top
    shortcut_report.require_stage3(workdir)  # Before any parameter is read.
  params = params_lib.load_params(config, workdir)  # Before prepare().
  return write_report(config, workdir, prepare(config, workdir), params)


# config.mode -> what it runs, (config, workdir) -> its report; `run`
# checks config.mode against these names.
MODES = {'train': train_mode, 'evaluate': evaluate_mode,
         'predict': predict_mode, 'export': export_mode,
         'benchmark': benchmark_mode,
         **{mode: report_mode for mode in REPORT_MODES}}


def write_report(config, workdir: str, loader, params) -> dict:
  """A REPORT_MODES mode: the trained workdir's test set (its restored
  `params`) summed up into <workdir>/<mode>.json and a table on stdout."""
  if folder.good_only(loader.files):
    raise folder.DataError(
        f'{config.mode} needs test images with masks; '
        f'{os.path.join(loader.files.root, loader.files.category)!r} has no '
        'test/ folder')
  # pylint: disable=g-import-not-at-top
  if config.mode == 'depth_report':
    from rcae_jax.tools import depth_report as module
  elif config.mode == 'fusion_report':
    from rcae_jax.tools import fusion_report as module
  else:
    from rcae_jax.tools import shortcut_report as module
  # pylint: enable=g-import-not-at-top
  report = module.make_report(jax.device_get(params), loader, config)
  if jax.process_index() == 0:
    fileio.write_json_atomic(os.path.join(workdir, f'{config.mode}.json'),
                             report)
  print(module.format_table(report))
  return report


def checksum(params) -> dict:
  """Sum of |w| per component: a cheap fingerprint to compare runs and
  processes by (multi-host runs must end with identical parameters)."""
  return {k: float(np.sum([np.abs(np.asarray(x, np.float64)).sum()
                           for x in jax.tree.leaves(v)]))
          for k, v in params.items()}


def log_checksum(params) -> None:
  logging.info('Parameter checksum: %s',
               json.dumps(checksum(params), sort_keys=True))


def log_model_cost(config, params, workdir: str) -> None:
  """Parameters and analytic FLOPs per component, to the log and to
  <workdir>/model_report.json (XLA's cost analysis undercounts convs)."""
  report = flops.model_report(config, params)
  height, width = geometry.model_hw(config.data)
  for name, r in report.items():
    logging.info('%s: %s parameters, %.3f GFLOP per %dx%d px image', name,
                 f"{r['params']:,}", r['gflop_per_image'], height, width)
  if jax.process_index() == 0:
    fileio.write_json_atomic(os.path.join(workdir, 'model_report.json'),
                             report)


def run_categories(config, workdir: str) -> dict:
  """Trains / evaluates each of `config.data.categories` into
  <workdir>/<category>/ one after another, skipping categories whose
  metrics.json already exists (a rerun finishes what is left), then writes
  the summary metrics.json (with a `mean` entry) and results.md."""
  report = {}
  for category in config.data.categories:
    sub = config.copy_and_resolve_references()
    with sub.unlocked():
      sub.data.category = category
      sub.data.categories = ()
    subdir = os.path.join(workdir, category)
    done = os.path.join(subdir, 'metrics.json')
    if config.mode == 'train' and fileio.exists(done):
      logging.info('Category %s already finished (%s): skipped', category,
                   done)
      report.update(fileio.read_json(done))
      continue
    logging.info('=== Category %s -> %s', category, subdir)
    report.update(run(sub, subdir))
  report['mean'] = mean_metrics(report)
  fileio.write_json_atomic(os.path.join(workdir, 'metrics.json'), report)
  fileio.write_text_atomic(os.path.join(workdir, 'results.md'),
                           report_lib.results_table(report))
  return report


def mean_metrics(report: dict) -> dict:
  """Mean of each numeric metric over the categories that have it."""
  keys = sorted({k for m in report.values() for k, v in m.items()
                 if isinstance(v, float)})
  return {k: float(np.mean([m[k] for m in report.values() if k in m]))
          for k in keys}
