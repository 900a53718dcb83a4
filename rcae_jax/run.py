"""What `main` does, as importable functions (tests call them directly)."""

from __future__ import annotations

import logging
import os

import jax

from rcae_jax import evaluate
from rcae_jax import input_pipeline
from rcae_jax import train
from rcae_jax import validate
from rcae_jax import writers
from rcae_jax.datasets import check


def prepare(config, workdir: str):
  """Checks the config and the data folder; returns the loader."""
  validate.validate(config)
  files = input_pipeline.resolve_files(config.data, seed=config.seed)
  logging.info('Data: %s/%s, %d train, %d test images', files.root,
               files.category, len(files.train), len(files.test))
  if config.data.get('check_files', True):
    check.validate_category(files, workers=config.data.num_workers)
  train_files, val = input_pipeline.split_validation(
      files, config.data.get('val_fraction', 0.0), config.seed)
  loader = input_pipeline.make_loader(config.data, train_files, val)
  if jax.process_index() == 0:
    train.save_config(config, workdir, files)
  return loader


def run(config, workdir: str) -> dict:
  """Dispatches on config.mode; returns that mode's report."""
  os.makedirs(workdir, exist_ok=True)
  if config.mode == 'benchmark':
    validate.validate(config)
    from rcae_jax import benchmark  # pylint: disable=g-import-not-at-top
    return benchmark.run_benchmark(config, workdir)
  if config.mode == 'predict':
    validate.validate(config)
    from rcae_jax import predict  # pylint: disable=g-import-not-at-top
    return {'predictions': predict.predict_files(config, workdir)}
  loader = prepare(config, workdir)
  if config.mode == 'train':
    params = train.train_and_checkpoint(config, workdir, loader)
  else:
    params = train.load_params(config, workdir)
  writer = writers.create_writer(workdir, jax.process_index() == 0)
  report = evaluate.evaluate(params, loader, config, workdir, writer=writer)
  writer.close()
  return report
