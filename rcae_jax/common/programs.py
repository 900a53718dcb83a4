"""Jitted programs built once per process for what they depend on.

A jitted closure made afresh is traced, lowered and compiled afresh: JAX's
in-memory caches are keyed on the function object. A run over several
categories builds the same training steps and predict functions for every
category, so without this each category paid the whole compile again
(measured: configs/smoke.py over two categories, 2-core CPU, no persistent
cache: stage steps 1.4 + 5.0 + 9.5 s and predict 3.7 s compiled twice).

The key of a program names what it reads: its static arguments (networks,
stage, mesh, ...) and the JSON of the config sections it reads, whole, so
that a field added to one of those sections later cannot be missed.

Also `run_unoptimised`: a program compiled without XLA:CPU's optimisations,
for programs that run once (parameter initialisation).
"""

from __future__ import annotations

import collections
import json
import threading
from typing import Any, Callable, Hashable

import jax


def config_key(config, *sections: str) -> str:
  """The JSON of `config`'s `sections` ('train', 'seed', ...), sorted: equal
  keys mean equal settings."""
  return json.dumps({s: config[s] for s in sections}, sort_keys=True,
                    default=_jsonable)


def _jsonable(value: Any):
  if hasattr(value, 'to_dict'):  # A nested ConfigDict.
    return value.to_dict()
  if isinstance(value, (tuple, set, frozenset)):
    return list(value)
  return repr(value)


class Memo:
  """The `maxsize` programs used last, by key."""

  def __init__(self, maxsize: int):
    self.maxsize = maxsize
    self._items: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
    """The program of `key`, made by `make()` the first time."""
    with self._lock:
      if key in self._items:
        self._items.move_to_end(key)
        return self._items[key]
    # Outside the lock: a thread asking at the same time makes one too
    # (harmless: the last one made is kept), and no caller waits on it.
    made = make()
    with self._lock:
      self._items[key] = made
      self._items.move_to_end(key)
      while len(self._items) > self.maxsize:
        self._items.popitem(last=False)
      return self._items[key]


def run_unoptimised(fn, *args):
  """fn(*args), jitted and compiled without XLA:CPU's optimisations (other
  backends compile as usual): for programs that run once, where optimising
  costs more than it saves."""
  options = ({'xla_backend_optimization_level': 0}
             if jax.default_backend() == 'cpu' else None)
  return jax.jit(fn).lower(*args).compile(compiler_options=options)(*args)
