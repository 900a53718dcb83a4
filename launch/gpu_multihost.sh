#!/usr/bin/env bash
# Run rcae_jax.main as one process of a multi-host GPU job. Start it once
# on every node (same COORDINATOR_ADDRESS and NUM_PROCESSES, PROCESS_ID
# 0..NUM_PROCESSES-1); each process drives all GPUs of its node.
set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${LAUNCH_DIR}/.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "${LAUNCH_DIR}/common.sh"

usage() {
  cat <<'USAGE'
Usage: [VAR=value ...] launch/gpu_multihost.sh [--dry-run] [--help]

Runs, from the repository root,
  RCAE_JAX_COORDINATOR=$COORDINATOR_ADDRESS RCAE_JAX_NUM_PROCESSES=$NUM_PROCESSES \
  RCAE_JAX_PROCESS_ID=$PROCESS_ID \
  $PYTHON -m rcae_jax.main --config $CONFIG --workdir $WORKDIR $EXTRA_ARGS
The program passes these to jax.distributed.initialize(coordinator_address,
num_processes, process_id). Run it on every node of the job.

Required environment variables:
  COORDINATOR_ADDRESS  host:port of process 0, reachable from every node
                       (e.g. 10.0.0.2:1234; the port must be free there).
  NUM_PROCESSES        Number of processes (nodes) in the job.
  PROCESS_ID           This node's index, 0 .. NUM_PROCESSES-1.
  WORKDIR              Run folder every node can reach (shared file system
                       or gs://); rerunning with it resumes.

Optional:
  CONFIG               Config file (configs/tpu.py: the paper-sized run).
  EXTRA_ARGS           Extra flags for rcae_jax.main, split on spaces by the
                       shell, e.g. '--config.data.root=/data/mvtec_ad'.
  PYTHON               Interpreter with rcae_jax installed (python3).

Flags:
  --dry-run            Print the environment and the command, run nothing.
  -h, --help           This text.
USAGE
}

parse_common_flags usage "$@"
require_vars COORDINATOR_ADDRESS NUM_PROCESSES PROCESS_ID WORKDIR

CONFIG="${CONFIG:-configs/tpu.py}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
PYTHON="${PYTHON:-python3}"

[[ "${COORDINATOR_ADDRESS}" =~ ^[^:[:space:]]+:[0-9]+$ ]] ||
  die "COORDINATOR_ADDRESS must be host:port (got '${COORDINATOR_ADDRESS}')"
[[ "${NUM_PROCESSES}" =~ ^[1-9][0-9]*$ ]] ||
  die "NUM_PROCESSES must be a positive integer (got '${NUM_PROCESSES}')"
if ! [[ "${PROCESS_ID}" =~ ^(0|[1-9][0-9]*)$ ]] ||
  ((PROCESS_ID >= NUM_PROCESSES)); then
  die "PROCESS_ID must be an integer in [0, ${NUM_PROCESSES}) (got '${PROCESS_ID}')"
fi
[[ -f "${REPO_ROOT}/${CONFIG}" ]] ||
  die "CONFIG '${CONFIG}' not found under ${REPO_ROOT}"

cmd=("${PYTHON}" -m rcae_jax.main --config "${CONFIG}" --workdir "${WORKDIR}")
if [[ -n "${EXTRA_ARGS}" ]]; then
  read -r -a extra <<<"${EXTRA_ARGS}"
  cmd+=("${extra[@]}")
fi

export RCAE_JAX_COORDINATOR="${COORDINATOR_ADDRESS}"
export RCAE_JAX_NUM_PROCESSES="${NUM_PROCESSES}"
export RCAE_JAX_PROCESS_ID="${PROCESS_ID}"
trace=()
for var in RCAE_JAX_COORDINATOR RCAE_JAX_NUM_PROCESSES RCAE_JAX_PROCESS_ID; do
  trace+=("+ export ${var}=$(quote_cmd "${!var}")")
done
trace+=("+ $(quote_cmd "${cmd[@]}")")
if [[ "${DRY_RUN}" == 1 ]]; then
  printf '%s\n' "${trace[@]}"
  exit 0
fi
printf '%s\n' "${trace[@]}" >&2
cd "${REPO_ROOT}"
# exec: the program replaces this shell, so signals reach it directly.
exec "${cmd[@]}"
