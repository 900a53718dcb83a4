"""Data parallelism with JAX's own runtime: one mesh axis, `data`.

Parameters and optimizer state are replicated; batches are split on their
leading axis across all devices of all processes. Each process feeds only
its local shard (`order.host_slice`), and
`jax.make_array_from_process_local_data` assembles the global batch, so the
same code runs on one CPU, an 8-GPU host and a TPU pod slice.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = 'data'


def make_mesh(num_devices: int = 0) -> Mesh:
  """All devices (or the first `num_devices`) on the `data` axis. Auto axis
  types: classic in/out shardings (jax 0.10 defaults to Explicit)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f'config.mesh.num_devices={num_devices} but only '
                       f'{len(devices)} devices exist')
    devices = devices[:num_devices]
  return jax.make_mesh((len(devices),), (DATA,), axis_types=(AxisType.Auto,),
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def check_batch(global_batch: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(
        f'global batch size {global_batch} is not divisible by the {n} '
        f'devices of the mesh; use a multiple of {n} '
        '(config.train.batch_size / config.eval.batch_size)')


def to_global(batch: dict, mesh: Mesh) -> dict:
  """This process's numpy shard of every field -> global jax.Arrays."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def split_rows(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array that every process holds whole (each loaded the same
  batch) as one array split on its rows over the mesh: each device takes
  its own rows from it."""
  return jax.make_array_from_callback(x.shape, batch_sharded(mesh),
                                      lambda index: x[index])


def replicate(tree, mesh: Mesh):
  """Every leaf as one array replicated over the mesh, on every process.

  Built from host values with make_array_from_process_local_data (each
  process holds the same values: same seed, same restored checkpoint).
  A device_put of a one-device array onto other processes' devices gives
  an array that Orbax cannot save; arrays that went through a jitted step
  did not show it, but frozen networks never do. Leaves already placed so
  are kept as they are."""
  rep = replicated(mesh)

  def one(x):
    if isinstance(x, jax.Array) and x.sharding == rep:
      return x
    return jax.make_array_from_process_local_data(rep, np.asarray(x))

  return jax.tree.map(one, tree)
