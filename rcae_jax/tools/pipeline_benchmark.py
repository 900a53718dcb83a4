"""Input-pipeline benchmark: images/s of the training batches, per loader.

    python -m rcae_jax.tools.pipeline_benchmark --root DIR --category NAME \
        [--format mvtec|visa] --sizes 256,1024 --batch 16 --steps 20 \
        --loader tfdata|memory|both [--augment hflip,vflip,rot90] \
        [--json PATH]

Without --root it generates (once, cached) the built-in synthetic category,
so it runs anywhere. For each image size and loader it times exactly what
training consumes (`Loader.train_batches`, this process's share of the
global batch, augmentation included when --augment is given):

- tfdata: the first batch (pipeline start-up, TensorFlow graph building,
  first decodes) is timed separately as `first_batch_s`; then `--steps`
  batches are pulled as fast as possible: `images_per_s` is the sustained
  decode + resize rate of the tf.data pipeline (Pillow via
  tf.numpy_function, AUTOTUNE parallelism, prefetch).
- memory: the whole category is decoded once (`decode_once_s`,
  `decode_images_per_s`, `memory_bytes` held); then, after one warm-up batch,
  `--steps` batches are served from memory: `images_per_s` is the serving
  rate (fancy indexing, plus augmentation), not a decode rate.

Nothing here touches JAX: the numbers are the host's ability to feed the
train step, to compare with batch_size x steps/s of training (see
docs/input_pipeline.md).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time

from rcae_jax.data import decode, folder, synthetic
from rcae_jax.data import augment as augment_lib
from rcae_jax.data import loader as loader_lib
from rcae_jax.data import tfdata_loader

LOADERS = ('tfdata', 'memory')


def parse_args(argv):
  p = argparse.ArgumentParser(
      prog='python -m rcae_jax.tools.pipeline_benchmark',
      description='Images/s of the training input pipeline per loader.')
  p.add_argument('--root', default='',
                 help='folder holding the category ("" = built-in synthetic)')
  p.add_argument('--category', default='',
                 help='category folder under --root (default: synthetic)')
  p.add_argument('--format', default='mvtec', choices=('mvtec', 'visa'),
                 help='layout of --root (as data.format)')
  p.add_argument('--visa_split_csv', '--visa-split-csv', default='',
                 help='VisA split CSV ("" = the official 1-class one)')
  p.add_argument('--sizes', default='256,1024',
                 help='comma-separated model image sizes')
  p.add_argument('--batch', type=int, default=16, help='global batch size')
  p.add_argument('--steps', type=int, default=20,
                 help='timed batches after the warm-up batch')
  p.add_argument('--loader', default='both', choices=LOADERS + ('both',))
  p.add_argument('--workers', type=int, default=4,
                 help='decode threads of the memory loader (data.num_workers)')
  p.add_argument('--augment', default='',
                 help="training augmentation, as data.augment ('' = none)")
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--synthetic_train', '--synthetic-train', type=int,
                 default=200,
                 help='built-in category: training images')
  p.add_argument('--synthetic_size', '--synthetic-size', type=int,
                 default=128,
                 help='built-in category: image side in pixels')
  p.add_argument('--json', default='', help='also write the results here')
  args = p.parse_args(argv)
  try:
    args.sizes = [int(s) for s in args.sizes.split(',') if s.strip()]
  except ValueError:
    p.error(f'--sizes must be comma-separated integers, got {args.sizes!r}')
  if not args.sizes or min(args.sizes) <= 0:
    p.error('--sizes needs at least one positive size')
  if args.batch <= 0 or args.steps <= 0:
    p.error('--batch and --steps must be positive')
  if args.root and not args.category:
    p.error('--root needs --category')
  try:
    augment_lib.parse_augment(args.augment)
  except ValueError as e:
    p.error(str(e))
  return args


def resolve(args) -> folder.CategoryFiles:
  """The category, as sources.resolve_files does for a config."""
  if not args.root:
    root = synthetic.ensure(seed=args.seed, size=args.synthetic_size,
                            n_train=args.synthetic_train, n_test_good=1,
                            n_per_defect=1)
    return folder.discover(root, synthetic.CATEGORY)
  root = os.path.abspath(os.path.expanduser(args.root))
  if args.format == 'visa':
    from rcae_jax.data import visa  # pylint: disable=g-import-not-at-top
    return visa.discover_visa(root, args.category,
                              args.visa_split_csv or None)
  return folder.discover(root, args.category)


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.lower().startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict:
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:
    usable = os.cpu_count()
  return {'cpu_model': cpu_model(), 'cpu_count': os.cpu_count(),
          'usable_cpus': usable, 'platform': platform.platform(),
          'python': platform.python_version()}


def load_average() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def _time_batches(it, steps: int) -> float:
  t0 = time.perf_counter()
  for _ in range(steps):
    next(it)
  return time.perf_counter() - t0


def bench_memory(files, size, args) -> dict:
  t0 = time.perf_counter()
  loader = loader_lib.MemoryLoader(files, size, args.workers,
                                   augment=args.augment)
  images = loader.train_images()
  decode_s = time.perf_counter() - t0
  it = loader.train_batches(args.batch, seed=args.seed)
  t0 = time.perf_counter()
  first = next(it)
  warmup_s = time.perf_counter() - t0
  serve_s = _time_batches(it, args.steps)
  it.close()
  n = len(files.train)
  row = {
      'decode_once_s': round(decode_s, 3),
      'decode_images_per_s': round(n / decode_s, 1),
      'memory_bytes': int(images.nbytes),
      'first_batch_s': round(warmup_s, 4),
      'timed_s': round(serve_s, 4),
      'images_per_s': round(args.batch * args.steps / serve_s, 1),
      'batch_shape': list(first['image'].shape),
  }
  del loader, images, first
  gc.collect()
  return row


def bench_tfdata(files, size, args) -> dict:
  loader = tfdata_loader.TFDataLoader(files, size, args.workers,
                                      augment=args.augment)
  it = loader.train_batches(args.batch, seed=args.seed)
  t0 = time.perf_counter()
  first = next(it)
  warmup_s = time.perf_counter() - t0
  timed_s = _time_batches(it, args.steps)
  # Stops tf.data's background decoding before the next measurement.
  it.close()
  del it, loader
  gc.collect()
  return {
      'first_batch_s': round(warmup_s, 3),
      'timed_s': round(timed_s, 3),
      'images_per_s': round(args.batch * args.steps / timed_s, 1),
      'batch_shape': list(first['image'].shape),
  }


def format_row(r: dict) -> str:
  head = (f"{r['loader']:>6}  size {r['size']:>4}  batch {r['batch']}  "
          f"steps {r['steps']}:  ")
  if r['loader'] == 'memory':
    return head + (
        f"decode once {r['decode_once_s']:.2f} s "
        f"({r['decode_images_per_s']:.1f} images/s, {r['num_train']} images, "
        f"{r['memory_bytes'] / 2**20:.1f} MiB held); serving "
        f"{r['images_per_s']:.1f} images/s")
  return head + (f"first batch {r['first_batch_s']:.2f} s; sustained "
                 f"{r['images_per_s']:.1f} images/s")


def run(args, argv) -> dict:
  load_before = load_average()
  files = resolve(args)
  loaders = LOADERS if args.loader == 'both' else (args.loader,)
  result = {
      'command': ' '.join(['python -m rcae_jax.tools.pipeline_benchmark'] +
                          list(argv)),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      'machine': machine(),
      'load_average_before': load_before,
      'root': files.root, 'category': files.category,
      'num_train': len(files.train),
      'source_image_hw': list(decode.image_shape(files.train[0])),
      'batch': args.batch, 'steps': args.steps,
      'augment': list(augment_lib.parse_augment(args.augment)),
      'rows': [],
  }
  if 'tfdata' in loaders:
    t0 = time.perf_counter()
    tf = tfdata_loader.import_tensorflow()
    result['tensorflow_import_s'] = round(time.perf_counter() - t0, 2)
    result['tensorflow'] = tf.__version__
  print(f"Category {files.category} at {files.root}: {len(files.train)} "
        f"training images, source {result['source_image_hw'][1]}x"
        f"{result['source_image_hw'][0]} (first image, W x H); "
        f"load average {load_before}", flush=True)
  for size in args.sizes:
    for name in loaders:
      bench = bench_memory if name == 'memory' else bench_tfdata
      row = {'loader': name, 'size': size, 'batch': args.batch,
             'steps': args.steps, 'num_train': len(files.train)}
      row.update(bench(files, size, args))
      result['rows'].append(row)
      print(format_row(row), flush=True)
  result['load_average_after'] = load_average()
  print(f"load average after: {result['load_average_after']}", flush=True)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)
  return result


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else list(argv)
  return run(parse_args(argv), argv)


if __name__ == '__main__':
  main()
