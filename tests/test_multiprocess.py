"""Two processes on localhost (jax.distributed, CPU collectives) train like
one process with two devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ['--config', os.path.join(REPO, 'configs', 'smoke.py'),
        # Stage 1 only keeps the three runs short; stages 2 and 3 under a
        # mesh are covered by test_sharding.py.
        '--config.train.stage1.steps=4', '--config.train.stage2.steps=0',
        '--config.train.stage3.steps=0', '--config.eval.scoring=recursion',
        '--config.eval.pictures_per_type=0', '--config.eval.export_maps=False']


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def env_for(tmp_path, **extra):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
             RCAE_JAX_CACHE=str(tmp_path / 'cache'), **extra)
  env.pop('XLA_FLAGS', None)
  return env


def main_cmd(workdir):
  return [sys.executable, '-m', 'rcae_jax.main', *ARGS, '--workdir',
          str(workdir)]


def checksums(log: str) -> list[str]:
  return [l.split('Parameter checksum: ')[1] for l in log.splitlines()
          if 'Parameter checksum: ' in l]


def test_two_processes_match_one_process_with_two_devices(tmp_path):
  from rcae_jax.datasets import synthetic  # pylint: disable=g-import-not-at-top
  # Generate the data once, so the two processes do not race to write it.
  subprocess.run([sys.executable, '-c',
                  'from rcae_jax.datasets import synthetic; synthetic.ensure('
                  'size=32, n_train=8, n_test_good=4, n_per_defect=2)'],
                 env=env_for(tmp_path), check=True, cwd=REPO, timeout=120)
  del synthetic
  port = free_port()
  procs = [subprocess.Popen(
      main_cmd(tmp_path / 'multi'), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True, cwd=REPO,
      env=env_for(tmp_path, RCAE_JAX_COORDINATOR=f'127.0.0.1:{port}',
                  RCAE_JAX_NUM_PROCESSES='2', RCAE_JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  single = subprocess.run(
      main_cmd(tmp_path / 'single'), capture_output=True, text=True,
      cwd=REPO, timeout=600,
      env=env_for(tmp_path,
                  XLA_FLAGS='--xla_force_host_platform_device_count=2'))
  assert single.returncode == 0, single.stderr[-3000:]
  # Both processes end with identical parameters...
  sums = [checksums(log) for log in logs]
  assert sums[0] and sums[0] == sums[1]
  # ...equal to the one-process, two-device run on the same global batches.
  ref = checksums(single.stderr)
  for a, b in zip(json.loads(sums[0][-1]).values(),
                  json.loads(ref[-1]).values()):
    np.testing.assert_allclose(a, b, rtol=1e-4)
  multi = json.load(open(tmp_path / 'multi' / 'metrics.json'))['synthetic']
  one = json.load(open(tmp_path / 'single' / 'metrics.json'))['synthetic']
  for key in ('image_auroc', 'pixel_auroc', 'au_pro'):
    np.testing.assert_allclose(multi[key], one[key], atol=1e-3)
