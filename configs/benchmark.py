"""Inference benchmark of the paper-sized RcAE (rcae_jax/tools/benchmark.py).

Command (from the repository root):

    python -m rcae_jax.main --config configs/benchmark.py --workdir DIR

It compiles the full inference function (N = 5 recursions of a width-128
RcAE with 2 residual blocks per step, DPN width 32, CRD width 16, CRD
scoring; 6.19 M parameters: RcAE 1.56 M, DPN 2.70 M, CRD 1.94 M) ahead of
time for every image size x dtype x batch size below, times it on the device
and end to end, prints a table and writes DIR/benchmark.json. Weights are
random unless `--config.benchmark.checkpoint_workdir=TRAINED_WORKDIR` is
given (the model fields must then match that run's config). No data is
read and nothing is trained; TensorFlow is not needed.

Hardware: one GPU / TPU (runs on CPU too, slowly). Analytic cost
(rcae_jax/model/flops.py): 627.5 GFLOP per 256^2 image. Measured on one
H200 (2026-12-04, `launch/gpu_benchmark.sh docs/data/h200`, which trims this
sweep to 256^2 at batches 1 and 16): 7.27 ms at batch 1 and 338 images/s at
batch 16 in bfloat16 (docs/performance.md, "One H200"). The default sweep compiles 16 programs (2 sizes x
2 dtypes x 4 batch sizes). Memory: XLA:CPU's memory analysis of the
compiled program gives ~0.18 GiB of temporaries per 256^2 image and ~3 GiB
per 1024^2 image (bf16; f32 ~3.4), so 1024^2 at batch 32 needs ~100 GiB:
it may fit one H200 (141 GB), not smaller cards (GPU fusion differs: the
JSON's `compiled_memory` has the real figure). Trim `batch_sizes` there.

On CPU use small sizes, e.g.

    python -m rcae_jax.main --config configs/benchmark.py --workdir /tmp/b \
      --config.benchmark.image_sizes='(64,)' \
      --config.benchmark.batch_sizes='(1,)' --config.benchmark.iters=5
"""

import ml_collections

from rcae_jax import config_files


def get_config() -> ml_collections.ConfigDict:
  # The base config, loaded by path from beside this file.
  config = config_files.base(__file__, 'default')

  # What main does: time the inference function (rcae_jax/tools/benchmark.py).
  config.mode = 'benchmark'

  # The paper-sized model used for the GPU numbers.
  # N: recursion depth (paper: 5); sizes must be divisible by 2**max(N, 4).
  config.model.depth = 5
  # Width of the shared encoder / decoder steps (paper: 128).
  config.model.width = 128
  # Residual blocks per encoder step and per decoder step.
  config.model.num_res_blocks = 2
  # Base width of the Detail Preservation Network.
  config.model.dpn_width = 32
  # Base width of the Cross Recursion Detection network.
  config.model.crd_width = 16
  # Size used to build the abstract parameters when loading a checkpoint
  # (parameter shapes do not depend on it); the timed sizes are below.
  config.data.image_size = 256

  # What is timed: config.benchmark in configs/default.py (sizes 256 and
  # 1024, batches 1-32, float32 and bfloat16, device and end to end).
  return config
