#!/usr/bin/env bash
# One command for the GPU latency benchmark (issue: fast inference).
#
#   launch/gpu_benchmark.sh [OUT_DIR] [extra --config.* flags]
#
# Runs configs/benchmark.py (the paper-sized model: N=5, width 128, DPN,
# CRD; sizes 256 and 1024; batches 1/8/16/32; float32 and bfloat16) on the
# first GPU and writes OUT_DIR/benchmark.json (default workdirs/benchmark).
# Needs jax with CUDA (`pip install "jax[cuda12]"`) plus flax, optax,
# orbax-checkpoint, ml-collections, absl-py, pillow, scipy; TensorFlow is
# not needed. Random weights unless
# --config.benchmark.checkpoint_workdir=TRAINED_WORKDIR is given.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-workdirs/benchmark}"
shift || true
python3 -c 'import jax; assert jax.default_backend() == "gpu", jax.devices()' \
  || { echo "gpu_benchmark.sh: JAX sees no GPU (install jax[cuda12])" >&2; exit 1; }
export XLA_PYTHON_CLIENT_PREALLOCATE=false
exec python3 -m rcae_jax.main --config configs/benchmark.py --workdir "$out" "$@"
