"""The main job without TensorFlow, tensorflow-datasets or clu installed."""

import json
import os
import subprocess
import sys

import pytest

from conftest import BLOCKING_RUNNER
from conftest import REPO
from conftest import assert_pixel_metrics_are_the_maps
from conftest import subprocess_env
from rcae_jax.data import folder

# Stages 2 and 3 use no TensorFlow either, and their steps are tested in
# process: stage 1 and evaluation are what this run adds. (The same overrides
# as the reliability runs', so their compiled programs are shared.)
STAGE1_ONLY = ('--config.train.stage1.steps=8', '--config.train.stage2.steps=0',
               '--config.train.stage3.steps=0',
               '--config.eval.scoring=recursion')


@pytest.mark.slow
def test_main_job_runs_without_tensorflow(tmp_path):
  workdir = tmp_path / 'wd'
  env = subprocess_env(RCAE_JAX_CACHE=str(tmp_path / 'cache'))
  result = subprocess.run(
      [sys.executable, '-c', BLOCKING_RUNNER, '--config',
       os.path.join(REPO, 'configs', 'smoke.py'), '--workdir', str(workdir),
       '--config.data.loader=auto', *STAGE1_ONLY],
      capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'using the memory loader' in result.stderr
  assert 'TensorBoard summaries and clu progress reports are disabled' in (
      result.stderr)
  metrics = json.load(open(workdir / 'metrics.json'))['synthetic']
  # The reported pixel numbers are those of the maps the run wrote.
  root = json.load(open(workdir / 'config.json'))['resolved_data']['root']
  assert_pixel_metrics_are_the_maps(
      metrics, str(workdir), 'synthetic',
      folder.discover(root, 'synthetic'))
  assert os.listdir(workdir / 'checkpoints')
  rows = [json.loads(l) for l in open(workdir / 'scalars.jsonl')]
  assert any('stage1/loss' in r for r in rows)
  assert any('eval/pixel_auroc' in r for r in rows)
