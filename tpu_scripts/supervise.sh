#!/usr/bin/env bash
# Keep a training run going on a spot / preemptible TPU slice: (re)create the slice when it is missing or
# preempted, install fot, run the training command on every worker in the foreground, and repeat until
# WORKDIR/results.json says the run finished. fot.train resumes from the latest checkpoint in the workdir
# by itself, so every relaunch continues where the last one stopped.
#
#   tpu_scripts/supervise.sh --name=fot-v4 --zone=us-central2-b --accelerator=v4-32 --workdir=gs://BUCKET/run \
#       [--mode=spot|queued-spot|on-demand|queued] [--max_restarts=20] [--poll_seconds=60] [--project=P] \
#       [--source=DIR | --repo=GIT_URL [--ref=REF]] [--dry_run] -- --gin_file=gin/dictionary_paper.gin ...
#
# Stops with exit 0 when results.json reports "completed" or "time_budget"; exit 2 when fot.train reports a
# configuration error (exit 2 on a worker) or after --max_restarts relaunches. --dry_run prints the
# commands of one cycle (slice missing: create, install, run, read results) and runs nothing.
set -euo pipefail
HERE=$(cd "${BASH_SOURCE[0]%/*}" && pwd)
PROG=supervise.sh
# shellcheck source=tpu_scripts/lib.sh
source "$HERE/lib.sh"

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

name="" zone="" project="" accelerator="" workdir="" mode="spot" max_restarts=20 poll=60
passthrough=()
cmd=()
while (($#)); do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=}; passthrough+=("$1") ;;
    --accelerator=*) accelerator=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --mode=*) mode=${1#*=} ;;
    --max_restarts=*) max_restarts=${1#*=} ;;
    --poll_seconds=*) poll=${1#*=} ;;
    --source=* | --repo=* | --ref=* | --extras=*) passthrough+=("$1") ;;
    --dry_run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; cmd=("$@"); break ;;
    *) die "unknown argument '$1' (flags are --key=value; the fot.train arguments go after --)" ;;
  esac
  shift
done
need name "$name"
need zone "$zone"
need accelerator "$accelerator"
need workdir "$workdir"
one_of mode "$mode" spot queued-spot on-demand queued
[[ $workdir == gs://* ]] || die "--workdir must be a gs:// path (every worker, and this supervisor, must see it; a slice's disks go with it), got '$workdir'"
[[ $max_restarts =~ ^[0-9]+$ ]] || die "--max_restarts must be a number, got '$max_restarts'"
[[ $poll =~ ^[0-9]+$ ]] || die "--poll_seconds must be a number, got '$poll'"
((${#cmd[@]})) || die "no fot.train arguments after -- (e.g. -- --gin_file=gin/dictionary_paper.gin)"
for a in "${cmd[@]}"; do [[ $a == --workdir=* ]] && die "give the workdir as --workdir before --, not in the fot.train arguments"; done
need_gcloud
proj=()
[[ -n $project ]] && proj=(--project="$project")
common=(--name="$name" --zone="$zone")
((DRY_RUN)) && common+=(--dry_run)
log() { echo "$PROG: $(date -u +%FT%TZ) $*" >&2; }

# State of the slice: READY, CREATING, PREEMPTED, TERMINATED, ... or MISSING.
slice_state() {
  if ((DRY_RUN)); then
    run gcloud compute tpus tpu-vm describe "$name" --zone="$zone" "${proj[@]}" --format="value(state)"
    echo MISSING
    return
  fi
  gcloud compute tpus tpu-vm describe "$name" --zone="$zone" "${proj[@]}" --format="value(state)" 2>/dev/null || echo MISSING
}

# "stopped" field of WORKDIR/results.json (completed, time_budget, preempted) or "none".
run_outcome() {
  if ((DRY_RUN)); then
    run gcloud storage cat "$workdir/results.json"
    echo none
    return
  fi
  gcloud storage cat "$workdir/results.json" 2>/dev/null |
    python3 -c 'import json,sys; print(json.loads(sys.stdin.read() or "{}").get("stopped", "none"))' 2>/dev/null || echo none
}

create_slice() {
  local state=$1
  if [[ $state != MISSING ]]; then
    log "slice $name is $state: deleting it"
    case $mode in
      queued*) "$HERE/tpu.sh" delete "${common[@]}" "${passthrough[@]}" --mode=queued ;;
      *) "$HERE/tpu.sh" delete "${common[@]}" "${passthrough[@]}" ;;
    esac
  fi
  log "creating $accelerator slice $name ($mode)"
  "$HERE/tpu.sh" create "${common[@]}" "${passthrough[@]}" --accelerator="$accelerator" --mode="$mode"
  if ((!DRY_RUN)); then
    until [[ $(slice_state) == READY ]]; do log "waiting for $name to be READY"; sleep "$poll"; done
  fi
  # shellcheck disable=SC2046  # --source/--repo/--ref/--extras/--project only
  "$HERE/tpu.sh" install "${common[@]}" $(printf '%s\n' "${passthrough[@]}" | grep -E '^--(source|repo|ref|extras|project)=' || true)
}

restarts=0
while true; do
  state=$(slice_state)
  if [[ $state != READY ]]; then
    ((restarts <= max_restarts)) || die "slice $name lost $restarts times; giving up (--max_restarts=$max_restarts)"
    create_slice "$state"
  fi
  log "running on every worker of $name (attempt $((restarts + 1)))"
  remote="cd ~/fot && mkdir -p ~/fot_logs && w=$WORKER_ID && .venv/bin/python -m fot.train $(quote_all "${cmd[@]}") --workdir=$(quote "$workdir") 2>&1 | tee -a ~/fot_logs/supervised.w\$w.log; exit \${PIPESTATUS[0]}"
  rc=0
  run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" "${proj[@]}" --worker=all --command="$remote" || rc=$?
  outcome=$(run_outcome)
  log "fot.train exited with $rc; results.json: stopped=$outcome"
  case $outcome in
    completed | time_budget) log "run finished ($outcome)"; exit 0 ;;
  esac
  ((rc == 2)) && die "fot.train reported a configuration error (exit 2); see ~/fot_logs/supervised.w*.log on the workers"
  ((DRY_RUN)) && exit 0
  restarts=$((restarts + 1))
  ((restarts <= max_restarts)) || die "run stopped $restarts times without finishing; giving up (--max_restarts=$max_restarts)"
  sleep "$poll"
done
