#!/usr/bin/env bash
# Delete a leftover TPU VM (e.g. one kept with KEEP_VM=1, or one whose
# launcher died before its cleanup ran). A TPU VM bills until deleted.
set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "${LAUNCH_DIR}/common.sh"

usage() {
  cat <<'USAGE'
Usage: PROJECT=... ZONE=... TPU_NAME=... launch/tpu_delete.sh [--dry-run] [--help]

Deletes the Cloud TPU VM TPU_NAME in ZONE of PROJECT (no confirmation).
Checkpoints in the run's gs:// WORKDIR are not touched.
To see what is still running:
  gcloud compute tpus tpu-vm list --zone=ZONE --project=PROJECT

Required environment variables: PROJECT, ZONE, TPU_NAME.
Flags:
  --dry-run   Print the command (prefixed "+ ") without running it.
  -h, --help  This text.
USAGE
}

parse_common_flags usage "$@"
require_vars PROJECT ZONE TPU_NAME
require_gcloud
run_or_echo gcloud compute tpus tpu-vm delete "${TPU_NAME}" \
  --zone="${ZONE}" --project="${PROJECT}" --quiet
