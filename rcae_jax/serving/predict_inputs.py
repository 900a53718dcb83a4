"""Which images a predict run scores, and the output name of each.

`predict.inputs` is a folder (searched recursively), or comma-separated
folders and image files. Outputs are written under each input's name, so
no two inputs of a run may share one:

- One folder given: the image's path relative to it, extension kept
  (`line1/007.png`). The output tree mirrors the input tree, and equal
  stems in different sub-folders, or `007.png` beside `007.jpg`, stay
  apart.
- Several folders, or loose files: the same under `<folder name>-<8 hex
  digits of the folder's absolute path>/` (a loose file's folder is its
  parent), so `/a/cam/1.png` and `/b/cam/1.png` stay apart too.

A name depends on nothing but the path itself: adding or removing other
inputs never renames an output, so a rerun finds what an earlier run wrote.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

from rcae_jax.common import fileio
from rcae_jax.data import folder


@dataclasses.dataclass(frozen=True)
class Input:
  path: str  # Absolute path or URL: what is read, and the report's key.
  name: str  # Unique relative output name, e.g. 'line1/007.png'.


def _normalized(path: str) -> str:
  path = fileio.absolute(path)
  return path.rstrip('/') if fileio.is_remote(path) else os.path.normpath(path)


def folder_tag(path: str) -> str:
  """`<name>-<8 hex digits>` of a folder: readable, and unique per path."""
  path = _normalized(path)
  digest = hashlib.sha256(path.encode('utf-8')).hexdigest()[:8]
  return f'{os.path.basename(path) or "root"}-{digest}'


def walk_images(root: str, skip: str = '') -> list[str]:
  """Image paths relative to `root`, recursively, sorted per folder.

  Hidden entries are skipped (our own atomic-write temp files start with a
  dot), and so is `skip`: an output folder inside the input folder would
  otherwise feed the previous run's overlays back in as inputs."""
  skip = _normalized(skip) if skip else ''
  found = []

  def visit(rel: str):
    here = os.path.join(root, rel) if rel else root
    for name in sorted(fileio.listdir(here)):
      if name.startswith('.'):
        continue
      path = os.path.join(here, name)
      if fileio.isdir(path):
        if not skip or _normalized(path) != skip:
          visit(os.path.join(rel, name))
      elif folder.is_image(name):
        found.append(os.path.join(rel, name))

  visit('')
  return found


def list_inputs(spec: str, skip: str = '') -> list[Input]:
  """The inputs of `predict.inputs`, in order, each path once."""
  parts = [p.strip() for p in spec.split(',') if p.strip()]
  tagged = len(parts) > 1 or not (parts and fileio.isdir(parts[0]))
  inputs, seen = [], {}
  for part in parts:
    if fileio.isdir(part):
      prefix = folder_tag(part) if tagged else ''
      pairs = [(os.path.join(part, rel), rel)
               for rel in walk_images(part, skip)]
    elif fileio.exists(part):
      pairs = [(part, os.path.basename(part))]
      prefix = folder_tag(os.path.dirname(_normalized(part)))
    else:
      raise folder.DataError(f'predict input {part!r} is neither an image '
                             'file nor a folder')
    for path, rel in pairs:
      path = _normalized(path)
      if path in seen:  # 'dir,dir/a.png' lists dir/a.png twice.
        continue
      name = os.path.join(prefix, rel) if prefix else rel
      seen[path] = name
      inputs.append(Input(path, name))
  if not inputs:
    raise folder.DataError(f'no images found in predict.inputs={spec!r}')
  check_unique(inputs)
  return inputs


def check_unique(inputs: list[Input]) -> None:
  """Refuses before anything is written if two inputs share a name (only
  an 8-hex-digit clash of two folder tags could cause it)."""
  owner = {}
  for x in inputs:
    if x.name in owner:
      raise folder.DataError(f'{x.path!r} and {owner[x.name]!r} would write '
                             f'to the same output name {x.name!r}')
    owner[x.name] = x.path
