"""Every config file in configs/ loads and passes validation: a typo in a
field name or a bad choice would otherwise surface only when a user runs it.
Every field is read by some code; configs load from any working directory;
a stage given in epochs trains that many epochs of the real train set."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import load_config
from conftest import REPO
from conftest import subprocess_env
from rcae_jax import validate

CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, 'configs'))
                 if f.endswith('.py') and f != '__init__.py')


@pytest.mark.parametrize('name', CONFIGS)
def test_config_loads_and_validates(name):
  validate.validate(load_config(name))
  # Every config states its command and expected result (CONTRIBUTING.md).
  text = open(os.path.join(REPO, 'configs', f'{name}.py')).read()
  assert '--config configs/' in text, f'{name} does not state its command'


def test_real_128_only_changes_size_and_crd():
  base, real = load_config('default'), load_config('real_128')
  assert (real.data.image_size, real.model.crd_width,
          real.train.stage3.steps) == (128, 8, 600)
  real.data.image_size = base.data.image_size
  real.model.crd_width = base.model.crd_width
  real.train.stage3.steps = base.train.stage3.steps
  assert real.to_dict() == base.to_dict()


@pytest.mark.parametrize('field,value,message', [
    ('bottleneck_channels', 4, 'share_weights=False'),
    ('skip_channels', 9, 'identity path'),
    ('skip_channels', 0, 'skip_channels=0'),
])
def test_model_shapes_that_cannot_work_are_refused(field, value, message):
  """A shared encoder reads the image and the previous code, so both need 3
  channels (otherwise Flax fails at init with a bare shape error); a skip
  as wide as 3x the code could carry the previous level losslessly."""
  config = load_config('default')
  config.model[field] = value
  with pytest.raises(validate.ConfigError, match=message):
    validate.validate(config)


def leaves(tree: dict, prefix: str = ''):
  """Dotted names of a config dict's fields."""
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from leaves(value, f'{prefix}{key}.')
    else:
      yield prefix + key


def names_read(package: pathlib.Path) -> set:
  """Every name the package's code reads as `x.name`, `x['name']` or
  `x.get('name', ...)` (code only: comments and docstrings do not count)."""
  names = set()
  for path in package.rglob('*.py'):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Attribute):
        names.add(node.attr)
      elif (isinstance(node, ast.Subscript) and
            isinstance(node.slice, ast.Constant)):
        names.add(node.slice.value)
      elif (isinstance(node, ast.Call) and node.args and
            isinstance(node.func, ast.Attribute) and
            node.func.attr == 'get' and isinstance(node.args[0],
                                                    ast.Constant)):
        names.add(node.args[0].value)
  return names


# Fields read under another name, with the reason. (None today.)
READ_ELSEWHERE = {}


def test_every_config_field_is_read_by_some_code():
  """A field that no code reads does nothing whatever a user sets it to
  (configs/tpu.py once had data.assumed_train_images): each field's last
  name must be read somewhere in rcae_jax/."""
  read = names_read(pathlib.Path(REPO) / 'rcae_jax')
  fields = {f for name in CONFIGS for f in leaves(load_config(name).to_dict())}
  unread = sorted(f for f in fields if f.split('.')[-1] not in read
                  and f not in READ_ELSEWHERE)
  assert not unread, f'config fields no code reads: {unread}'


def test_the_unread_field_check_finds_one():
  read = names_read(pathlib.Path(REPO) / 'rcae_jax')
  assert 'image_quantile' in read and 'assumed_train_images' not in read


def test_configs_do_not_touch_sys_path():
  for name in CONFIGS + ['__init__']:
    text = open(os.path.join(REPO, 'configs', f'{name}.py')).read()
    assert 'sys.path' not in text, name


def test_a_derived_config_loads_from_another_directory(tmp_path):
  """`--config /abs/configs/cpu_real.py` from a folder outside the
  repository: cpu_real loads real_128, which loads default, beside it."""
  result = subprocess.run(
      [sys.executable, '-m', 'rcae_jax.main', '--config',
       os.path.join(REPO, 'configs', 'cpu_real.py'), '--workdir',
       str(tmp_path / 'wd'), '--config.mode=nonsense'],
      capture_output=True, text=True, env=subprocess_env(), timeout=300,
      cwd=tmp_path)
  # The config loaded (so the chain of bases did); validation refused.
  assert "config.mode must be one of" in result.stderr, result.stderr
  assert 'Traceback' not in result.stderr


def test_a_stage_in_epochs_trains_epochs_of_the_real_train_set(
    make_config, tmp_path):
  """8 built-in train images, 1 held out (val_fraction 0.1): 2 epochs of 7
  images at batch 4 are ceil(14 / 4) = 4 steps, logged and saved."""
  from rcae_jax import run  # pylint: disable=g-import-not-at-top
  config = make_config(**{'train.stage1.epochs': 2, 'train.stage1.steps': 99,
                          'train.stage2.epochs': 1})
  loader = run.prepare(config, str(tmp_path))
  assert loader.num_train_examples == 7
  assert config.train.stage1.steps == 4
  assert config.train.stage2.steps == 2  # ceil(7 / 4): its own batch 4.
  assert config.train.stage3.steps == 2  # Not in epochs: unchanged.
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['train']['stage1'] == dict(saved['train']['stage1'], steps=4,
                                          epochs=2)
  assert saved['resolved_data']['num_train_examples'] == 7


def test_negative_epochs_are_refused(make_config):
  with pytest.raises(validate.ConfigError, match='stage2.epochs'):
    validate.validate(make_config(**{'train.stage2.epochs': -1}))


# ------------------------------------------- a workdir's saved config
def test_saved_config_round_trips_with_its_types():
  """config.json -> ConfigDict: tuples come back as tuples, the record
  keys go, data.image_size still takes S or (H, W) on the command line,
  and the mode is 'train' unless --config.mode says otherwise."""
  from rcae_jax import config_files  # pylint: disable=g-import-not-at-top
  config = load_config('benchmark')
  config.data.image_size = (64, 96)
  config.model.depth = 3
  saved = json.loads(json.dumps(dict(config.to_dict(),
                                     resolved_data={'root': 'x'})))
  restored = config_files.from_saved(saved)
  assert restored.benchmark.image_sizes == (256, 1024)
  assert restored.data.image_size == (64, 96)
  assert restored.model.depth == 3 and restored.mode == 'train'
  assert 'resolved_data' not in restored
  restored.data.image_size = 128  # The field keeps its type: object.
  expected = config.to_dict()
  expected.update(mode='train')
  restored.data.image_size = (64, 96)
  assert restored.to_dict() == expected


def test_saved_config_of_an_older_workdir_gets_new_fields_defaults():
  """A workdir written before a field existed loads, the field at its
  default (which keeps the old behaviour), and can be overridden."""
  from rcae_jax import config_files  # pylint: disable=g-import-not-at-top
  saved = load_config('smoke').to_dict()
  del saved['predict']['write_maps']
  del saved['eval']['threshold']
  restored = config_files.from_saved(saved)
  assert restored.predict.write_maps is True
  assert restored.eval.threshold == 'quantile'
  assert restored.model.width == 4  # The saved value, not the default's.
