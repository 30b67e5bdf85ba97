#!/usr/bin/env bash
# Cloud TPU VMs / pod slices for fot: create, install, launch on every worker, status, tail, stop, delete.
#
#   tpu_scripts/tpu.sh create  --name=fot-v4 --zone=us-central2-b --accelerator=v4-32 [--mode=on-demand|spot|queued|queued-spot]
#   tpu_scripts/tpu.sh install --name=fot-v4 --zone=us-central2-b [--source=DIR | --repo=GIT_URL [--ref=REF]] [--extras=tpu,data]
#   tpu_scripts/tpu.sh launch  --name=fot-v4 --zone=us-central2-b [--run=NAME] [--module=fot.train] -- --gin_file=... --workdir=gs://...
#   tpu_scripts/tpu.sh status  --name=fot-v4 --zone=us-central2-b [--run=NAME]
#   tpu_scripts/tpu.sh tail    --name=fot-v4 --zone=us-central2-b [--run=NAME] [--lines=20] [--worker=all|N]
#   tpu_scripts/tpu.sh stop    --name=fot-v4 --zone=us-central2-b [--run=NAME] [--signal=TERM]
#   tpu_scripts/tpu.sh delete  --name=fot-v4 --zone=us-central2-b [--mode=queued]
# Common: [--project=PROJECT] [--dry_run] (print the gcloud commands, run nothing; no gcloud needed).
#
# launch runs `python -m MODULE ARGS` on --worker=all in the background: worker N logs to
# ~/fot_logs/RUN.wN.log on its own disk and keeps its pid in ~/fot_logs/RUN.pid. jax.distributed finds the
# other workers itself on a TPU slice (fot.train --distributed=auto); the workdir must be on storage every
# worker sees (gs://...). stop sends SIGTERM by default: fot.train saves a checkpoint and exits 5, and a
# later launch with the same arguments resumes from it. Spot slices: tpu_scripts/supervise.sh.
set -euo pipefail
HERE=$(cd "${BASH_SOURCE[0]%/*}" && pwd)
PROG=tpu.sh
# shellcheck source=tpu_scripts/lib.sh
source "$HERE/lib.sh"

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }

verb=${1:-}
[[ -n $verb ]] || { usage >&2; die "no verb given (create, install, launch, status, tail, stop, delete)"; }
shift
case $verb in -h | --help | help) usage; exit 0 ;; esac

name="" zone="" project="" accelerator="" version="" mode="" source_dir="" repo="" ref="" extras="tpu,data"
run_name="train" module="fot.train" lines=20 worker="all" signal="TERM"
cmd=()
while (($#)); do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --accelerator=*) accelerator=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --mode=*) mode=${1#*=} ;;
    --source=*) source_dir=${1#*=} ;;
    --repo=*) repo=${1#*=} ;;
    --ref=*) ref=${1#*=} ;;
    --extras=*) extras=${1#*=} ;;
    --run=*) run_name=${1#*=} ;;
    --module=*) module=${1#*=} ;;
    --lines=*) lines=${1#*=} ;;
    --worker=*) worker=${1#*=} ;;
    --signal=*) signal=${1#*=} ;;
    --dry_run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; cmd=("$@"); break ;;
    *) die "unknown argument '$1' for '$verb' (flags are --key=value; the training command goes after --)" ;;
  esac
  shift
done

need name "$name"
need zone "$zone"
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name must be lower-case letters, digits and dashes, got '$name'"
[[ $run_name =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run must be letters, digits, '_', '.', '-', got '$run_name'"
need_gcloud
proj=()
[[ -n $project ]] && proj=(--project="$project")
tpu=(gcloud compute tpus tpu-vm)
ssh_all() { run "${tpu[@]}" ssh "$name" --zone="$zone" "${proj[@]}" --worker="$1" --command="$2"; }

case $verb in
  create)
    need accelerator "$accelerator"
    [[ $accelerator =~ ^v[0-9][a-z]*-[0-9]+$ ]] || die "--accelerator must look like v4-32, v5e-16, v5p-64, got '$accelerator'"
    mode=${mode:-on-demand}
    one_of mode "$mode" on-demand spot queued queued-spot
    type=$(accelerator_type "$accelerator")
    version=${version:-$(default_version "$accelerator")}
    case $mode in
      on-demand) run "${tpu[@]}" create "$name" --zone="$zone" "${proj[@]}" --accelerator-type="$type" --version="$version" ;;
      spot) run "${tpu[@]}" create "$name" --zone="$zone" "${proj[@]}" --accelerator-type="$type" --version="$version" --spot ;;
      queued | queued-spot)
        spot=()
        [[ $mode == queued-spot ]] && spot=(--spot)
        run gcloud compute tpus queued-resources create "$name" --zone="$zone" "${proj[@]}" --node-id="$name" \
          --accelerator-type="$type" --runtime-version="$version" "${spot[@]}"
        echo "$PROG: queued; 'gcloud compute tpus queued-resources describe $name --zone=$zone' shows when it is ACTIVE" >&2
        ;;
    esac
    ;;
  install)
    [[ -n $repo && -n $source_dir ]] && die "give --source or --repo, not both"
    [[ $extras =~ ^[a-z,]*$ ]] || die "--extras must be a comma-separated list such as tpu,data, got '$extras'"
    setup="python3 -m venv ~/fot/.venv && ~/fot/.venv/bin/pip install -q --upgrade pip && ~/fot/.venv/bin/pip install -q -e \"\$HOME/fot[$extras]\""
    if [[ -n $repo ]]; then
      checkout=""
      [[ -n $ref ]] && checkout=" && git -C ~/fot checkout -q $(quote "$ref")"
      ssh_all all "rm -rf ~/fot && git clone -q $(quote "$repo") ~/fot$checkout && $setup"
    else
      src=${source_dir:-$(cd "$HERE/.." && pwd)}
      [[ -f $src/setup.py ]] || die "--source=$src is not a fot checkout (no setup.py)"
      tarball=${TMPDIR:-/tmp}/fot-src-$name.tar.gz
      # The checkout's files (tracked and new, not ignored: no .venv, runs/ or checkpoints).
      if [[ $DRY_RUN == 1 ]]; then
        echo "git -C $(quote "$src") ls-files -z --cached --others --exclude-standard | tar -C $(quote "$src") --null -T - -czf $(quote "$tarball")"
      else
        git -C "$src" ls-files -z --cached --others --exclude-standard | tar -C "$src" --null -T - -czf "$tarball"
      fi
      run "${tpu[@]}" scp "$tarball" "$name":fot-src.tar.gz --zone="$zone" "${proj[@]}" --worker=all
      ssh_all all "rm -rf ~/fot && mkdir -p ~/fot && tar -xzf ~/fot-src.tar.gz -C ~/fot && $setup"
    fi
    ;;
  launch)
    ((${#cmd[@]})) || die "no arguments for python -m $module after -- (e.g. -- --gin_file=gin/dictionary_paper.gin --workdir=gs://BUCKET/run)"
    [[ $module =~ ^fot\.[a-z_.]+$ ]] || die "--module must be a fot module such as fot.train or fot.eval, got '$module'"
    # Refuse to start a second copy of the same run on a worker; otherwise start detached.
    remote="mkdir -p ~/fot_logs && cd ~/fot || exit 1; w=$WORKER_ID; "
    remote+="if [ -f ~/fot_logs/$run_name.pid ] && kill -0 \$(cat ~/fot_logs/$run_name.pid) 2>/dev/null; then "
    remote+="echo \"worker \$w: run $run_name is already running\" >&2; exit 3; fi; "
    remote+="setsid nohup .venv/bin/python -m $module $(quote_all "${cmd[@]}") > ~/fot_logs/$run_name.w\$w.log 2>&1 < /dev/null & "
    remote+="echo \$! > ~/fot_logs/$run_name.pid; echo \"worker \$w: started $module (log ~/fot_logs/$run_name.w\$w.log)\""
    ssh_all all "$remote"
    ;;
  status)
    run "${tpu[@]}" describe "$name" --zone="$zone" "${proj[@]}" --format="value(state,health,acceleratorType)"
    ssh_all all "w=$WORKER_ID; if [ -f ~/fot_logs/$run_name.pid ] && kill -0 \$(cat ~/fot_logs/$run_name.pid) 2>/dev/null; then s=running; else s=stopped; fi; echo \"worker \$w: $run_name \$s | \$(grep -a '^step ' ~/fot_logs/$run_name.w\$w.log 2>/dev/null | tail -n 1)\""
    ;;
  tail)
    [[ $lines =~ ^[0-9]+$ ]] || die "--lines must be a number, got '$lines'"
    [[ $worker == all || $worker =~ ^[0-9]+$ ]] || die "--worker must be all or a worker index, got '$worker'"
    ssh_all "$worker" "w=$WORKER_ID; tail -n $lines ~/fot_logs/$run_name.w\$w.log | sed \"s/^/[worker \$w] /\""
    ;;
  stop)
    one_of signal "$signal" TERM INT KILL
    ssh_all all "w=$WORKER_ID; if [ -f ~/fot_logs/$run_name.pid ] && kill -$signal \$(cat ~/fot_logs/$run_name.pid) 2>/dev/null; then echo \"worker \$w: sent SIG$signal to $run_name\"; else echo \"worker \$w: $run_name is not running\"; fi"
    ;;
  delete)
    mode=${mode:-tpu-vm}
    one_of mode "$mode" tpu-vm queued
    if [[ $mode == queued ]]; then
      run gcloud compute tpus queued-resources delete "$name" --zone="$zone" "${proj[@]}" --force --quiet
    else
      run "${tpu[@]}" delete "$name" --zone="$zone" "${proj[@]}" --quiet
    fi
    ;;
  *) die "unknown verb '$verb' (create, install, launch, status, tail, stop, delete)" ;;
esac
