# shellcheck shell=bash
# Shared helpers of tpu_scripts/tpu.sh and tpu_scripts/supervise.sh (sourced, not run).
#
# Flags are --key=value; --dry_run prints every gcloud command (one line each, shell-quoted) instead of
# running it, and needs neither gcloud nor credentials. Errors: one line "PROG: error: ..." on stderr,
# exit 2 (missing gcloud, missing or bad parameter).

PROG=${PROG:-$(basename "$0")}
DRY_RUN=${DRY_RUN:-0}

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

# Shell-quote one word only when it needs it (readable --dry_run output that still pastes into a shell).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+~^-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 != *"'"* ]]; then
    printf "'%s'" "$1"
  elif [[ ! $1 =~ [\"\$\`\\!] ]]; then
    printf '"%s"' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" w
  for w in "$@"; do out+="$(quote "$w") "; done
  printf '%s' "${out% }"
}

# --dry_run prints commands on fd 3 = the script's stdout, also from inside $(...) captures.
exec 3>&1

# run CMD ARGS...: print it (--dry_run) or run it.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    quote_all "$@" >&3
    echo >&3
  else
    "$@"
  fi
}

need_gcloud() {
  [[ $DRY_RUN == 1 ]] && return 0
  command -v gcloud >/dev/null 2>&1 ||
    die "gcloud not found on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), then 'gcloud auth login' and 'gcloud config set project PROJECT'"
}

# need NAME VALUE: die unless VALUE is non-empty.
need() {
  [[ -n $2 ]] || die "--$1 is required (see '$PROG --help')"
}

# One-of check: one_of NAME VALUE CHOICE...
one_of() {
  local name=$1 value=$2 c
  shift 2
  for c in "$@"; do [[ $value == "$c" ]] && return 0; done
  die "--$name must be one of: $* (got '$value')"
}

# Default TPU runtime image for an accelerator type (v4-32 -> tpu-ubuntu2204-base, ...).
default_version() {
  case $1 in
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "tpu-ubuntu2204-base" ;;
  esac
}

# gcloud spells v5e slices "v5litepod-N".
accelerator_type() {
  case $1 in
    v5e-*) echo "v5litepod-${1#v5e-}" ;;
    *) echo "$1" ;;
  esac
}

# The worker's index inside the slice (TPU VM metadata), for per-worker log names; runs on the worker.
# shellcheck disable=SC2016,SC2034  # expanded on the worker, not here; used by the scripts sourcing this
WORKER_ID='$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null || hostname)'
