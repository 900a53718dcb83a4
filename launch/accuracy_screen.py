"""Screens accuracy levers as forks of one baseline per category.

    python launch/accuracy_screen.py --data DATA_ROOT --out OUT [--jobs 8]

DATA_ROOT holds MVTec-layout categories (see CATEGORIES). For each
category it trains the recipe (configs/cpu_real.py) through stage 1, then
stage 2, then forks: each stage-3 lever resumes a copy of the workdir at
the end of stage 2, each DPN-guide lever a copy at the end of stage 1, so a
row differs from the baseline row in its lever alone (docs/studies/
2026-12-04-accuracy-round-two.md). Every finished fork is evaluated (train mode does
that) and re-scored by --config.mode=shortcut_report. Runs go in parallel
(--jobs), each a `python -m rcae_jax.main` process; a summary of every row
is rewritten to OUT/screen.json as rows finish, so an interrupted screen
keeps what it had. --seeds runs one such chain per seed (every lever
forks each). --steps scales every stage's steps (a smoke test of
the script: --steps 0.002).
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import threading
import time

from rcae_jax import config_files
from rcae_jax.common import fileio

# category: (folder under DATA_ROOT, category name, augmentation).
CATEGORIES = {
    'grid': ('mvtec_grid', 'grid', 'hflip,vflip,rot90'),
    'kolektorsdd': ('kolektorsdd', 'kolektorsdd', ''),
    'capsules': ('visa_capsules', 'capsules', ''),
}
# The recipe's steps, read from configs/cpu_real.py so they cannot drift.
_RECIPE = config_files.load(os.path.join(config_files.CONFIGS_DIR,
                                         'cpu_real.py'))
STEPS = {s: _RECIPE.train[f'stage{s}'].steps for s in (1, 2, 3)}
# Stage-3 levers: forks of the end of stage 2.
REALISTIC = '--config.anomalies.style=realistic'
REGION = '--config.anomalies.realistic.label=region'
RESIDUAL = '--config.model.crd_residual=True'
DROPOUT = '--config.train.stage3.input_dropout=0.5'
GRAD_MAG = '--config.model.dpn_guide=grad_mag'
BLURRED = '--config.model.dpn_guide=blurred_grad'
# In the order they are started (the most informative first).
STAGE3 = {
    'base': [],
    'realistic_residual_dropout': [REALISTIC, RESIDUAL, DROPOUT],
    'realistic': [REALISTIC],
    'residual': [RESIDUAL],
    'residual_dropout': [RESIDUAL, DROPOUT],
    'realistic_residual': [REALISTIC, RESIDUAL],
    'realistic_region': [REALISTIC, REGION],
}
# Stage-2 levers (DPN guide): forks of the end of stage 1, then stage 3 as
# the baseline trains it, or with every stage-3 lever.
STAGE2 = {
    'guide_grad_mag': [GRAD_MAG],
    'guide_blurred_grad': [BLURRED],
    'guide_grad_mag_realistic_residual_dropout': [GRAD_MAG, REALISTIC,
                                                  RESIDUAL, DROPOUT],
}
# Evaluation-only variants of every finished fork (no retraining).
EVAL_ONLY = {
    'fused': ['--config.eval.scoring=fused'],
    'crd_sigma2': ['--config.eval.crd_sigma=2.0'],
}

QUIET = ['--config.eval.pictures_per_type=0', '--config.eval.export_maps=False']
_lock = threading.Lock()


def main_cmd(workdir, flags):
  return [sys.executable, '-m', 'rcae_jax.main', '--config',
          'configs/cpu_real.py', '--workdir', workdir, *flags]


def run(cmd, log):
  t0 = time.time()
  with open(log, 'a') as f:
    f.write(' '.join(cmd) + '\n')
    f.flush()
    code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
  return code, time.time() - t0


def category_flags(args, name, seed):
  folder, category, augment = CATEGORIES[name]
  return [f'--config.data.root={os.path.join(args.data, folder)}',
          f'--config.data.category={category}',
          f'--config.data.augment={augment}', f'--config.seed={seed}']


def steps_flags(args, s1, s2, s3):
  scale = lambda n: max(1, round(n * args.steps)) if n else 0
  return [f'--config.train.stage1.steps={scale(s1)}',
          f'--config.train.stage2.steps={scale(s2)}',
          f'--config.train.stage3.steps={scale(s3)}']


def fork(src, dst):
  if os.path.exists(dst):
    shutil.rmtree(dst)
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns('RUN_LOCK.json'))


def record(args, rows, row):
  with _lock:
    rows.append(row)
    # Atomic: a screen killed mid-write keeps the previous complete file.
    fileio.write_json_atomic(os.path.join(args.out, 'screen.json'), rows)


def read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def train_fork(args, rows, name, seed, lever, src, wd, flags):
  log = os.path.join(args.out, 'logs', f'{name}_s{seed}_{lever}.log')
  fork(src, wd)
  code, secs = run(main_cmd(wd, flags), log)
  row = {'category': name, 'seed': seed, 'lever': lever, 'flags': flags,
         'exit': code,
         'train_eval_seconds': round(secs, 1),
         'metrics': read_json(os.path.join(wd, 'metrics.json'))}
  if code == 0:
    code2, secs2 = run(main_cmd(wd, flags + ['--config.mode=shortcut_report']),
                       log)
    row.update(shortcut_exit=code2, shortcut_seconds=round(secs2, 1),
               shortcut=read_json(os.path.join(wd, 'shortcut_report.json')))
  record(args, rows, row)
  if code == 0:
    for variant, extra in EVAL_ONLY.items():
      ev = f'{wd}_{variant}'
      fork(wd, ev)
      code3, secs3 = run(main_cmd(ev, flags + extra +
                                  ['--config.mode=evaluate']), log)
      record(args, rows, {'category': name, 'seed': seed,
                          'lever': f'{lever}+{variant}',
                          'flags': flags + extra, 'exit': code3,
                          'eval_seconds': round(secs3, 1),
                          'metrics': read_json(os.path.join(
                              ev, 'metrics.json'))})
  return row


def screen_category(args, pool, rows, name, seed):
  base = category_flags(args, name, seed)
  wd = lambda tag: os.path.join(args.out, 'wd', f'{name}_s{seed}_{tag}')
  log = os.path.join(args.out, 'logs', f'{name}_s{seed}_base.log')
  # Stage 1, then stage 2 on a copy of it: the forks' two starting points.
  for stage, src, steps in ((1, None, (STEPS[1], 0, 0)),
                            (2, wd('stage1'), (STEPS[1], STEPS[2], 0))):
    if src:
      fork(src, wd(f'stage{stage}'))
    flags = base + QUIET + steps_flags(args, *steps) + [
        '--config.eval.scoring=recursion']
    code, secs = run(main_cmd(wd(f'stage{stage}'), flags), log)
    record(args, rows, {'category': name, 'seed': seed,
                        'lever': f'stage{stage}',
                        'exit': code, 'train_eval_seconds': round(secs, 1),
                        'metrics': read_json(os.path.join(
                            wd(f'stage{stage}'), 'metrics.json'))})
    if code:
      return []
  full = base + QUIET + steps_flags(args, STEPS[1], STEPS[2], STEPS[3])
  jobs = [pool.submit(train_fork, args, rows, name, seed, lever,
                      wd('stage2'), wd(lever), full + flags)
          for lever, flags in STAGE3.items()]
  jobs += [pool.submit(train_fork, args, rows, name, seed, lever,
                       wd('stage1'), wd(lever), full + flags)
           for lever, flags in STAGE2.items()]
  return jobs


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--jobs', type=int, default=8)
  parser.add_argument('--seeds', default='0',
                      help='comma-separated seeds: one baseline chain each')
  parser.add_argument('--steps', type=float, default=1.0)
  parser.add_argument('--categories', default=','.join(CATEGORIES))
  parser.add_argument('--levers', default='',
                      help='comma-separated lever names to run (default: all)')
  args = parser.parse_args()
  if args.levers:
    keep = set(args.levers.split(','))
    for table in (STAGE3, STAGE2, EVAL_ONLY):
      for name in [n for n in table if n not in keep]:
        del table[name]
  os.makedirs(os.path.join(args.out, 'logs'), exist_ok=True)
  rows = []
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    bases = [pool.submit(screen_category, args, pool, rows, name, int(seed))
             for seed in args.seeds.split(',')
             for name in args.categories.split(',')]
    forks = [j for b in bases for j in b.result()]
    for j in forks:
      j.result()
  print(json.dumps([{k: r.get(k) for k in ('category', 'seed', 'lever',
                                            'exit')}
                    for r in rows]))


if __name__ == '__main__':
  main()
