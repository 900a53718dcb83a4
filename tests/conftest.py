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


@pytest.fixture(scope='session', autouse=True)
def _private_cache(tmp_path_factory):
  """The built-in category goes to a temp folder, never ~/.cache."""
  os.environ['RCAE_JAX_CACHE'] = str(tmp_path_factory.mktemp('cache'))


def load_config(name: str):
  """get_config() of configs/<name>.py, loaded by path as `--config` does."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(REPO, 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'configs_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_config(**overrides):
  """configs/smoke.py (seconds on one CPU core) with dotted overrides."""
  import smoke  # configs/smoke.py  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  config.mesh.num_devices = 1  # conftest fakes 8 devices; tests opt in.
  for key, value in overrides.items():
    target = config
    *path, last = key.split('.')
    for p in path:
      target = target[p]
    target[last] = value
  return config


@pytest.fixture
def make_config():
  return tiny_config


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
