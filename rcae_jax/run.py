"""What `main` does, as importable functions (tests call them directly)."""

from __future__ import annotations

import json
import logging
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
from rcae_jax.evaluation import curve_hook
from rcae_jax.model import flops
from rcae_jax.serving import params as params_lib
from rcae_jax.training import train


# Modes that load a trained workdir and summarise its test set.
REPORT_MODES = ('depth_report', 'fusion_report')


def prepare(config, workdir: str):
  """Checks the data folder; returns the loader."""
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
  loader = input_pipeline.make_loader(config.data, train_files, val)
  if jax.process_index() == 0:
    save_config(config, workdir, files)
  return loader


def save_config(config, workdir: str, files) -> None:
  """The resolved config plus the actual data folder used."""
  fileio.makedirs(workdir)
  resolved = config.to_dict()
  resolved['resolved_data'] = {'root': files.root, 'category': files.category,
                               'num_train': len(files.train),
                               'num_test': len(files.test)}
  fileio.write_json_atomic(os.path.join(workdir, 'config.json'), resolved)


def run(config, workdir: str) -> dict:
  """Dispatches on config.mode; returns that mode's report.

  Modes that write into the workdir hold its lock throughout
  (workdir_lock.py): a second run on the same workdir refuses at once."""
  validate.validate(config)  # Before anything is read or compiled.
  fileio.makedirs(workdir)
  with workdir_lock.held(workdir, config.workdir_lock, config.mode):
    return dispatch(config, workdir)


def dispatch(config, workdir: str) -> dict:
  if config.data.categories and config.mode in ('train', 'evaluate'):
    return run_categories(config, workdir)
  if config.mode == 'benchmark':
    from rcae_jax.tools import benchmark  # pylint: disable=g-import-not-at-top
    return benchmark.run_benchmark(config, workdir)
  if config.mode == 'predict':
    from rcae_jax.serving import predict  # pylint: disable=g-import-not-at-top
    return predict.predict_files(config, workdir)
  if config.mode == 'export':
    from rcae_jax.serving import export  # pylint: disable=g-import-not-at-top
    return export.run_export(config, workdir)
  loader = prepare(config, workdir)
  if config.mode in REPORT_MODES:
    return write_report(config, workdir, loader)
  if config.mode == 'train':
    from rcae_jax.evaluation import learning_curves  # pylint: disable=g-import-not-at-top
    hook = None
    # A good-only category has no test set to draw curves from (evaluate
    # says so once, when it skips the test metrics). A resumed run's
    # wall-time axis carries on from its last point.
    if config.eval.every_steps and not folder.good_only(loader.files):
      hook = curve_hook.make_curve_hook(
          config, loader, learning_curves.last_wall_minutes(workdir))
    params = train.train_and_checkpoint(config, workdir, loader, hook)
    if hook is not None and jax.process_index() == 0:
      logging.info('Learning curves: %s', learning_curves.write(
          workdir, title=loader.files.category))
  else:
    if not checkpoints.training_complete(workdir):
      logging.warning('%s: training is not finished (no TRAINING_COMPLETE '
                      'marker); evaluating its latest checkpoint, and '
                      'metrics.json says training_complete=false', workdir)
    params = params_lib.load_params(config, workdir)
  # Evaluation runs the same program on every process over the whole test
  # set, each on its own device, from a host copy of the replicated params.
  params = jax.device_get(params)
  log_checksum(params)
  log_model_cost(config, params, workdir)
  writer = writers.create_writer(workdir, jax.process_index() == 0)
  # Eval scalars at the last training step, beside the training curves.
  last_step = sum(config.train[f'stage{s}'].steps for s in (1, 2, 3))
  report = evaluate.evaluate(params, loader, config, workdir, writer=writer,
                             step=last_step,
                             extra={'training_complete':
                                    checkpoints.training_complete(workdir)})
  writer.close()
  return report


def write_report(config, workdir: str, loader) -> dict:
  """A REPORT_MODES mode: the trained workdir's test set summed up into
  <workdir>/<mode>.json and a table on stdout."""
  if folder.good_only(loader.files):
    raise folder.DataError(
        f'{config.mode} needs test images with masks; '
        f'{os.path.join(loader.files.root, loader.files.category)!r} has no '
        'test/ folder')
  # pylint: disable=g-import-not-at-top
  if config.mode == 'depth_report':
    from rcae_jax.tools import depth_report as module
  else:
    from rcae_jax.tools import fusion_report as module
  # pylint: enable=g-import-not-at-top
  params = jax.device_get(params_lib.load_params(config, workdir))
  report = module.make_report(params, loader, config)
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
