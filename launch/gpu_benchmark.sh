#!/usr/bin/env bash
# One command for the GPU benchmarks (issue 26 item 4): JAX inference
# latency, then the same network in PyTorch beside JAX.
#
#   launch/gpu_benchmark.sh [OUT_DIR] [extra --config.* flags for the JAX benchmark]
#
# 1. configs/benchmark.py (the paper-sized model: N=5, width 128, DPN 32,
#    CRD 16), trimmed to 256 px, batches 1 and 16, float32 and bfloat16
#    (4 programs), 30 timed calls each
#    -> OUT_DIR/benchmark.json (default workdirs/benchmark).
# 2. rcae_jax/tools/torch_benchmark.py on the same model, torch on cuda:
#    inference at 256 px, batches 1 and 16, and one training step of each
#    stage (stage 1 at depth N) at 256 px, interleaved with JAX
#    -> OUT_DIR/torch_vs_jax.json (ratios torch / JAX; > 1: JAX faster).
# Sized to finish in under 4 minutes on one H200, compiles included
# (JAX compiles 9 programs in all).
#
# Needs jax with CUDA, torch with CUDA, flax, optax, orbax-checkpoint,
# ml-collections, absl-py, pillow, scipy; TensorFlow is not needed.
# Random weights unless --config.benchmark.checkpoint_workdir=TRAINED_WORKDIR.
#
# Environment: PYTHON (default python3); RCAE_BENCHMARK_ON_CPU=1 skips the
# GPU checks and runs both parts on the CPU (a test of this script, with
# small settings passed as flags and in TORCH_BENCHMARK_ARGS);
# TORCH_BENCHMARK_ARGS replaces the torch comparison's sizes and repetitions.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
out="${1:-workdirs/benchmark}"
shift || true
device=cuda
if [[ "${RCAE_BENCHMARK_ON_CPU:-0}" == 1 ]]; then
  device=cpu
  echo "gpu_benchmark.sh: RCAE_BENCHMARK_ON_CPU=1, running on the CPU" >&2
else
  "$py" -c 'import jax; assert jax.default_backend() == "gpu", jax.devices()' \
    || { echo "gpu_benchmark.sh: JAX sees no GPU (install jax[cuda12])" >&2; exit 1; }
  "$py" -c 'import torch; assert torch.cuda.is_available()' \
    || { echo "gpu_benchmark.sh: torch sees no GPU (install torch with CUDA)" >&2; exit 1; }
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p "$out"
# The config's full sweep (256 and 1024 px, batches 1-32: 16 programs) does
# not fit the 4 minutes: 256 px at batches 1 and 16 here; later flags win.
"$py" -m rcae_jax.main --config configs/benchmark.py --workdir "$out" \
  --config.benchmark.image_sizes='(256,)' \
  --config.benchmark.batch_sizes='(1, 16)' \
  --config.benchmark.warmup=3 --config.benchmark.iters=30 "$@"
# shellcheck disable=SC2086  # Word splitting of the arguments is meant.
"$py" -m rcae_jax.tools.torch_benchmark --config configs/benchmark.py \
  --device "$device" --json "$out/torch_vs_jax.json" \
  ${TORCH_BENCHMARK_ARGS:---sizes 256 --batches 1,16 --stage1_depths 5 --reps 20}
