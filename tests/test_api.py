"""The Python API (rcae_jax/api.py): a Detector loaded from a workdir the
CLI trained scores arrays as --config.mode=predict scores files, every
bad input is one DetectorError naming what is wrong, and the public names
are documented."""

import importlib.util
import inspect
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import rcae_jax
from rcae_jax import api
from rcae_jax import run as run_lib

from conftest import set_fields, subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def detector(trained):
  return api.Detector.load(trained[1])


def _frames(seed=0, n=3, hw=(32, 32)):
  return np.random.default_rng(seed).integers(0, 256, (n, *hw, 3), np.uint8)


def test_scores_are_predict_modes(trained, detector, tmp_path):
  # Images of other sizes than the model's, as a camera would give them.
  images = [_frames(1, 1, (40, 56))[0], _frames(2, 1, (24, 30))[0],
            _frames(3, 1, (32, 32))[0]]
  folder = tmp_path / 'in'
  folder.mkdir()
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / f'{i}.png')
  config, workdir = trained
  cfg = set_fields(config.copy_and_resolve_references(), **{
      'mode': 'predict', 'predict.inputs': str(folder),
      'predict.output': str(tmp_path / 'out')})
  rows = sorted(run_lib.run(cfg, workdir)['predictions'],
                key=lambda r: r['name'])
  result = detector.score(images)
  np.testing.assert_allclose(result.scores, [r['score'] for r in rows],
                             rtol=1e-6, atol=1e-7)
  assert result.decisions == [r['decision'] for r in rows]
  for amap, image, row in zip(result.maps, images, rows):
    assert amap.shape == image.shape[:2]
    np.testing.assert_allclose(amap, np.asarray(Image.open(row['map'])),
                               rtol=1e-6, atol=1e-7)
  for amap, mask in zip(result.maps, result.pixel_masks):
    np.testing.assert_array_equal(mask,
                                  amap >= detector.thresholds['pixel'])


def test_every_input_form_gives_the_same_scores(detector, tmp_path):
  batch = _frames(4, n=10)  # More than eval.batch_size (8): two batches.
  want = detector.score(batch).scores
  paths = []
  for i, image in enumerate(batch):
    paths.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(image).save(paths[-1])
  forms = {'list of arrays': list(batch),
           'float in [0, 1]': batch.astype(np.float32) / 255.0,
           'PIL images': [Image.fromarray(x) for x in batch],
           'paths': paths}
  for name, images in forms.items():
    np.testing.assert_allclose(detector.score(images).scores, want,
                               rtol=1e-6, err_msg=name)
  one = detector.score(batch[0])
  assert len(one) == 1 and one.scores[0] == pytest.approx(want[0], rel=1e-6)
  grey = batch[0, ..., 0]
  rgb_grey = np.repeat(grey[..., None], 3, -1)
  for image in (grey, grey[..., None]):
    assert detector.score(image).scores[0] == pytest.approx(
        detector.score(rgb_grey).scores[0], rel=1e-6)


@pytest.mark.parametrize('images, message', [
    ([], 'the list is empty'),
    (np.zeros((0, 32, 32, 3), np.uint8), 'the batch is empty'),
    (np.zeros((32, 32, 5), np.uint8), r'shape \(32, 32, 5\)'),
    (np.zeros((32, 32, 3), np.int64), 'dtype int64'),
    (np.full((32, 32, 3), 2.0, np.float32), r'must lie in \[0, 1\]'),
    ([np.zeros((2, 32, 32, 3), np.uint8)], 'item 0 of the list is a batch'),
    ('/no/such/frame.png', 'frame.png'),
    ({'image': 1}, 'a dict'),
])
def test_bad_inputs_raise_one_error_type(detector, images, message):
  with pytest.raises(api.DetectorError, match=message):
    detector.score(images)
  assert issubclass(api.DetectorError, ValueError)


def test_bad_workdirs_and_overrides_name_the_problem(trained, tmp_path):
  with pytest.raises(api.DetectorError, match='does not exist'):
    api.Detector.load(str(tmp_path / 'missing'))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(api.DetectorError, match='no config.json'):
    api.Detector.load(str(empty))
  untrained = tmp_path / 'untrained'
  untrained.mkdir()
  shutil.copy(os.path.join(trained[1], 'config.json'), untrained)
  with pytest.raises(api.DetectorError, match='no checkpoint'):
    api.Detector.load(str(untrained))
  with pytest.raises(api.DetectorError, match="'eval.nope'"):
    api.Detector.load(trained[1], **{'eval.nope': 1})
  with pytest.raises(api.DetectorError, match='does not exist'):
    api.train(str(tmp_path / 'wd'), str(tmp_path / 'no_config.py'))


def test_public_names_have_docstrings_and_type_hints():
  for name in rcae_jax.__all__:
    obj = getattr(rcae_jax, name)
    assert inspect.getdoc(obj), f'{name} has no docstring'
    members = [obj] if inspect.isfunction(obj) else [
        m for n, m in vars(obj).items()
        if not n.startswith('_') and (inspect.isfunction(m) or
                                      isinstance(m, classmethod))]
    for member in members:
      fn = getattr(member, '__func__', member)
      assert inspect.getdoc(fn), f'{name}.{fn.__name__} has no docstring'
      hints = inspect.get_annotations(fn)
      params = [p for p in inspect.signature(fn).parameters
                if p not in ('self', 'cls')]
      missing = [p for p in params + ['return'] if p not in hints]
      assert not missing, f'{name}.{fn.__name__} lacks hints: {missing}'


def test_importing_the_package_does_not_import_jax():
  # main.py's --help stays fast: the API is imported on first use.
  code = 'import sys, rcae_jax; print("jax" in sys.modules)'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, env=subprocess_env(), check=True)
  assert out.stdout.strip() == 'False'


def test_the_example_runs(trained, tmp_path, capsys):
  # On a copy of the trained workdir: train() resumes it (nothing left to
  # train), evaluates it, and the example scores and draws as it would.
  config, source = trained
  workdir = str(tmp_path / 'wd')
  shutil.copytree(source, workdir)
  spec = importlib.util.spec_from_file_location(
      'quickstart', os.path.join(REPO, 'examples', 'quickstart.py'))
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  steps = {f'train.stage{s}.steps': config.train[f'stage{s}'].steps
           for s in (1, 2, 3)}
  result = example.main(workdir, config, **steps, **{'eval.every_steps': 0})
  assert len(result) == 2
  assert os.path.getsize(os.path.join(workdir, 'quickstart_overlay.png'))
  out = capsys.readouterr().out
  assert 'stained: score' in out and 'overlay:' in out
