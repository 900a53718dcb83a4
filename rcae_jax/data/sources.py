"""Which images a run reads: the category the config points at (an
MVTec-layout folder, a local VisA copy, or the built-in synthetic category,
generated on first use) and the good training images held out to choose
thresholds on (`data.val_fraction`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from rcae_jax.common import fileio
from rcae_jax.data import folder, synthetic


def resolve_files(data_cfg, seed: int = 0) -> folder.CategoryFiles:
  """The category the config points at, generating the built-in one."""
  root = data_cfg.root
  if not root:
    root = synthetic.ensure(
        cache=data_cfg.synthetic_cache, seed=seed,
        size=data_cfg.synthetic_size, n_train=data_cfg.synthetic_train,
        n_test_good=data_cfg.synthetic_test_good,
        n_per_defect=data_cfg.synthetic_test_per_defect)
    return folder.discover(root, synthetic.CATEGORY)
  root = fileio.absolute(root)
  if data_cfg.format == 'visa':
    if fileio.is_remote(root):
      # Its split CSV names ~10k files that would be checked one by one.
      raise folder.DataError(
          f'data.format=visa reads a local copy only; {root!r} is remote. '
          'Copy it first (gcloud storage cp --recursive ...).')
    from rcae_jax.data import visa  # pylint: disable=g-import-not-at-top
    return visa.discover_visa(root, data_cfg.category,
                              data_cfg.visa_split_csv or None)
  return folder.discover(root, data_cfg.category)


def split_validation(files: folder.CategoryFiles, fraction: float, seed: int
                     ) -> tuple[folder.CategoryFiles, tuple[str, ...]]:
  """Holds out `fraction` of train/good (at least one image when > 0) for
  choosing thresholds without test labels. Deterministic from the seed."""
  n = len(files.train)
  k = min(n - 1, int(np.ceil(fraction * n))) if fraction > 0 else 0
  if k <= 0:
    return files, ()
  held = set(np.random.default_rng([seed, 7]).permutation(n)[:k].tolist())
  train = tuple(p for i, p in enumerate(files.train) if i not in held)
  val = tuple(p for i, p in enumerate(files.train) if i in held)
  return dataclasses.replace(files, train=train), val
