# Shared helpers for the launch scripts. Source it, do not run it:
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
#
# Provides:
#   DRY_RUN            0 or 1; set by parse_common_flags (--dry-run).
#   die MSG...         print "SCRIPT: error: MSG" to stderr and exit 1.
#   require_vars V...  exit 1 naming every unset/empty variable among V...
#   quote_cmd ARG...   print the arguments as one copy-pasteable shell line.
#   run_or_echo ARG... print "+ CMD"; run it unless DRY_RUN=1.
#   run_or_echo_sh STR print "+ STR"; run it with bash -c unless DRY_RUN=1
#                      (for pipelines).
#   exit_on_signal N   trap handler: stop the running command, exit N.
#   parse_common_flags USAGE_FUNC "$@"
#                      handles --dry-run and -h/--help; any other argument
#                      is an error.

# shellcheck shell=bash

DRY_RUN="${DRY_RUN:-0}"
LAUNCH_SCRIPT_NAME="$(basename "${0}")"

die() {
  echo "${LAUNCH_SCRIPT_NAME}: error: $*" >&2
  exit 1
}

# require_vars NAME... : every NAME must be set and non-empty. All missing
# ones are reported in one message so that one fix-up round is enough.
require_vars() {
  local name
  local -a missing=()
  for name in "$@"; do
    if [[ -z "${!name:-}" ]]; then
      missing+=("${name}")
    fi
  done
  if ((${#missing[@]})); then
    die "missing required environment variable(s): ${missing[*]}" \
      "(run with --help for what each one means)"
  fi
}

# quote_cmd ARG... : arguments that are plain words stay as they are, the
# rest are single-quoted, so that the printed line can be pasted into bash.
quote_cmd() {
  local arg out="" sq="'" esc="'\\''"
  for arg in "$@"; do
    if [[ -n "${arg}" && "${arg}" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="${arg} "
    else
      out+="'${arg//${sq}/${esc}}' "
    fi
  done
  printf '%s\n' "${out% }"
}

# run_or_echo ARG... : show the command (prefixed with "+ "); run it unless
# this is a dry run. The trace goes to stdout in a dry run (it IS the
# output) and to stderr otherwise (next to the command's own output).
run_or_echo() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    printf '+ %s\n' "$(quote_cmd "$@")"
  else
    printf '+ %s\n' "$(quote_cmd "$@")" >&2
    run_child "$@"
  fi
}

# run_child ARG... : run a command so that a TERM/INT sent to this script
# (not only Ctrl-C, which reaches the whole process group) stops it at
# once: bash defers traps while a foreground child runs, but not during
# `wait`. Standard input stays the script's (gcloud may prompt).
LAUNCH_CHILD=''
run_child() {
  "$@" <&0 &
  LAUNCH_CHILD=$!
  local rc=0
  wait "${LAUNCH_CHILD}" || rc=$?
  LAUNCH_CHILD=''
  return "${rc}"
}

# exit_on_signal CODE : for `trap 'exit_on_signal 143' TERM`; stops the
# running child, then exits (which runs the EXIT trap).
exit_on_signal() {
  if [[ -n "${LAUNCH_CHILD}" ]]; then
    kill -TERM "${LAUNCH_CHILD}" 2>/dev/null || true
    wait "${LAUNCH_CHILD}" 2>/dev/null || true
    LAUNCH_CHILD=''
  fi
  exit "$1"
}

# run_or_echo_sh STRING : like run_or_echo for a shell snippet (pipes).
run_or_echo_sh() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    printf '+ %s\n' "$1"
  else
    printf '+ %s\n' "$1" >&2
    run_child bash -c "set -euo pipefail; $1"
  fi
}

# parse_common_flags USAGE_FUNC ARGS... : --dry-run sets DRY_RUN=1,
# -h/--help prints USAGE_FUNC's text and exits 0.
parse_common_flags() {
  local usage_func="$1"
  shift
  local arg
  for arg in "$@"; do
    case "${arg}" in
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        "${usage_func}"
        exit 0
        ;;
      *)
        "${usage_func}" >&2
        die "unknown argument '${arg}' (settings are environment variables)"
        ;;
    esac
  done
}

# require_gcloud : a real (not dry) run needs the Cloud SDK.
require_gcloud() {
  if [[ "${DRY_RUN}" != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found on PATH; install the Google Cloud SDK" \
      "(https://cloud.google.com/sdk/docs/install) or use --dry-run"
  fi
}
