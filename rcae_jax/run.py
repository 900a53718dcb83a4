"""What `main` does, as an importable function (tests call it directly)."""

from __future__ import annotations

import logging
import os

import jax

from rcae_jax import evaluate
from rcae_jax import input_pipeline
from rcae_jax import train
from rcae_jax import validate
from rcae_jax import writers


def prepare(config, workdir: str):
  """Checks the config and the data folder; returns (files, loader)."""
  validate.validate(config)
  files = input_pipeline.resolve_files(config.data, seed=config.seed)
  logging.info('Data: %s/%s, %d train, %d test images', files.root,
               files.category, len(files.train), len(files.test))
  loader = input_pipeline.make_loader(config.data, files)
  if jax.process_index() == 0:
    train.save_config(config, workdir, files)
  return files, loader


def run(config, workdir: str) -> dict:
  """Train (resuming if possible) and evaluate, or evaluate only."""
  os.makedirs(workdir, exist_ok=True)
  _, loader = prepare(config, workdir)
  if config.mode == 'train':
    params = train.train_and_checkpoint(config, workdir, loader)
  else:
    params = train.load_params(config, workdir)
  writer = writers.create_writer(workdir, jax.process_index() == 0)
  report = evaluate.evaluate(params, loader, config, workdir, writer=writer)
  writer.close()
  return report
