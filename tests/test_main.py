"""The command line: clear one-line errors for bad configuration."""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from conftest import subprocess_env

def run_main(*args, tmp_path):
  env = subprocess_env(RCAE_JAX_CACHE=str(tmp_path / 'cache'))
  return subprocess.run(
      [sys.executable, '-m', 'rcae_jax.main', '--config',
       os.path.join(REPO, 'configs', 'default.py'), '--workdir',
       str(tmp_path / 'wd'), *args],
      capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


@pytest.mark.parametrize('args,message', [
    (['--config.model.no_such_field=3'], 'no_such_field'),
    (['--config.data.root=/definitely/not/here'], "'/definitely/not/here' does not exist"),
    (['--config.model.recursion=sideways'], 'config.model.recursion must be one of'),
    (['--config.data.image_size=60'], 'config.data.image_size=60 must be divisible'),
    # A pair parses from the command line (issue 16) and is checked per side.
    (['--config.data.image_size=(64,72)'],
     'config.data.image_size=(64, 72) must be divisible by 16 on both sides'),
    (['--config.data.resize=stretch'], 'config.data.resize must be one of'),
])
def test_bad_configuration_fails_with_one_clear_message(args, message,
                                                        tmp_path):
  result = run_main(*args, tmp_path=tmp_path)
  assert result.returncode != 0
  assert message in result.stderr
  assert 'Traceback' not in result.stderr


def test_category_without_train_good(tmp_path):
  (tmp_path / 'data' / 'cat' / 'test').mkdir(parents=True)
  result = run_main(f'--config.data.root={tmp_path / "data"}',
                    '--config.data.category=cat', tmp_path=tmp_path)
  assert result.returncode != 0
  assert 'train/good' in result.stderr and 'Traceback' not in result.stderr


def test_out_of_memory_becomes_one_actionable_line():
  from rcae_jax import main  # pylint: disable=g-import-not-at-top
  hint = main.out_of_memory_hint(RuntimeError(
      'RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.1GiB.\n'
      'BufferAssignment ...'))
  assert 'batch_size' in hint and 'allocate 9.1GiB' in hint
  assert 'BufferAssignment' not in hint
  assert main.out_of_memory_hint(RuntimeError('INVALID_ARGUMENT: x')) is None
