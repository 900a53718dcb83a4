"""Training steps: learning, freezing, checkpoints, resume, end to end."""

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from rcae_jax import run as run_lib
from rcae_jax.data import sources
from rcae_jax.evaluation import loops
from rcae_jax.evaluation import maps as maps_lib
from rcae_jax.evaluation import metrics as metrics_lib
from rcae_jax.evaluation import learning_curves
from rcae_jax.model import inference
from rcae_jax.serving import params as params_lib
from rcae_jax.training import nonfinite
from rcae_jax.common import programs
from rcae_jax.common import sharding
from rcae_jax.training import train
from rcae_jax.training import train_state


def fixed_batch(seed=0, size=32, b=4):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  imgs = [0.5 + 0.3 * np.sin(2 * np.pi * 4 * (xx + rng.uniform()))[..., None]
          * np.ones(3) for _ in range(b)]
  return {'image': (np.stack(imgs) * 255).astype(np.uint8)}


def setup_stage(config, stage, mesh=None, reuse=True):
  nets = inference.build_networks(config.model)
  # As a run makes them: one program, shared through the compilation cache
  # by every test here (op by op, flax's init took ~10 s per test).
  state, frozen = train.create_state(config, stage, nets, mesh)
  step_fn = train.make_step(config, stage, nets, mesh, reuse=reuse)
  return state, frozen, step_fn


@pytest.mark.slow
def test_stage1_loss_decreases_on_a_fixed_batch(make_config):
  # The default learning rate and test_sharding.py's batch of 8: the step
  # program is one the suite compiles anyway (a rate is a constant in it).
  config = make_config(**{'train.batch_size': 8})
  state, frozen, step_fn = setup_stage(config, 1)
  batch = fixed_batch(b=8)
  losses = []
  for step in range(90):
    state, m = step_fn(state, frozen, batch, train.step_rng(0, 1, step),
                       step)
    losses.append(float(m['loss']))
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_initial_params_are_memoised_as_new_arrays(make_config,
                                                   monkeypatch):
  """A second run in the process reuses the first's initial parameters
  (no second init program), each call gets arrays of its own (the step
  donates them), and another seed gets other values."""
  config = make_config()
  nets = inference.build_networks(config.model)
  first = train.initial_params(nets, config)
  expected = jax.device_get(first)
  jax.tree.map(lambda a: a.delete(), first)  # As a donating step would.
  monkeypatch.setattr(programs, 'run_unoptimised',
                      lambda *a: pytest.fail('initialised again'))
  second = train.initial_params(nets, config)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(second),
               expected)
  monkeypatch.undo()
  other = jax.device_get(train.initial_params(
      nets, make_config(seed=config.seed + 1)))
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(other), jax.tree.leaves(expected)))


def snapshot(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


@pytest.mark.parametrize('stage', [2, 3])
def test_earlier_stages_stay_frozen(make_config, stage):
  """Steps taken as loop.run_stage takes them (a one-device mesh, the
  key made in the program, the health count fed back), so the programs
  are the trained workdir's, from the compilation cache."""
  config = make_config()
  mesh = sharding.make_mesh(1)
  # A fresh program (not one an earlier test stepped), to count its own.
  state, frozen, step_fn = setup_stage(config, stage, mesh, reuse=False)
  before = snapshot(train_state.join(state, frozen, stage).params)
  health = None
  for step in range(2):
    state, m = step_fn(state, frozen,
                       sharding.to_global(fixed_batch(step), mesh), None,
                       step, health)
    health = {k: m[k] for k in nonfinite.HEALTH_KEYS}
  # One program for the stage: the first step's fresh health count has the
  # type of the ones that follow (it once had not: two compiles a stage).
  assert step_fn.jitted._cache_size() == 1  # pylint: disable=protected-access
  after = snapshot(train_state.join(state, frozen, stage).params)
  trained = train_state.STAGES[stage - 1]
  for name in train_state.STAGES:
    same = jax.tree.all(jax.tree.map(np.array_equal, before[name], after[name]))
    assert same == (name != trained), name


def test_stage_gradients_cover_only_their_component(make_config):
  """Frozen by construction: the stage-2 jaxpr differentiates DPN only."""
  config = make_config()
  state, frozen, _ = setup_stage(config, 2)
  assert set(frozen) == {'rcae', 'crd'}
  nets = inference.build_networks(config.model)
  tx = train_state.make_optimizer(config.train.stage2)
  _, metrics_shape = jax.eval_shape(
      lambda s, f, b: train.train_step(
          s, f, b, jax.random.PRNGKey(0), nonfinite.healthy(),
          loss_fn=functools.partial(train.stage2_loss, nets=nets), tx=tx),
      state, frozen, fixed_batch())
  assert {'loss', 'grad_norm'} <= set(metrics_shape)
  opt_leaves = jax.tree.leaves(state.opt_state)
  dpn_size = sum(x.size for x in jax.tree.leaves(state.params))
  # Adam keeps two moments of exactly the DPN parameters, nothing more.
  assert sum(x.size for x in opt_leaves if x.ndim) == 2 * dpn_size


def test_stage1_depth_draw_is_uniform_and_reproducible():
  draws = [train.stage1_depth(0, s, 4) for s in range(400)]
  assert set(draws) == {1, 2, 3, 4}
  assert draws == [train.stage1_depth(0, s, 4) for s in range(400)]


def test_main_run_writes_metrics_checkpoint_and_resumes(trained):
  # The session's trained workdir (conftest.py): the smoke config with
  # learning curves, a test-set point every 2 steps and at each stage end,
  # each stage scored with what it has.
  config, workdir = trained
  assert config.eval.every_steps == 2
  report = json.load(open(os.path.join(workdir, 'metrics.json')))
  rows = [json.loads(l) for l in
          open(os.path.join(workdir, 'scalars.jsonl')).read().splitlines()]
  points = [(r['step'], r['curve/stage']) for r in rows if 'curve/stage' in r]
  assert points == [(2, 1), (3, 1), (5, 2), (7, 3)]
  assert all(r['curve/wall_minutes'] > 0 for r in rows if 'curve/stage' in r)
  png = os.path.join(workdir, 'pictures', 'learning_curves.png')
  assert os.path.getsize(png) > 1000  # Drawn at the end of training.
  assert os.listdir(os.path.join(workdir, 'tensorboard'))  # The default.
  (category, metrics), = report.items()
  assert category == 'synthetic'
  # The reported numbers are those of the maps the run wrote and of the
  # test labels as the folders give them: a constant map, a swapped label,
  # a misaligned or inverted mask fail here. (8 steps detect nothing yet:
  # that a trained model beats a noise map is test_reliability's, at 200.)
  files = sources.resolve_files(config.data, seed=config.seed)
  maps = conftest.assert_pixel_metrics_are_the_maps(
      metrics, workdir, category, files)
  assert not any(np.allclose(a, b) for a, b in zip(maps, maps[1:]))
  labels = [0 if os.path.basename(os.path.dirname(e.path)) == 'good' else 1
            for e in files.test]
  params = params_lib.load_params(config, workdir)
  loader = run_lib.prepare(config, workdir)
  _, scores, _, _, _ = loops.run_predictions(
      params, loader, config, 'test', maps_lib.make_predict_fn(config))
  assert metrics['image_auroc'] == pytest.approx(
      metrics_lib.compute_metrics(labels, scores)['image_auroc'], abs=1e-9)
  # The last learning-curve point scores the final parameters.
  last = [r for r in rows if 'curve/stage' in r][-1]
  assert last['curve/pixel_auroc'] == pytest.approx(metrics['pixel_auroc'])
  assert metrics['training_complete'] is True
  saved = json.load(open(os.path.join(workdir, 'config.json')))
  assert os.path.isdir(os.path.join(saved['resolved_data']['root'],
                                    'synthetic', 'train', 'good'))
  ckpts = os.listdir(os.path.join(workdir, 'checkpoints'))
  total = sum(config.train[f'stage{s}'].steps for s in (1, 2, 3))
  assert str(total) in ckpts
  assert os.path.exists(os.path.join(workdir, 'scalars.jsonl'))

  # Rerun: every stage is complete, so no training step runs again.
  lines = open(os.path.join(workdir, 'scalars.jsonl')).read().splitlines()
  report2 = run_lib.run(config, workdir)
  lines2 = open(os.path.join(workdir, 'scalars.jsonl')).read().splitlines()
  new = [json.loads(l) for l in lines2[len(lines):]]
  assert not any(k.startswith('stage') for row in new for k in row)
  # Same parameters, same numbers; metrics.json is what run() returned.
  assert json.loads(json.dumps(report2)) == report
  on_disk = json.load(open(os.path.join(workdir, 'metrics.json')))
  assert on_disk == report


@pytest.mark.slow
def test_resume_mid_stage_matches_straight_run(make_config, tmp_path):
  straight = make_config(**{'train.stage1.steps': 4,
                            'train.stage2.steps': 0, 'train.stage3.steps': 0,
                            'eval.scoring': 'recursion'})
  a = run_lib.run(straight, str(tmp_path / 'a'))
  # Interrupted after 2 steps (a checkpoint), then resumed to 4.
  first = make_config(**{'train.stage1.steps': 2, 'train.stage2.steps': 0,
                         'train.stage3.steps': 0, 'eval.scoring': 'recursion'})
  run_lib.run(first, str(tmp_path / 'b'))
  b = run_lib.run(straight, str(tmp_path / 'b'))
  assert a == b


def test_resumed_learning_curve_carries_on_in_wall_time(make_config,
                                                         tmp_path):
  stage1 = lambda steps: make_config(**{
      'train.stage1.steps': steps, 'train.stage2.steps': 0,
      'train.stage3.steps': 0, 'eval.scoring': 'recursion',
      'eval.every_steps': 2})
  workdir = str(tmp_path / 'wd')
  run_lib.run(stage1(2), workdir)
  # The first run's point says it came after 1000 minutes (a long run,
  # then preempted); the resumed run's point must come later, not restart
  # at 0 with the new process.
  path = os.path.join(workdir, 'scalars.jsonl')
  rows = [json.loads(l) for l in open(path).read().splitlines()]
  for row in rows:
    if 'curve/wall_minutes' in row:
      row['curve/wall_minutes'] = 1000.0
  with open(path, 'w') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in rows))
  run_lib.run(stage1(4), workdir)
  walls = {p['step']: p['curve/wall_minutes']
           for p in learning_curves.read_points(workdir)}
  assert sorted(walls) == [2, 4]
  assert 1000.0 < walls[4] < 1010.0


def test_multi_category_run_skips_finished_and_writes_mean(make_config,
                                                           tmp_path,
                                                           monkeypatch):
  from rcae_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  config = make_config(**{'train.stage1.steps': 2, 'train.stage2.steps': 0,
                          'train.stage3.steps': 0,
                          'eval.scoring': 'recursion',
                          'eval.export_maps': False,
                          'eval.pictures_per_type': 0})
  # Two categories: the built-in one generated twice with different seeds.
  root = tmp_path / 'data'
  for name, seed in (('a', 1), ('b', 2)):
    src = synthetic.ensure(str(tmp_path / f'cache{seed}'), seed=seed, size=32,
                           n_train=6, n_test_good=2, n_per_defect=1)
    os.makedirs(root, exist_ok=True)
    os.rename(os.path.join(src, synthetic.CATEGORY), root / name)
  config.data.root = str(root)
  config.data.categories = ('a', 'b')
  workdir = tmp_path / 'wd'
  # The second category reuses the first's step and predict programs.
  built = {'steps': 0, 'predict': 0}
  monkeypatch.setattr(train, '_STEPS', programs.Memo(maxsize=16))
  monkeypatch.setattr(maps_lib, '_PREDICT_FNS', programs.Memo(maxsize=16))
  build_step, predict_cls = train._build_step, maps_lib.PredictFn  # pylint: disable=protected-access

  def counted(name, fn):
    def call(*args, **kwargs):
      built[name] += 1
      return fn(*args, **kwargs)
    return call

  monkeypatch.setattr(train, '_build_step', counted('steps', build_step))
  monkeypatch.setattr(maps_lib, 'PredictFn', counted('predict', predict_cls))
  report = run_lib.run(config, str(workdir))
  assert built == {'steps': 1, 'predict': 1}, built  # Stage 1 only.
  assert set(report) == {'a', 'b', 'mean'}
  mean = (report['a']['pixel_auroc'] + report['b']['pixel_auroc']) / 2
  assert abs(report['mean']['pixel_auroc'] - mean) < 1e-12
  assert '| mean |' in (workdir / 'results.md').read_text()
  # Rerun: both categories are skipped (their metrics.json are reused).
  stamp = os.path.getmtime(workdir / 'a' / 'metrics.json')
  assert run_lib.run(config, str(workdir)) == report
  assert os.path.getmtime(workdir / 'a' / 'metrics.json') == stamp


def test_random_crop_takes_one_window_per_image():
  x = jnp.arange(2 * 8 * 8 * 1, dtype=jnp.float32).reshape(2, 8, 8, 1)
  crops = np.asarray(train.random_crop(x, jax.random.PRNGKey(0), 4))
  assert crops.shape == (2, 4, 4, 1)
  for img, crop in zip(np.asarray(x), crops):
    y0, x0 = np.argwhere(img[..., 0] == crop[0, 0, 0])[0]
    np.testing.assert_array_equal(img[y0:y0 + 4, x0:x0 + 4], crop)
  assert train.random_crop(x, jax.random.PRNGKey(0), 0) is x


def test_cosine_schedule_warms_up_then_decays(make_config):
  stage = make_config().train.stage1
  stage.update(dict(schedule='cosine', warmup_steps=10, steps=100,
                    learning_rate=1e-3))
  lr = train_state.learning_rate(stage)
  assert lr(0) == 0.0 and abs(lr(10) - 1e-3) < 1e-9
  assert 0 < lr(55) < 1e-3 and lr(100) < 1e-6


def conv_output_sides(step_fn, *args) -> set:
  """The spatial sizes (h, w) of every convolution's output in the traced
  step: what the networks ran on. (The step number, last, is a host int.)"""
  text = str(jax.make_jaxpr(step_fn, static_argnums=len(args) - 1)(*args))
  return {(int(h), int(w)) for h, w in re.findall(
      r'\[\d+,(\d+),(\d+),\d+\] = conv_general_dilated', text)}


@pytest.mark.slow
def test_stage_steps_train_on_crops(make_config):
  """train.crop_size: every stage's step runs its networks on random crops
  of the batch (the 32 px smoke images, 16 px crops), not on the whole
  images, and gives a finite loss and a gradient."""
  config = make_config(**{'train.crop_size': 16,
                          'anomalies.noise_fraction': 0.5})
  for stage in (1, 3):
    state, frozen, step_fn = setup_stage(config, stage)
    args = (frozen, fixed_batch(), train.step_rng(0, stage, 0), 0)
    # The sides at the input resolution (the first convolution's) must be
    # the crop's; with crop_size ignored they would be 32.
    sides = conv_output_sides(step_fn, state, *args)
    assert max(sides) == (16, 16), sides
    state, m = step_fn(state, *args)
    assert np.isfinite(float(m['loss'])) and float(m['grad_norm']) > 0
