#!/usr/bin/env bash
# Train + evaluate rcae_jax on a Cloud TPU VM or pod slice, end to end:
# create the VM, put the code on every worker, install, run, delete.
# Run `launch/tpu_run.sh --help` for the settings; docs/tpu.md for more.
set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${LAUNCH_DIR}/.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "${LAUNCH_DIR}/common.sh"

# Where things live on every worker; $HOME is expanded by the remote shell.
# shellcheck disable=SC2016
REMOTE_CODE='$HOME/rcae_jax'
# shellcheck disable=SC2016
REMOTE_VENV='$HOME/rcae_venv'
# shellcheck disable=SC2016
REMOTE_DATA='$HOME/rcae_data'
LIBTPU_URL='https://storage.googleapis.com/jax-releases/libtpu_releases.html'

usage() {
  cat <<'EOF'
Usage: [VAR=value ...] launch/tpu_run.sh [--dry-run] [--help]

Creates a Cloud TPU VM (single host or pod slice), copies or clones this
code to every worker, installs it, runs
  python -m rcae_jax.main --config $CONFIG --workdir $WORKDIR $EXTRA_ARGS
on all workers at once (logs stream here), then deletes the VM.

Required environment variables:
  PROJECT           Google Cloud project id.
  ZONE              Zone with TPU quota, e.g. us-west4-a (v5e), us-central2-b (v4).
  ACCELERATOR_TYPE  e.g. v5litepod-8 (one host), v4-8, v4-32 (pod slice), v6e-8.
  TPU_NAME          Name of the TPU VM to create (and delete at the end).
  WORKDIR           gs:// folder for checkpoints, logs and metrics. Rerunning
                    with the same WORKDIR resumes from its latest checkpoint.

Optional:
  RUNTIME_VERSION   TPU software version. Default by ACCELERATOR_TYPE:
                    v5litepod-*/v5e-* v2-alpha-tpuv5-lite, v5p-* v2-alpha-tpuv5,
                    v6e-* v2-alpha-tpuv6e, others (v2, v3, v4) tpu-ubuntu2204-base.
  CONFIG            Config file, relative to the repo root (configs/tpu.py).
  EXTRA_ARGS        Extra flags for rcae_jax.main, split by the remote shell,
                    e.g. '--config.data.category=screw --config.seed=1'.
  REPO_URL          git URL to clone on every worker (REPO_REF: branch or tag).
                    Unset: this local checkout is copied (without .venv, .git,
                    workdirs) with `gcloud compute tpus tpu-vm scp --recurse`.
  DATA_URL          gs:// folder holding MVTec-AD category folders; synced to
                    $HOME/rcae_data on every worker, which becomes data.root.
  SPOT=1            Create a Spot VM (cheaper, can be preempted; rerun to resume).
  KEEP_VM=1         Do not delete the VM at the end (it keeps billing!).
  SKIP_CREATE=1     Reuse an existing VM named TPU_NAME (e.g. kept by KEEP_VM=1);
                    it is still deleted at the end unless KEEP_VM=1.
  CREATE_ARGS       Extra flags for `tpu-vm create`, e.g.
                    '--service-account=SA@PROJECT.iam.gserviceaccount.com'.
  PYTHON            Python 3.11+ interpreter on the VM (python3.11; installed
                    with apt when missing).

Flags:
  --dry-run         Print every command (one per line, prefixed "+ "), run none.
  -h, --help        This text.

Example:
  PROJECT=my-proj ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-8 \
  TPU_NAME=rcae-v5e WORKDIR=gs://my-bucket/rcae/bottle launch/tpu_run.sh
EOF
}

default_runtime_version() {
  case "$1" in
    v5litepod-* | v5e-*) echo 'v2-alpha-tpuv5-lite' ;;
    v5p-*) echo 'v2-alpha-tpuv5' ;;
    v6e-*) echo 'v2-alpha-tpuv6e' ;;
    *) echo 'tpu-ubuntu2204-base' ;;
  esac
}

# ------------------------------------------------------------- settings
parse_common_flags usage "$@"
require_vars PROJECT ZONE ACCELERATOR_TYPE TPU_NAME WORKDIR

CONFIG="${CONFIG:-configs/tpu.py}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-}"
DATA_URL="${DATA_URL:-}"
SPOT="${SPOT:-0}"
KEEP_VM="${KEEP_VM:-0}"
SKIP_CREATE="${SKIP_CREATE:-0}"
CREATE_ARGS="${CREATE_ARGS:-}"
PYTHON="${PYTHON:-python3.11}"
RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime_version "${ACCELERATOR_TYPE}")}"

[[ "${WORKDIR}" == gs://?* ]] ||
  die "WORKDIR must be a gs:// folder (got '${WORKDIR}'): the VM is deleted" \
    "at the end, so checkpoints and metrics must live in Cloud Storage"
[[ -z "${DATA_URL}" || "${DATA_URL}" == gs://?* ]] ||
  die "DATA_URL must start with gs:// (got '${DATA_URL}')"
[[ "${ACCELERATOR_TYPE}" =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
  die "ACCELERATOR_TYPE '${ACCELERATOR_TYPE}' does not look like v5litepod-8 or v4-32"
for flag in SPOT KEEP_VM SKIP_CREATE; do
  [[ "${!flag}" == 0 || "${!flag}" == 1 ]] ||
    die "${flag} must be 0 or 1 (got '${!flag}')"
done
if [[ -z "${REPO_URL}" && ! -f "${REPO_ROOT}/${CONFIG}" ]]; then
  die "CONFIG '${CONFIG}' not found under ${REPO_ROOT} (give it relative to the repo root)"
fi
require_gcloud

LOCATION=(--zone="${ZONE}" --project="${PROJECT}")

# Runs a shell snippet on every worker at once (output streams back).
on_all_workers() {
  run_or_echo gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${LOCATION[@]}" \
    --worker=all --command="$1"
}

# -------------------------------------------------------------- cleanup
STAGE_DIR=''
# 1 once the VM is ours to delete: created by this run, or SKIP_CREATE=1.
# A failed create deletes nothing: the name may belong to another VM.
VM_OWNED=0
cleanup() {
  local rc=$?
  trap - EXIT
  if [[ -n "${STAGE_DIR}" && "${DRY_RUN}" != 1 ]]; then
    rm -rf "${STAGE_DIR}"
  fi
  if [[ "${VM_OWNED}" != 1 ]]; then
    echo "${LAUNCH_SCRIPT_NAME}: the VM was not created, so nothing is" \
      "deleted; if one was left half-made, see: gcloud compute tpus tpu-vm" \
      "list ${LOCATION[*]} (and launch/tpu_delete.sh)" >&2
  elif [[ "${KEEP_VM}" == 1 ]]; then
    echo "${LAUNCH_SCRIPT_NAME}: KEEP_VM=1: TPU VM '${TPU_NAME}' is left" \
      "running and keeps billing; delete it with launch/tpu_delete.sh" >&2
  else
    run_or_echo gcloud compute tpus tpu-vm delete "${TPU_NAME}" \
      "${LOCATION[@]}" --quiet ||
      echo "${LAUNCH_SCRIPT_NAME}: warning: could not delete '${TPU_NAME}';" \
        "check with: gcloud compute tpus tpu-vm list ${LOCATION[*]}" >&2
  fi
  if ((rc != 0)); then
    echo "${LAUNCH_SCRIPT_NAME}: failed (exit ${rc}); rerun with the same" \
      "WORKDIR to resume from its latest checkpoint" >&2
  fi
  exit "${rc}"
}
# Ctrl-C / kill still delete the VM (the EXIT trap runs on these exits).
trap 'exit_on_signal 130' INT
trap 'exit_on_signal 143' TERM
trap cleanup EXIT

# ------------------------------------------------------------ 1. create
if [[ "${SKIP_CREATE}" == 1 ]]; then
  echo "${LAUNCH_SCRIPT_NAME}: SKIP_CREATE=1: using existing TPU VM '${TPU_NAME}'" >&2
  VM_OWNED=1
else
  create=(gcloud compute tpus tpu-vm create "${TPU_NAME}" "${LOCATION[@]}"
    --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}")
  if [[ "${SPOT}" == 1 ]]; then
    create+=(--spot)
  fi
  if [[ -n "${CREATE_ARGS}" ]]; then
    read -r -a extra_create <<<"${CREATE_ARGS}"
    create+=("${extra_create[@]}")
  fi
  run_or_echo "${create[@]}"
  VM_OWNED=1
fi

# ---------------------------------------------------- 2. code everywhere
if [[ -n "${REPO_URL}" ]]; then
  clone="git clone --depth 1"
  if [[ -n "${REPO_REF}" ]]; then
    clone+=" --branch $(quote_cmd "${REPO_REF}")"
  fi
  on_all_workers "set -euo pipefail; rm -rf \"${REMOTE_CODE}\"; ${clone} $(quote_cmd "${REPO_URL}") \"${REMOTE_CODE}\""
else
  if [[ "${DRY_RUN}" == 1 ]]; then
    STAGE_DIR="${TMPDIR:-/tmp}/rcae_jax_stage.XXXXXX"
  else
    STAGE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/rcae_jax_stage.XXXXXX")"
  fi
  # A clean copy named rcae_jax: no virtualenv, git history or run outputs.
  run_or_echo mkdir -p "${STAGE_DIR}/rcae_jax"
  run_or_echo_sh "tar -C $(quote_cmd "${REPO_ROOT}") --exclude=./.venv \
--exclude=./.git --exclude=./workdirs --exclude=./build --exclude=./.whl \
--exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' \
--exclude=.pytest_cache -cf - . | tar -C $(quote_cmd "${STAGE_DIR}/rcae_jax") -xf -"
  if [[ "${SKIP_CREATE}" == 1 ]]; then
    on_all_workers "rm -rf \"${REMOTE_CODE}\""
  fi
  run_or_echo gcloud compute tpus tpu-vm scp --recurse \
    "${STAGE_DIR}/rcae_jax" "${TPU_NAME}:" "${LOCATION[@]}" --worker=all
fi

# ----------------------------------------------------------- 3. data
data_flag=''
if [[ -n "${DATA_URL}" ]]; then
  on_all_workers "set -euo pipefail; mkdir -p \"${REMOTE_DATA}\"; gcloud storage rsync --recursive $(quote_cmd "${DATA_URL}") \"${REMOTE_DATA}\""
  data_flag=" --config.data.root=\"${REMOTE_DATA}\""
fi

# --------------------------------------------------------- 4. install
# jax[tpu] first, pinned to requirements.txt's jax so that the -r install
# keeps the TPU jaxlib/libtpu; then the pinned stack and the package.
install_steps=(
  'set -euo pipefail'
  "cd \"${REMOTE_CODE}\""
  "if ! command -v ${PYTHON} >/dev/null; then sudo apt-get -o DPkg::Lock::Timeout=600 update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq ${PYTHON} ${PYTHON}-venv; fi"
  "${PYTHON} -m venv \"${REMOTE_VENV}\""
  ". \"${REMOTE_VENV}/bin/activate\""
  'pip install -q --upgrade pip'
  "JAX_VERSION=\$(sed -n 's/^jax==//p' requirements.txt)"
  "pip install -q \"jax[tpu]\${JAX_VERSION:+==\$JAX_VERSION}\" -f ${LIBTPU_URL}"
  'pip install -q -r requirements.txt -e .'
)
install="$(printf '%s; ' "${install_steps[@]}")"
on_all_workers "${install%; }"

# ------------------------------------------------------------- 5. run
# RCAE_JAX_DISTRIBUTED=1: the code calls jax.distributed.initialize() with
# no arguments, which finds the other workers of a pod slice by itself.
main="python -m rcae_jax.main --config $(quote_cmd "${CONFIG}") --workdir $(quote_cmd "${WORKDIR}")${data_flag}"
if [[ -n "${EXTRA_ARGS}" ]]; then
  main+=" ${EXTRA_ARGS}"
fi
on_all_workers "set -euo pipefail; cd \"${REMOTE_CODE}\"; . \"${REMOTE_VENV}/bin/activate\"; export RCAE_JAX_DISTRIBUTED=1; ${main} 2>&1 | tee -a \"\$HOME/rcae_run.log\""

if [[ "${DRY_RUN}" == 1 ]]; then
  echo "${LAUNCH_SCRIPT_NAME}: dry run: nothing was run" >&2
else
  echo "${LAUNCH_SCRIPT_NAME}: done; results in ${WORKDIR}" >&2
fi
