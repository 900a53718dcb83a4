"""Test set-up: fake CPU devices, a private data cache, tiny configs."""

import atexit
import os
import shutil
import sys
import tempfile

# Before JAX starts: 8 fake CPU devices for the sharding tests, and XLA:CPU
# compiling without its LLVM optimisations: the tests' smoke-sized programs
# run for milliseconds, and compiling them is most of the suite's time
# (measured: 14 step and pinned-number tests, 118 s -> 85 s on 2 cores; the
# pinned numbers hold to their tolerances either way). Quiet TF.
# Subprocesses run the command line as users do, on one device: the same
# flags less the fake devices (which JAX leaves out of its compilation-cache
# key, so a subprocess loads what the tests compiled in-process).
SUBPROCESS_XLA_FLAGS = '--xla_backend_optimization_level=0'
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      + SUBPROCESS_XLA_FLAGS)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
# One persistent compilation cache for the whole run, this process and every
# subprocess (they inherit the environment): the tests build the same smoke
# programs many times over, and on XLA:CPU compiling is most of their cost.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _JIT_CACHE = tempfile.mkdtemp(prefix='rcae_jax_test_jit_cache_')
  atexit.register(shutil.rmtree, _JIT_CACHE, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _JIT_CACHE
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'configs'))

import pytest  # pylint: disable=g-import-not-at-top


def subprocess_env(**extra) -> dict:
  """Environment of a `python -m rcae_jax...` subprocess: the repository
  on the path, CPU, one device (XLA_FLAGS in `extra` to have more), the
  session's compilation cache (inherited from os.environ)."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
             XLA_FLAGS=SUBPROCESS_XLA_FLAGS)
  env.update(extra)
  return env


# Runs rcae_jax.main with the TF stack (and clu, which some accelerator
# images lack too) made unimportable: a None entry in sys.modules makes
# `import X` raise ImportError and importlib.util.find_spec(X) return None,
# exactly as when X is not installed.
BLOCKING_RUNNER = '''
import runpy, sys
BLOCKED = ('tensorflow', 'tensorflow_datasets', 'clu', 'tensorboard')
for name in BLOCKED:
  sys.modules[name] = None
sys.argv = ['rcae_jax.main'] + sys.argv[1:]
try:
  runpy.run_module('rcae_jax.main', run_name='__main__', alter_sys=True)
finally:
  for name in BLOCKED:
    assert sys.modules.get(name) is None, name
'''


def pytest_addoption(parser):
  parser.addoption(
      '--compile-stats', default='', metavar='FILE',
      help='append one tab-separated row per test to FILE: node id, wall s, '
      'CPU s of this process, CPU s of its finished subprocesses, XLA '
      'backend-compile s, number of compiles, tracing s, lowering s (from '
      "jax.monitoring's events): where the suite's time goes")


_COMPILE_EVENTS = ('/jax/core/compile/backend_compile_duration',
                   '/jax/core/compile/jaxpr_trace_duration',
                   '/jax/core/compile/jaxpr_to_mlir_module_duration')


# Running totals of _COMPILE_EVENTS, {event: [seconds, count]}, once
# --compile-stats has registered their listener.
_COMPILE_TOTALS = {}


def _cpu_seconds(who) -> float:
  import resource  # pylint: disable=g-import-not-at-top
  r = resource.getrusage(who)
  return r.ru_utime + r.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """With --compile-stats FILE: the test's row (pytest_addoption), its
  fixtures' set-up included (a shared trained workdir counts where it is
  built)."""
  del nextitem
  path = item.config.getoption('--compile-stats')
  if not path:
    yield
    return
  import resource  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  if not _COMPILE_TOTALS:
    from jax import monitoring  # pylint: disable=g-import-not-at-top
    _COMPILE_TOTALS.update({e: [0.0, 0] for e in _COMPILE_EVENTS})

    def listener(event, duration, **_):
      if event in _COMPILE_TOTALS:
        _COMPILE_TOTALS[event][0] += duration
        _COMPILE_TOTALS[event][1] += 1
    monitoring.register_event_duration_secs_listener(listener)
  before = {e: list(v) for e, v in _COMPILE_TOTALS.items()}
  t0 = time.time()
  c0 = _cpu_seconds(resource.RUSAGE_SELF)
  k0 = _cpu_seconds(resource.RUSAGE_CHILDREN)
  yield
  (backend_s, compiles), (trace_s, _), (lower_s, _) = (
      [_COMPILE_TOTALS[e][i] - before[e][i] for i in (0, 1)]
      for e in _COMPILE_EVENTS)
  row = [item.nodeid, time.time() - t0,
         _cpu_seconds(resource.RUSAGE_SELF) - c0,
         _cpu_seconds(resource.RUSAGE_CHILDREN) - k0, backend_s, compiles,
         trace_s, lower_s]
  with open(path, 'a', encoding='utf-8') as f:
    f.write('\t'.join(f'{v:.2f}' if isinstance(v, float) else str(v)
                      for v in row) + '\n')


@pytest.fixture(scope='session', autouse=True)
def _private_cache(tmp_path_factory):
  """The built-in category goes to a temp folder, never ~/.cache."""
  os.environ['RCAE_JAX_CACHE'] = str(tmp_path_factory.mktemp('cache'))


def load_config(name: str):
  """get_config() of configs/<name>.py, loaded by path as `--config` does."""
  from rcae_jax import config_files  # pylint: disable=g-import-not-at-top
  return config_files.load(os.path.join(REPO, 'configs', f'{name}.py'))


def set_fields(config, **fields):
  """Sets dotted fields ('eval.scoring': 'fused') on `config` in place;
  returns it."""
  for key, value in fields.items():
    target = config
    *path, last = key.split('.')
    for p in path:
      target = target[p]
    target[last] = value
  return config


def tiny_config(**overrides):
  """configs/smoke.py (seconds on one CPU core) with dotted overrides."""
  import smoke  # configs/smoke.py  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  config.mesh.num_devices = 1  # conftest fakes 8 devices; tests opt in.
  return set_fields(config, **overrides)


@pytest.fixture
def make_config():
  return tiny_config


def tiny_model_config(name: str = 'default', size: int = 32):
  """configs/<name>.py with the smallest network of every part (depth 2,
  4 channels, one residual block) at `size` px: for the tests that
  compile the model but train nothing (export, benchmark)."""
  config = load_config(name)
  m = config.model
  m.depth, m.width, m.num_res_blocks = 2, 4, 1
  m.dpn_width, m.crd_width = 4, 4
  config.data.image_size = size
  return config


def tiny_benchmark_config():
  """configs/benchmark.py at tiny_model_config's size, one image size, two
  batch sizes and dtypes, one warm-up and two timed calls."""
  config = tiny_model_config('benchmark')
  b = config.benchmark
  b.image_sizes, b.batch_sizes = (32,), (1, 2)
  b.dtypes = ('float32', 'bfloat16')
  b.warmup, b.iters = 1, 2
  return config


# ------------------------------------------------------------ test images

def write_image(path, array, **save_kwargs) -> None:
  """Saves a numpy image with Pillow, creating its folder."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  Image.fromarray(array).save(path, **save_kwargs)


# A dark, slightly noisy surface with bright defects: a model whose map is
# the brightness (brightness_predict_fn) detects them perfectly.
DARK, BRIGHT = 40, 220


def surface(rng, hw):
  """uint8 [h, w, 3]: the dark surface, +-6 grey levels of noise."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  noise = rng.integers(-6, 7, tuple(hw) + (3,))
  return np.clip(DARK + noise, 0, 255).astype(np.uint8)


def surface_category(root, name, train_hws, test_hw, defects=()) -> str:
  """<root>/<name>/ in the MVTec layout: a training image of each size in
  `train_hws`, two good test images and, per box (y, x, h, w) in `defects`,
  one test image of defect type 'spot' with that box bright, and its mask.
  Returns root."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  cat = os.path.join(str(root), name)
  for i, hw in enumerate(train_hws):
    write_image(os.path.join(cat, f'train/good/{i:03d}.png'), surface(rng, hw))
  for i in range(2):
    write_image(os.path.join(cat, f'test/good/{i:03d}.png'),
                surface(rng, test_hw))
  for i, (y, x, h, w) in enumerate(defects):
    image, mask = surface(rng, test_hw), np.zeros(tuple(test_hw), np.uint8)
    image[y:y + h, x:x + w] = BRIGHT
    mask[y:y + h, x:x + w] = 255
    write_image(os.path.join(cat, f'test/spot/{i:03d}.png'), image)
    write_image(os.path.join(cat, f'ground_truth/spot/{i:03d}_mask.png'), mask)
  return str(root)


def brightness_predict_fn(config, nets=None, normalisers=None, mesh=None):
  """A stand-in for maps.make_predict_fn whose map is each pixel's
  brightness: a perfect detector of the bright defects, so any
  misalignment, misplaced tile or counted padding shows in the metrics
  and in the exported maps."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from rcae_jax.data import geometry  # pylint: disable=g-import-not-at-top
  from rcae_jax.evaluation import scoring  # pylint: disable=g-import-not-at-top
  del nets, normalisers, mesh

  def fn(params, images, extents=None):
    del params
    amap = jnp.asarray(images, jnp.float32).mean(-1) / 255
    valid = (None if extents is None
             else geometry.valid_mask(jnp.asarray(extents), amap.shape[1:]))
    recs = jnp.zeros((config.model.depth,) + images.shape, jnp.float32)
    return {'recs': recs, 'details': recs, 'map': amap,
            'score': scoring.image_scores(amap, config.eval, valid)}
  return fn


def pixel_metrics_from_exported_maps(workdir, category: str, files):
  """(metrics, maps): the pixel metrics recomputed from what a run wrote,
  its exported anomaly maps (TIFF, eval.export_maps) against the
  ground-truth masks of `files` (folder.CategoryFiles), and those maps.
  A run whose reported pixel numbers are not those of its own maps (a
  misaligned, padded or inverted mask, a map written for another image)
  differs from these."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from rcae_jax.data import decode  # pylint: disable=g-import-not-at-top
  from rcae_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  maps, masks = [], []
  for ex in files.test:
    defect = os.path.basename(os.path.dirname(ex.path))
    stem = os.path.splitext(os.path.basename(ex.path))[0]
    maps.append(np.asarray(Image.open(os.path.join(
        workdir, 'anomaly_maps', category, 'test', defect, f'{stem}.tiff'))))
    masks.append(decode.load_mask(ex.mask_path, decode.image_shape(ex.path)))
  labels = np.array([ex.label for ex in files.test])
  out = metrics.compute_metrics(labels, [m.max() for m in maps], masks, maps)
  return {k: out[k] for k in ('pixel_auroc', 'au_pro', 'pixel_ap')}, maps


def assert_pixel_metrics_are_the_maps(report: dict, workdir, category: str,
                                      files) -> list:
  """Asserts that `report`'s pixel metrics are those recomputed from the
  run's exported maps (pixel_metrics_from_exported_maps), and that no map
  is constant; returns the maps."""
  pixel, maps = pixel_metrics_from_exported_maps(workdir, category, files)
  for key, value in pixel.items():
    assert report[key] == pytest.approx(value, abs=1e-6), key
  assert min(m.std() for m in maps) > 0
  return maps


# The session's trained workdir records a learning-curve point every this
# many steps (tests/test_train.py checks them).
TRAINED_CURVE_EVERY = 2


# Fixtures that each cost a training run or an export, and the xdist group
# of the tests that use them. Under pytest-xdist (setup.cfg runs the suite on
# every core with `--dist loadgroup`) a session- or module-scoped fixture is
# built once per worker that runs a test needing it: one group builds it
# once. The trained workdir's tests also write into it under the workdir
# lock, so they must run one after another anyway.
SHARED_FIXTURES = {'trained': 'trained',  # conftest.trained
                   'reference': 'reliability',  # test_reliability.reference
                   'exported': 'export'}  # test_export.exported


# First: xdist's own hook turns the group markers into node-id suffixes, and
# must see them.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
  """Puts each shared fixture's tests in one xdist group. (pytest 9.2
  breaks the groups: setup.cfg pins it below.)"""
  for item in items:
    for name in getattr(item, 'fixturenames', ()):
      if name in SHARED_FIXTURES:
        item.add_marker(pytest.mark.xdist_group(SHARED_FIXTURES[name]))
        break


def evaluated_copy(trained_workdir, tmp_path_factory, name: str, **fields):
  """(config, workdir): a copy of the trained workdir evaluated again with
  `fields` set (the shared one keeps its own outputs)."""
  import shutil  # pylint: disable=g-import-not-at-top
  from rcae_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  config, source = trained_workdir
  workdir = str(tmp_path_factory.mktemp(name) / 'wd')
  shutil.copytree(source, workdir)
  config = set_fields(config.copy_and_resolve_references(), mode='evaluate',
                      **{'eval.every_steps': 0}, **fields)
  run_lib.run(config, workdir)
  return config, workdir


def run_report(trained_workdir, mode: str) -> dict:
  """Runs a report mode ('depth_report', 'fusion_report') on the trained
  workdir; checks that <workdir>/<mode>.json holds what it returned."""
  import json  # pylint: disable=g-import-not-at-top
  from rcae_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  config, workdir = trained_workdir
  config = config.copy_and_resolve_references()
  config.mode = mode
  report = run_lib.run(config, workdir)
  with open(os.path.join(workdir, f'{mode}.json'), encoding='utf-8') as f:
    assert json.load(f) == json.loads(json.dumps(report))
  return report


@pytest.fixture(scope='session')
def trained(tmp_path_factory):
  """(config, workdir) of the tiny config trained (all three stages, with
  learning curves) and evaluated once per session: the train, predict,
  export and depth_report tests read it."""
  from rcae_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('wd'))
  config = tiny_config(**{'eval.every_steps': TRAINED_CURVE_EVERY})
  run_lib.run(config, workdir)
  return config, workdir
