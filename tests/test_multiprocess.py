"""Two processes on localhost (jax.distributed, CPU collectives) train like
one process with two devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from conftest import subprocess_env
from conftest import tiny_config

ARGS = ['--config', os.path.join(REPO, 'configs', 'smoke.py'),
        # Stage 1 only keeps the runs short; stages 2 and 3 under a
        # mesh are covered by test_sharding.py.
        '--config.train.stage1.steps=4', '--config.train.stage2.steps=0',
        '--config.train.stage3.steps=0', '--config.eval.scoring=recursion',
        '--config.eval.pictures_per_type=0', '--config.eval.export_maps=False',
        # Nor TensorBoard: no TensorFlow import (~5 CPU-s per process).
        '--config.tensorboard=False']
# ARGS as tests/conftest.py's tiny_config overrides, on two devices.
SINGLE_OVERRIDES = {
    'train.stage1.steps': 4, 'train.stage2.steps': 0, 'train.stage3.steps': 0,
    'eval.scoring': 'recursion', 'eval.pictures_per_type': 0,
    'eval.export_maps': False, 'tensorboard': False, 'mesh.num_devices': 2}


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def env_for(tmp_path, **extra):
  return subprocess_env(RCAE_JAX_CACHE=str(tmp_path / 'cache'), **extra)


def main_cmd(workdir):
  return [sys.executable, '-m', 'rcae_jax.main', *ARGS, '--workdir',
          str(workdir)]


def checksums(log: str) -> list[str]:
  return [l.split('Parameter checksum: ')[1] for l in log.splitlines()
          if 'Parameter checksum: ' in l]


@pytest.mark.slow
def test_two_processes_match_one_process_with_two_devices(tmp_path,
                                                          monkeypatch):
  from rcae_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  from rcae_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from rcae_jax.serving import params as params_lib  # pylint: disable=g-import-not-at-top
  # The data first, here: the two processes then find it in their cache
  # instead of both generating it.
  monkeypatch.setenv('RCAE_JAX_CACHE', str(tmp_path / 'cache'))
  synthetic.ensure(size=32, n_train=8, n_test_good=4, n_per_defect=2)
  port = free_port()
  procs = [subprocess.Popen(
      main_cmd(tmp_path / 'multi'), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True, cwd=REPO,
      env=env_for(tmp_path, RCAE_JAX_COORDINATOR=f'127.0.0.1:{port}',
                  RCAE_JAX_NUM_PROCESSES='2', RCAE_JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  # The reference, in this process while they run (they wait on each
  # other at every collective): the same config on two of the tests' fake
  # devices, the same data.
  config = tiny_config(**SINGLE_OVERRIDES)
  one = run_lib.run(config, str(tmp_path / 'single'))['synthetic']
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  ref = run_lib.checksum(params_lib.load_params(config,
                                                 str(tmp_path / 'single')))
  sums = [checksums(log) for log in logs]
  assert sums[0] and sums[0] == sums[1]
  multi_sums = json.loads(sums[0][-1])
  assert sorted(multi_sums) == sorted(ref)
  for name, value in ref.items():
    np.testing.assert_allclose(multi_sums[name], value, rtol=1e-4)
  multi = json.load(open(tmp_path / 'multi' / 'metrics.json'))['synthetic']
  for key in ('image_auroc', 'pixel_auroc', 'au_pro'):
    np.testing.assert_allclose(multi[key], one[key], atol=1e-3)
