"""The Cloud TPU / multi-GPU launch scripts (launch/) and configs/tpu.py.

Every script runs either with --dry-run (a fake `gcloud` that fails the
test if it is ever called sits first on PATH), or for real against a fake
`gcloud` that only records its arguments, so these tests never reach Google
Cloud even where the SDK is installed.
"""

import os
import shlex
import subprocess

import pytest

from conftest import REPO
from conftest import load_config

LAUNCH = os.path.join(REPO, 'launch')

TPU_ENV = {
    'PROJECT': 'my-project',
    'ZONE': 'us-west4-a',
    'ACCELERATOR_TYPE': 'v5litepod-8',
    'TPU_NAME': 'rcae-test',
    'WORKDIR': 'gs://my-bucket/rcae/run1',
}
TPU_REQUIRED = ('PROJECT', 'ZONE', 'ACCELERATOR_TYPE', 'TPU_NAME', 'WORKDIR')
LIBTPU_URL = 'https://storage.googleapis.com/jax-releases/libtpu_releases.html'


@pytest.fixture
def run_script(tmp_path):
  """run_script(name, *args, **env) -> CompletedProcess, in a clean env."""
  fake_bin = tmp_path / 'bin'
  fake_bin.mkdir()
  marker = tmp_path / 'gcloud_was_called'
  gcloud = fake_bin / 'gcloud'
  gcloud.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(marker))}\n'
                    'exit 99\n')
  gcloud.chmod(0o755)

  def run(name, *args, **env):
    full_env = {'PATH': f'{fake_bin}:/usr/bin:/bin', 'HOME': str(tmp_path),
                'TMPDIR': str(tmp_path), 'LC_ALL': 'C'}
    full_env.update(env)
    result = subprocess.run(['bash', os.path.join(LAUNCH, name), *args],
                            env=full_env, cwd=REPO, capture_output=True,
                            text=True, timeout=30, check=False)
    assert not marker.exists(), f'gcloud was called: {marker.read_text()}'
    return result

  return run


def _commands(result):
  """The '+ ' lines of a dry run, as strings without the prefix."""
  lines = result.stdout.splitlines()
  assert lines, result.stderr
  for line in lines:
    assert line.startswith('+ '), f'not a command line: {line!r}'
  return [line[2:] for line in lines]


def _find(commands, *needles):
  """Index of the only command containing all needles."""
  hits = [i for i, c in enumerate(commands) if all(n in c for n in needles)]
  assert len(hits) == 1, (needles, commands)
  return hits[0]


def _remote_command(line):
  """The --command=... payload of a printed `tpu-vm ssh` line."""
  args = shlex.split(line)
  (payload,) = [a[len('--command='):] for a in args
                if a.startswith('--command=')]
  return payload


# ------------------------------------------------------------ tpu_run.sh
def test_tpu_run_dry_run_sequence(run_script):
  result = run_script('tpu_run.sh', '--dry-run', **TPU_ENV,
                      EXTRA_ARGS='--config.seed=3 --config.data.category=screw')
  assert result.returncode == 0, result.stderr
  cmds = _commands(result)

  create = _find(cmds, 'gcloud compute tpus tpu-vm create rcae-test')
  assert '--accelerator-type=v5litepod-8' in cmds[create]
  assert '--zone=us-west4-a' in cmds[create]
  assert '--project=my-project' in cmds[create]
  assert '--version=v2-alpha-tpuv5-lite' in cmds[create]
  assert '--spot' not in cmds[create]

  scp = _find(cmds, 'gcloud compute tpus tpu-vm scp')
  assert '--recurse' in cmds[scp] and '--worker=all' in cmds[scp]
  assert 'rcae-test:' in cmds[scp]

  install = _find(cmds, 'jax[tpu]')
  assert '--worker=all' in cmds[install]
  assert LIBTPU_URL in cmds[install]
  assert 'pip install -q -r requirements.txt -e .' in cmds[install]
  assert 'python3.11 -m venv' in cmds[install]

  main = _find(cmds, 'python -m rcae_jax.main')
  assert 'tpu-vm ssh rcae-test' in cmds[main]
  assert '--worker=all' in cmds[main]
  assert ('--config configs/tpu.py --workdir gs://my-bucket/rcae/run1'
          in cmds[main])
  assert '--config.seed=3 --config.data.category=screw' in cmds[main]
  assert 'export RCAE_JAX_DISTRIBUTED=1' in cmds[main]

  delete = _find(cmds, 'gcloud compute tpus tpu-vm delete rcae-test')
  assert '--quiet' in cmds[delete] and '--zone=us-west4-a' in cmds[delete]

  assert create < scp < install < main < delete == len(cmds) - 1


def test_tpu_run_printed_commands_are_valid_shell(run_script, tmp_path):
  """Remote snippets parse as bash; the staging commands really work."""
  result = run_script('tpu_run.sh', '--dry-run', **TPU_ENV)
  assert result.returncode == 0, result.stderr
  cmds = _commands(result)
  for line in cmds:
    shlex.split(line)  # Every line pastes into a shell.
    if '--command=' in line:
      payload = _remote_command(line)
      check = subprocess.run(['bash', '-n', '-c', payload],
                             capture_output=True, text=True, check=False)
      assert check.returncode == 0, (payload, check.stderr)

  # Run the local staging steps (mkdir + tar pipeline) for real.
  stage = _find(cmds, 'mkdir -p')
  copy = _find(cmds, 'tar -C')
  for i in (stage, copy):
    assert str(tmp_path) in cmds[i]
    done = subprocess.run(['bash', '-c', cmds[i]], capture_output=True,
                          text=True, timeout=20, check=False)
    assert done.returncode == 0, done.stderr
  staged = os.path.join(shlex.split(cmds[stage])[-1])
  assert os.path.isfile(os.path.join(staged, 'launch', 'tpu_run.sh'))
  assert os.path.isfile(os.path.join(staged, 'configs', 'tpu.py'))
  assert os.path.isfile(os.path.join(staged, 'requirements.txt'))
  assert not os.path.exists(os.path.join(staged, '.venv'))
  assert not os.path.exists(os.path.join(staged, '.git'))
  scp = _find(cmds, 'tpu-vm scp')
  assert staged in shlex.split(cmds[scp])


@pytest.fixture
def run_with_fake_gcloud(tmp_path):
  """A real (not dry) run against a fake gcloud that records its calls.

  run(fail_on='', **env) -> (CompletedProcess, calls); the fake exits 3 on
  the call whose arguments contain `fail_on`, and 4 when scp is handed a
  folder without the code in it.
  """
  fake_bin = tmp_path / 'fakebin'
  fake_bin.mkdir()
  log = tmp_path / 'calls.log'
  gcloud = fake_bin / 'gcloud'
  gcloud.write_text(
      '#!/bin/bash\n'
      f'printf "%s\\n" "$*" >> {shlex.quote(str(log))}\n'
      'if [[ "$4" == scp && ! -f "$6/configs/tpu.py" ]]; then exit 4; fi\n'
      'if [[ -n "$FAKE_FAIL" && "$*" == *"$FAKE_FAIL"* ]]; then exit 3; fi\n'
      'exit 0\n')
  gcloud.chmod(0o755)
  stage_parent = tmp_path / 'tmp'
  stage_parent.mkdir()

  def run(fail_on='', **env):
    full_env = {'PATH': f'{fake_bin}:/usr/bin:/bin', 'HOME': str(tmp_path),
                'TMPDIR': str(stage_parent), 'LC_ALL': 'C',
                'FAKE_FAIL': fail_on}
    full_env.update(env)
    result = subprocess.run(
        ['bash', os.path.join(LAUNCH, 'tpu_run.sh')], env=full_env, cwd=REPO,
        capture_output=True, text=True, timeout=30, check=False,
        stdin=subprocess.DEVNULL)
    calls = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    # The staged copy of the code is always removed.
    assert not os.listdir(stage_parent)
    return result, calls

  return run


def test_tpu_run_real_run_calls_gcloud_in_order(run_with_fake_gcloud):
  result, calls = run_with_fake_gcloud(**TPU_ENV)
  assert result.returncode == 0, result.stderr
  kinds = [c.split()[3] for c in calls]
  assert kinds == ['create', 'scp', 'ssh', 'ssh', 'delete'], calls
  assert 'jax[tpu]' in calls[2] and 'rcae_jax.main' in calls[3]
  # The trace on stderr matches what --dry-run prints.
  assert result.stderr.count('+ gcloud ') == 5


def test_tpu_run_failure_still_deletes_vm(run_with_fake_gcloud):
  result, calls = run_with_fake_gcloud(fail_on='rcae_jax.main', **TPU_ENV)
  assert result.returncode == 3
  assert calls[-1].startswith('compute tpus tpu-vm delete rcae-test')
  assert 'rerun with the same WORKDIR' in result.stderr
  # A failed create deletes nothing (the name may be another VM's).
  result, calls = run_with_fake_gcloud(fail_on='tpu-vm create', **TPU_ENV)
  assert result.returncode == 3
  assert [c.split()[3] for c in calls] == ['create']
  assert 'tpu-vm list' in result.stderr
  # A reused VM (SKIP_CREATE=1) is deleted at the end like a new one.
  result, calls = run_with_fake_gcloud(SKIP_CREATE='1', **TPU_ENV)
  assert result.returncode == 0, result.stderr
  assert [c.split()[3] for c in calls] == ['ssh', 'scp', 'ssh', 'ssh',
                                           'delete']


def test_tpu_run_keep_vm_real_run(run_with_fake_gcloud):
  result, calls = run_with_fake_gcloud(fail_on='rcae_jax.main', KEEP_VM='1',
                                       **TPU_ENV)
  assert result.returncode == 3
  assert not any(' delete ' in c for c in calls)
  assert 'tpu_delete.sh' in result.stderr


@pytest.mark.parametrize('accelerator,version', [
    ('v4-32', 'tpu-ubuntu2204-base'),
    ('v3-8', 'tpu-ubuntu2204-base'),
    ('v5p-8', 'v2-alpha-tpuv5'),
    ('v6e-8', 'v2-alpha-tpuv6e'),
])
def test_tpu_run_runtime_version_by_accelerator(run_script, accelerator,
                                                version):
  env = dict(TPU_ENV, ACCELERATOR_TYPE=accelerator)
  result = run_script('tpu_run.sh', '--dry-run', **env)
  assert result.returncode == 0, result.stderr
  create = _commands(result)[0]
  assert f'--accelerator-type={accelerator}' in create
  assert f'--version={version}' in create


def test_tpu_run_runtime_version_override(run_script):
  result = run_script('tpu_run.sh', '--dry-run', **TPU_ENV,
                      RUNTIME_VERSION='my-runtime')
  assert '--version=my-runtime' in _commands(result)[0]


def test_tpu_run_spot(run_script):
  result = run_script('tpu_run.sh', '--dry-run', **TPU_ENV, SPOT='1')
  assert result.returncode == 0, result.stderr
  cmds = _commands(result)
  assert '--spot' in cmds[_find(cmds, 'tpu-vm create')]


def test_tpu_run_keep_vm_drops_delete(run_script):
  result = run_script('tpu_run.sh', '--dry-run', **TPU_ENV, KEEP_VM='1')
  assert result.returncode == 0, result.stderr
  cmds = _commands(result)
  assert not any('delete' in c for c in cmds), cmds
  assert 'python -m rcae_jax.main' in cmds[-1]
  assert 'KEEP_VM=1' in result.stderr


def test_tpu_run_repo_url_clones_on_all_workers(run_script):
  result = run_script('tpu_run.sh', '--dry-run', **TPU_ENV,
                      REPO_URL='https://example.com/me/rcae_jax.git',
                      REPO_REF='v1')
  assert result.returncode == 0, result.stderr
  cmds = _commands(result)
  clone = _find(cmds, 'git clone')
  assert '--worker=all' in cmds[clone]
  assert ('--branch v1 https://example.com/me/rcae_jax.git'
          in _remote_command(cmds[clone]))
  assert not any('tpu-vm scp' in c or 'tar -C' in c for c in cmds)
  assert clone < _find(cmds, 'jax[tpu]') < _find(cmds, 'rcae_jax.main')


def test_tpu_run_data_url(run_script):
  result = run_script('tpu_run.sh', '--dry-run', **TPU_ENV,
                      DATA_URL='gs://my-bucket/mvtec_ad')
  assert result.returncode == 0, result.stderr
  cmds = _commands(result)
  sync = _find(cmds, 'gcloud storage rsync')
  assert 'gs://my-bucket/mvtec_ad' in cmds[sync]
  assert '--worker=all' in cmds[sync]
  main = _remote_command(cmds[_find(cmds, 'rcae_jax.main')])
  assert '--config.data.root="$HOME/rcae_data"' in main


def test_tpu_run_missing_variables_named_at_once(run_script):
  result = run_script('tpu_run.sh', '--dry-run')
  assert result.returncode != 0
  assert result.stdout == ''
  for name in TPU_REQUIRED:
    assert name in result.stderr
  # Only the missing ones are named.
  result = run_script('tpu_run.sh', '--dry-run', PROJECT='p',
                      WORKDIR='gs://b/r')
  assert result.returncode != 0 and result.stdout == ''
  message = result.stderr.splitlines()[-1]
  for name in ('ZONE', 'ACCELERATOR_TYPE', 'TPU_NAME'):
    assert name in message
  assert 'PROJECT' not in message and 'WORKDIR' not in message


def test_tpu_run_missing_variables_fail_without_dry_run(run_script):
  result = run_script('tpu_run.sh', ZONE='z')
  assert result.returncode != 0 and result.stdout == ''
  assert 'PROJECT' in result.stderr and 'ZONE' not in result.stderr


@pytest.mark.parametrize('workdir', ['/tmp/run', 'workdirs/x', 'gs:/b/x',
                                     'gs://', 's3://bucket/run'])
def test_tpu_run_workdir_must_be_gcs(run_script, workdir):
  env = dict(TPU_ENV, WORKDIR=workdir)
  for args in (('--dry-run',), ()):
    result = run_script('tpu_run.sh', *args, **env)
    assert result.returncode != 0
    assert result.stdout == ''
    assert 'gs://' in result.stderr


def test_tpu_run_bad_settings(run_script):
  for env in (dict(TPU_ENV, SPOT='yes'), dict(TPU_ENV, ACCELERATOR_TYPE='tpu'),
              dict(TPU_ENV, CONFIG='configs/nope.py'),
              dict(TPU_ENV, DATA_URL='/local/data')):
    result = run_script('tpu_run.sh', '--dry-run', **env)
    assert result.returncode != 0, env
    assert result.stdout == '' and 'error' in result.stderr


def test_tpu_run_help_and_unknown_argument(run_script):
  result = run_script('tpu_run.sh', '--help')
  assert result.returncode == 0
  for name in TPU_REQUIRED + ('RUNTIME_VERSION', 'CONFIG', 'EXTRA_ARGS',
                              'REPO_URL', 'SPOT', 'KEEP_VM', '--dry-run'):
    assert name in result.stdout
  result = run_script('tpu_run.sh', '--bogus', **TPU_ENV)
  assert result.returncode != 0 and '--bogus' in result.stderr


# ---------------------------------------------------------- tpu_delete.sh
def test_tpu_delete(run_script):
  result = run_script('tpu_delete.sh', '--dry-run', PROJECT='p', ZONE='z',
                      TPU_NAME='leftover')
  assert result.returncode == 0, result.stderr
  assert _commands(result) == [
      'gcloud compute tpus tpu-vm delete leftover --zone=z --project=p '
      '--quiet']
  result = run_script('tpu_delete.sh', '--dry-run', ZONE='z')
  assert result.returncode != 0 and result.stdout == ''
  assert 'PROJECT' in result.stderr and 'TPU_NAME' in result.stderr
  assert run_script('tpu_delete.sh', '--help').returncode == 0


# -------------------------------------------------------- gpu_multihost.sh
GPU_ENV = {'COORDINATOR_ADDRESS': '10.0.0.2:1234', 'NUM_PROCESSES': '4',
           'PROCESS_ID': '1', 'WORKDIR': '/shared/runs/gpu'}


def test_gpu_multihost_dry_run(run_script):
  result = run_script('gpu_multihost.sh', '--dry-run', **GPU_ENV,
                      EXTRA_ARGS='--config.data.root=/data/mvtec_ad')
  assert result.returncode == 0, result.stderr
  assert _commands(result) == [
      'export RCAE_JAX_COORDINATOR=10.0.0.2:1234',
      'export RCAE_JAX_NUM_PROCESSES=4',
      'export RCAE_JAX_PROCESS_ID=1',
      'python3 -m rcae_jax.main --config configs/tpu.py --workdir '
      '/shared/runs/gpu --config.data.root=/data/mvtec_ad',
  ]


def test_gpu_multihost_validation(run_script):
  result = run_script('gpu_multihost.sh', '--dry-run')
  assert result.returncode != 0 and result.stdout == ''
  for name in ('COORDINATOR_ADDRESS', 'NUM_PROCESSES', 'PROCESS_ID',
               'WORKDIR'):
    assert name in result.stderr
  for bad in ({'PROCESS_ID': '4'}, {'PROCESS_ID': '-1'},
              {'NUM_PROCESSES': '0'}, {'COORDINATOR_ADDRESS': '10.0.0.2'}):
    result = run_script('gpu_multihost.sh', '--dry-run', **dict(GPU_ENV, **bad))
    assert result.returncode != 0, bad
    assert result.stdout == '' and 'error' in result.stderr


# --------------------------------------------------------- configs/tpu.py
def test_tpu_config_paper_settings():
  config = load_config('tpu')
  assert config.model.depth == 5
  assert config.data.image_size == 1024
  assert config.model.width == 128
  assert config.model.num_res_blocks == 2
  assert config.model.dpn_width == 32 and config.model.crd_width == 16
  assert config.train.batch_size == 16
  assert config.train.checkpoint_every == 500
  assert config.data.loader == 'tfdata'
  assert config.data.category == 'bottle'
  assert config.data.root.startswith('gs://')
  for stage, epochs in ((1, 1500), (2, 400), (3, 300)):
    cfg = config.train[f'stage{stage}']
    # Steps follow from the real train-set size when the data is read
    # (run.epochs_to_steps; tests/test_configs.py).
    assert cfg.epochs == epochs
    assert cfg.learning_rate == pytest.approx(1e-4)


def test_tpu_config_epochs_become_steps_of_the_real_train_set():
  from rcae_jax import run  # pylint: disable=g-import-not-at-top
  config = load_config('tpu')
  config.train.batch_size = 32
  config.train.stage3.epochs = 0  # Steps given directly instead.
  config.train.stage3.steps = 5
  # Toothbrush: 60 good train images less 6 held out (val_fraction 0.1).
  # ceil(1500 * 54 / 32); stage 2 trains at its own batch size, 8.
  assert run.epochs_to_steps(config, 54) == {1: 2532, 2: 400 * 54 // 8}
  assert config.train.stage1.steps == 2532
  assert config.train.stage3.steps == 5


def test_tpu_config_passes_validation():
  from rcae_jax import validate  # pylint: disable=g-import-not-at-top
  validate.validate(load_config('tpu'))
