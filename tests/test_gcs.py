"""gs:// workdirs and data roots, against a fake Cloud Storage.

TPU VMs are deleted after a run, so everything a run writes must reach a
bucket. The fake maps `gs://<bucket>/<key>` to a local folder behind
`etils.epath`'s backend interface (the layer our `fileio` goes through) and
keeps the object store's rules that local files do not have: no append,
no rename. Code that still used local file APIs on a gs:// path would
instead create a folder literally named `gs:` in the working directory,
which the tests check for.

Not covered here, and left to the libraries: Orbax's tensorstore writes
(the end-to-end test points Orbax at the fake bucket's local folder) and
TensorBoard event files (TensorFlow's own gfile).
"""

import io
import json
import os
import shutil

import numpy as np
import pytest
import tensorstore as ts
from etils.epath import backend as epath_backend
from etils.epath import gpath

from conftest import tiny_config
from rcae_jax import run as run_lib
from rcae_jax.common import checkpoints
from rcae_jax.common import fileio
from rcae_jax.common import workdir_lock
from rcae_jax.common import writers
from rcae_jax.data import decode
from rcae_jax.data import folder
from rcae_jax.data import sources
from rcae_jax.evaluation import export_maps


class FakeGcs(epath_backend._OsPathBackend):  # pylint: disable=protected-access
  """gs://bucket/key -> <root>/bucket/key, with object-store rules."""

  def __init__(self, root):
    self.root = str(root)

  def local(self, path) -> str:
    path = os.fspath(path)
    assert path.startswith('gs://'), path
    return os.path.join(self.root, path[len('gs://'):])

  def open(self, path, mode):
    if 'a' in mode or '+' in mode:
      raise io.UnsupportedOperation(f'cannot append to object {path}')
    return super().open(self.local(path), mode)

  def exists(self, path):
    return super().exists(self.local(path))

  def isdir(self, path):
    return super().isdir(self.local(path))

  def listdir(self, path):
    return super().listdir(self.local(path))

  def makedirs(self, path, *, exist_ok=False, mode=None):
    return super().makedirs(self.local(path), exist_ok=exist_ok, mode=mode)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    return super().mkdir(self.local(path), exist_ok=exist_ok, mode=mode)

  def remove(self, path):
    return super().remove(self.local(path))

  def stat(self, path):
    return super().stat(self.local(path))

  def rename(self, path, dst):
    raise AssertionError(f'rename on an object store: {path} -> {dst}')

  replace = rename


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  """The fake bucket store; the test's working directory is a fresh folder
  so that a stray local `gs:` folder is noticed."""
  fake = FakeGcs(tmp_path / 'gcs')
  os.makedirs(fake.root)
  monkeypatch.setattr(gpath, '_PREFIX_TO_BACKEND',
                      dict(gpath._PREFIX_TO_BACKEND, gs=fake))
  # With TensorFlow installed epath would pick tf.io.gfile for gs://.
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  # The workdir lock talks to tensorstore's gcs driver (network): give it
  # the fake bucket's folder, through tensorstore's file driver.
  monkeypatch.setattr(workdir_lock, 'open_store', lambda workdir: (
      ts.KvStore.open({'driver': 'file',
                       'path': fake.local(workdir) + '/'}).result()))
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield fake
  assert not os.listdir(cwd), f'local files written: {os.listdir(cwd)}'


def test_fileio_round_trip(gcs):
  path = 'gs://bucket/run/sub/metrics.json'
  assert not fileio.exists(path)
  fileio.write_json_atomic(path, {'a': 1})
  assert fileio.exists(path) and fileio.read_json(path) == {'a': 1}
  assert fileio.isdir('gs://bucket/run/sub')
  assert fileio.listdir('gs://bucket/run/sub') == ['metrics.json']
  assert fileio.absolute(path) == path
  fileio.remove(path)
  fileio.remove(path)  # Missing: no error.
  assert not fileio.exists(path)
  assert os.path.isdir(os.path.join(gcs.root, 'bucket', 'run', 'sub'))


def test_jsonl_writer_rewrites_instead_of_appending(gcs):
  for start in (0, 2):  # A second writer: a resumed run.
    w = writers.JsonlWriter('gs://bucket/run')
    w.write_scalars(start, {'loss': 1.0})
    w.flush()
    w.write_scalars(start + 1, {'loss': 0.5})
    w.close()
  rows = [json.loads(line) for line in
          fileio.read_text('gs://bucket/run/scalars.jsonl').splitlines()]
  assert [r['step'] for r in rows] == [0, 1, 2, 3]


def test_pictures_and_maps_to_gcs(gcs):
  amap = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
  path = export_maps.map_path('gs://bucket/run', 'cat', '/x/001.png', 'crack')
  export_maps.write_tiff_atomic(path, amap)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(fileio.image_source(path)) as img:
    np.testing.assert_array_equal(np.asarray(img), amap)


def test_checkpointer_keeps_urls():
  # os.path.abspath('gs://b/x') would be '<cwd>/gs:/b/x'.
  assert fileio.absolute('gs://b/x/checkpoints') == 'gs://b/x/checkpoints'
  assert fileio.absolute('rel') == os.path.abspath('rel')


def _synthetic_root(tmp_path) -> str:
  files = sources.resolve_files(tiny_config().data)
  return files.root


def test_discover_and_decode_from_gcs(gcs, tmp_path):
  local = _synthetic_root(tmp_path)
  shutil.copytree(local, os.path.join(gcs.root, 'bucket', 'data'))
  cat = tiny_config().data.category
  remote = folder.discover('gs://bucket/data', cat)
  here = folder.discover(local, cat)
  assert len(remote.train) == len(here.train) > 0
  assert [e.label for e in remote.test] == [e.label for e in here.test]
  np.testing.assert_array_equal(decode.load_image(remote.train[0], 16),
                                decode.load_image(here.train[0], 16))
  bad = [e for e in remote.test if e.mask_path][0]
  assert decode.load_mask(bad.mask_path, decode.image_shape(bad.path)).any()


def test_main_run_with_gcs_workdir_and_data(gcs, tmp_path, monkeypatch):
  """Train, evaluate and pictures with workdir and data on gs://: every
  output lands in the bucket, none on local disk."""
  shutil.copytree(_synthetic_root(tmp_path),
                  os.path.join(gcs.root, 'bucket', 'data'))
  real_init = checkpoints.Checkpointer.__init__

  def local_orbax(self, directory, *args, **kwargs):
    # Orbax writes arrays with tensorstore's own gs:// driver (network):
    # give it the fake bucket's folder, so markers and arrays stay together.
    assert directory.startswith('gs://'), directory
    real_init(self, gcs.local(directory), *args, **kwargs)

  monkeypatch.setattr(checkpoints.Checkpointer, '__init__', local_orbax)
  monkeypatch.setattr(writers, '_clu_writers', lambda: None)
  # Stage 1 only: stages 2 and 3 write through the same code, and compiling
  # them would double the test's time.
  config = tiny_config(**{'data.root': 'gs://bucket/data',
                          'train.stage2.steps': 0, 'train.stage3.steps': 0,
                          'eval.scoring': 'recursion'})
  report = run_lib.run(config, 'gs://bucket/run')
  out = os.path.join(gcs.root, 'bucket', 'run')
  names = set(os.listdir(out))
  assert {'config.json', 'metrics.json', 'results.md', 'scalars.jsonl',
          'thresholds.json', 'model_report.json', 'pictures',
          'checkpoints'} <= names, names
  assert os.path.exists(os.path.join(out, 'checkpoints', 'TRAINING_COMPLETE'))
  assert not os.path.exists(os.path.join(out, workdir_lock.LOCK_NAME))
  metrics = fileio.read_json('gs://bucket/run/metrics.json')
  category = config.data.category
  assert metrics[category]['image_auroc'] == report[category]['image_auroc']
  rows = [json.loads(r) for r in
          fileio.read_text('gs://bucket/run/scalars.jsonl').splitlines()]
  # Every training step's row reached the bucket, and the evaluation is
  # logged at the last global step (one x-axis for all scalars).
  assert {r['step'] for r in rows if 'stage1/loss' in r} == {1, 2, 3}
  assert [r['step'] for r in rows if 'eval/image_auroc' in r] == [3]
  assert any(n.endswith('.png') for _, _, fs in
             os.walk(os.path.join(out, 'pictures')) for n in fs)


def test_raw_visa_on_gcs_is_refused_clearly(gcs):
  config = tiny_config(**{'data.root': 'gs://bucket/visa',
                          'data.format': 'visa'})
  with pytest.raises(folder.DataError, match='local copy only'):
    sources.resolve_files(config.data)
