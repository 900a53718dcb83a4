"""common/programs.py: the per-process memo of jitted programs, and the
keys make_step and make_predict_fn file them under."""

import conftest
from rcae_jax.common import programs
from rcae_jax.evaluation import maps as maps_lib
from rcae_jax.model import inference
from rcae_jax.training import train


def test_memo_makes_once_per_key_and_forgets_the_oldest():
  memo, made = programs.Memo(maxsize=2), []

  def make(name):
    return lambda: made.append(name) or name

  assert memo.get('a', make('a')) == 'a'
  assert memo.get('a', make('a again')) == 'a'
  memo.get('b', make('b'))
  memo.get('a', make('a again'))  # Now 'b' is the oldest.
  memo.get('c', make('c'))
  memo.get('a', make('a again'))
  memo.get('b', make('b again'))
  assert made == ['a', 'b', 'c', 'b again']


def test_config_key_sees_every_field_of_its_sections():
  config = conftest.tiny_config()
  key = programs.config_key(config, 'seed', 'train')
  assert programs.config_key(conftest.tiny_config(), 'seed', 'train') == key
  config.train.stage3.input_dropout = 0.5  # Nested, as any field may be.
  assert programs.config_key(config, 'seed', 'train') != key
  config = conftest.tiny_config(**{'eval.batch_size': 3})
  assert programs.config_key(config, 'seed', 'train') == key  # Not read.


def test_step_and_predict_programs_are_shared_only_for_equal_settings():
  config = conftest.tiny_config()
  nets = inference.build_networks(config.model)
  step = train.make_step(config, 3, nets)
  assert train.make_step(conftest.tiny_config(), 3, nets) is step
  assert train.make_step(config, 2, nets) is not step
  assert train.make_step(config, 3, nets, reuse=False) is not step
  other = conftest.tiny_config(**{'anomalies.noise_fraction': 0.25})
  assert train.make_step(other, 3, nets) is not step
  predict = maps_lib.make_predict_fn(config, nets)
  assert maps_lib.make_predict_fn(conftest.tiny_config(), nets) is predict
  assert maps_lib.make_predict_fn(
      conftest.tiny_config(**{'eval.map_sigma': 2.0}), nets) is not predict
  fused = conftest.tiny_config(**{'eval.scoring': 'fused'})
  medians = {'crd': 0.5, 'recursion': 0.1}
  assert maps_lib.make_predict_fn(fused, nets, medians) is (
      maps_lib.make_predict_fn(fused, nets, dict(medians)))
  assert maps_lib.make_predict_fn(fused, nets, medians) is not (
      maps_lib.make_predict_fn(fused, nets, {'crd': 0.5, 'recursion': 0.2}))
