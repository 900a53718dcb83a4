"""The command line as a user meets it: --help, a workdir that remembers its
config, and every mistake a user can make as one line on stderr, printed
once, with no traceback."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from conftest import subprocess_env

pytestmark = pytest.mark.slow


def main(*args, cwd=REPO, env=None):
  return subprocess.run([sys.executable, '-m', 'rcae_jax.main', *args],
                        capture_output=True, text=True, timeout=300,
                        env=env or subprocess_env(), cwd=cwd)


def one_error(result) -> str:
  """The single 'rcae_jax: error:' line of a failed run."""
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr, result.stderr
  lines = [l for l in result.stderr.splitlines() if 'rcae_jax: error:' in l]
  assert len(lines) == 1, result.stderr
  # Nothing else repeats it (absl's logging.error used to).
  message = lines[0].split('rcae_jax: error: ', 1)[1]
  assert result.stderr.count(message[:60]) == 1, result.stderr
  return message


def test_help_lists_the_modes_and_points_to_the_config_reference():
  result = main('--help')
  text = result.stdout + result.stderr
  for mode in ('train', 'evaluate', 'predict', 'export', 'benchmark',
               'depth_report', 'fusion_report'):
    assert f'\n  {mode} ' in text, mode
  assert 'configs/default.py' in text
  assert 'Research tools' in text and 'pipeline_benchmark' in text
  assert '--config.mode=predict --config.predict.inputs=FOLDER' in text


# rcae_jax.main run as `python -m` does, its exit caught: then whether JAX
# was imported.
IMPORTS_OF_A_FAILED_PARSE = """
import runpy, sys
sys.argv = ['rcae_jax.main'] + sys.argv[1:]
try:
  runpy.run_module('rcae_jax.main', run_name='__main__', alter_sys=True)
except SystemExit as e:
  print('exit:', e.code)
print('jax imported:', 'jax' in sys.modules)
"""


@pytest.mark.parametrize('args', [
    ('--help',),
    ('--config', 'configs/smoke.py', '--config.modell.depth=3'),
    ('--config', 'configs/no_such.py'),
    ('--config', 'configs/smoke.py', '--config.model.recursion=sideways'),
])
def test_flag_mistakes_answer_before_jax_is_imported(tmp_path, args):
  """main.py imports JAX and the package only once the flags are parsed
  and the config validated, and neither the config files nor validate.py
  import JAX: --help, a mistake in the flags and most bad values answer in
  a fraction of a second."""
  result = subprocess.run(
      [sys.executable, '-c', IMPORTS_OF_A_FAILED_PARSE, *args,
       '--workdir', str(tmp_path)], capture_output=True, text=True,
      timeout=300, env=subprocess_env(), cwd=REPO)
  assert 'exit:' in result.stdout, result.stderr[-3000:]
  assert 'jax imported: False' in result.stdout, result.stdout


def test_no_config_on_a_folder_that_does_not_exist(tmp_path):
  message = one_error(main('--workdir', str(tmp_path / 'nope'),
                           '--config.mode=predict',
                           '--config.predict.inputs=x'))
  assert 'does not exist' in message and '--config configs/' in message


def test_no_config_on_an_untrained_folder(tmp_path):
  message = one_error(main('--workdir', str(tmp_path), '--config.mode=predict',
                           '--config.predict.inputs=x'))
  assert 'has no config.json' in message and '--config configs/' in message


@pytest.mark.parametrize('mode', ['predict', 'evaluate'])
def test_trained_modes_on_a_workdir_without_checkpoints(tmp_path, mode):
  """A workdir with a config.json but no checkpoint (training never got
  past its start): say to train, not to evaluate."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  (tmp_path / 'config.json').write_text(json.dumps(tiny_config().to_dict()))
  message = one_error(main('--workdir', str(tmp_path),
                           f'--config.mode={mode}',
                           f'--config.predict.inputs={tmp_path}'))
  assert 'has no checkpoint: train it first' in message
  assert 'evaluate' not in message.split(':', 1)[1].split('train it')[0]


@pytest.mark.parametrize('arg,name,hint', [
    ('--config.modell.depth=3', "'modell'", "did you mean 'model'"),
    ('--config.model.no_such_field=3', "'no_such_field'", None),
])
def test_misspelt_field(tmp_path, arg, name, hint):
  message = one_error(main('--config', 'configs/smoke.py', '--workdir',
                           str(tmp_path), arg))
  assert f'unknown config field {name}' in message
  assert '\\n' not in message and '\\' not in message
  assert 'configs/default.py' in message
  if hint:
    assert hint in message


def test_missing_config_file(tmp_path):
  message = one_error(main('--config', 'configs/no_such.py', '--workdir',
                           str(tmp_path)))
  assert "cannot load the config file 'configs/no_such.py'" in message


def test_missing_data_folder(tmp_path):
  message = one_error(main('--config', 'configs/smoke.py', '--workdir',
                           str(tmp_path / 'wd'),
                           f'--config.data.root={tmp_path / "absent"}'))
  assert 'does not exist' in message


def test_predict_with_only_workdir_and_inputs(trained, tmp_path):
  """The saved config is used: the command line names only the mode, the
  inputs and what to leave out, yet the model's shape (depth 2, width 4, 32
  px: not configs/default.py's) loads. A missing inputs folder is one line."""
  _, workdir = trained
  copy = str(tmp_path / 'wd')
  shutil.copytree(workdir, copy)
  images = tmp_path / 'images'
  images.mkdir()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.new('RGB', (40, 24), (120, 30, 200)).save(images / 'a.png')
  result = main('--workdir', copy, '--config.mode=predict',
                f'--config.predict.inputs={images}',
                '--config.predict.write_overlays=false')
  assert result.returncode == 0, result.stderr
  out = os.path.join(copy, 'predictions')
  assert sorted(os.listdir(out)) == ['a.png.tiff', 'predictions.csv',
                                     'predictions.json']
  message = one_error(main('--workdir', copy, '--config.mode=predict',
                           f'--config.predict.inputs={tmp_path / "none"}'))
  assert str(tmp_path / 'none') in message


def test_predict_on_a_workdir_without_thresholds(trained, tmp_path):
  _, workdir = trained
  copy = str(tmp_path / 'wd')
  shutil.copytree(workdir, copy)
  os.remove(os.path.join(copy, 'thresholds.json'))
  message = one_error(main('--workdir', copy, '--config.mode=predict',
                           f'--config.predict.inputs={tmp_path}'))
  assert 'no thresholds.json' in message and 'mode=evaluate' in message


def test_predict_can_skip_maps_and_overlays(trained, tmp_path):
  """predict.write_maps / write_overlays = False: no per-image files, the
  report's columns empty, the scores and decisions unchanged."""
  from rcae_jax.serving import predict  # pylint: disable=g-import-not-at-top
  config, workdir = trained
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = tmp_path / 'in'
  images.mkdir()
  for i in range(2):
    Image.new('RGB', (36, 28), (60 * i, 90, 30)).save(images / f'{i}.png')
  rows = {}
  for write in (True, False):
    c = config.copy_and_resolve_references()
    c.mode = 'predict'
    c.predict.inputs = str(images)
    c.predict.output = str(tmp_path / f'out_{write}')
    c.predict.write_maps = c.predict.write_overlays = write
    rows[write] = predict.predict_files(c, workdir)['predictions']
  assert sorted(os.listdir(tmp_path / 'out_False')) == [
      'predictions.csv', 'predictions.json']
  assert len(os.listdir(tmp_path / 'out_True')) == 6
  assert all(r['map'] is None and r['overlay'] is None for r in rows[False])
  assert [r['score'] for r in rows[False]] == pytest.approx(
      [r['score'] for r in rows[True]])
