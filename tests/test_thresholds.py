"""Thresholds a user can choose (eval.threshold): the label-free quantile
(default), F1-optimal on a labelled split held out of the test set, or a
fixed value; thresholds.json says which ('method')."""

import json
import os
import shutil

import numpy as np
import pytest

from rcae_jax import run as run_lib
from rcae_jax import validate
from rcae_jax.data import folder


def read(workdir, name):
  with open(os.path.join(workdir, name), encoding='utf-8') as f:
    return json.load(f)


def evaluate_copy(trained, tmp_path, **overrides):
  """Evaluates a copy of the session's trained workdir with `overrides`
  (the original stays as the other tests expect it)."""
  config, workdir = trained
  copy = str(tmp_path / 'wd')
  shutil.copytree(workdir, copy)
  config = config.copy_and_resolve_references()
  config.mode = 'evaluate'
  for key, value in overrides.items():
    section, name = key.split('.')
    config[section][name] = value
  run_lib.run(config, copy)
  return read(copy, 'thresholds.json'), read(copy, 'metrics.json'), config


def test_default_is_the_label_free_quantile(trained):
  thresholds = read(trained[1], 'thresholds.json')
  assert thresholds['method'] == 'quantile'
  assert thresholds['pixel_method'] == 'quantile'
  assert thresholds['source'] == 'held-out good training images'


def test_fixed_value(trained, tmp_path):
  quantile = read(trained[1], 'thresholds.json')
  thresholds, _, _ = evaluate_copy(trained, tmp_path, **{
      'eval.threshold': 'fixed', 'eval.fixed_image_threshold': 0.123})
  assert thresholds['method'] == 'fixed' and thresholds['image'] == 0.123
  # No pixel value given: the quantile's stays.
  assert thresholds['pixel_method'] == 'quantile'
  assert thresholds['pixel'] == pytest.approx(quantile['pixel'])


def test_f1_on_a_labelled_split_never_reported(trained, tmp_path):
  """The smoke test set: 4 good, 8 defective. A quarter of each label (1
  and 2) chooses the thresholds; metrics.json covers the other 9."""
  thresholds, metrics, _ = evaluate_copy(trained, tmp_path, **{
      'eval.threshold': 'f1'})
  assert thresholds['method'] == 'f1' and thresholds['pixel_method'] == 'f1'
  assert thresholds['validation_images'] == 3
  assert metrics['synthetic']['num_test_images'] == 9
  assert 0 < thresholds['validation_image_f1'] <= 1
  quantile = read(trained[1], 'thresholds.json')
  assert thresholds['image'] != quantile['image']


def example(path, label):
  return folder.TestExample(path, label, 'good' if label == 0 else 'crack',
                            None)


def category(good: int, bad: int):
  test = tuple(example(f'g{i}', 0) for i in range(good)) + tuple(
      example(f'd{i}', 1) for i in range(bad))
  return folder.CategoryFiles('root', 'cat', ('t',), test, False)


def test_held_out_split_is_per_label_disjoint_and_seeded():
  files = category(good=8, bad=4)
  rest, held = run_lib.hold_out_labelled(files, 0.25, seed=3)
  assert sorted(e.label for e in held) == [0, 0, 1]
  assert not {e.path for e in held} & {e.path for e in rest.test}
  assert len(held) + len(rest.test) == 12
  again = run_lib.hold_out_labelled(files, 0.25, seed=3)[1]
  assert again == held
  # At least one of each label stays to be measured.
  _, held = run_lib.hold_out_labelled(category(good=2, bad=2), 0.9, seed=0)
  assert sorted(e.label for e in held) == [0, 1]


def test_f1_needs_two_images_of_each_label():
  with pytest.raises(folder.DataError, match='two defective'):
    run_lib.hold_out_labelled(category(good=5, bad=1), 0.25, seed=0)


@pytest.mark.parametrize('overrides,message', [
    ({'eval.threshold': 'best'}, 'config.eval.threshold must be one of'),
    ({'eval.threshold': 'f1', 'eval.f1_val_fraction': 1.0},
     'f1_val_fraction'),
    ({'eval.threshold': 'fixed'}, 'fixed_image_threshold > 0'),
    ({'eval.image_quantile': 1.5}, 'image_quantile must lie in'),
])
def test_bad_threshold_settings_are_one_line(make_config, overrides,
                                             message):
  with pytest.raises(validate.ConfigError, match=message):
    validate.validate(make_config(**overrides))


def test_f1_on_a_good_only_category_says_what_to_use(make_config, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  good = tmp_path / 'data' / 'cat' / 'train' / 'good'
  good.mkdir(parents=True)
  for i in range(3):
    Image.fromarray(np.full((32, 32, 3), i * 40, np.uint8)).save(
        good / f'{i}.png')
  config = make_config(**{'eval.threshold': 'f1',
                          'data.root': str(tmp_path / 'data'),
                          'data.category': 'cat'})
  with pytest.raises(folder.DataError, match="eval.threshold='quantile'"):
    run_lib.prepare(config, str(tmp_path / 'wd'))
