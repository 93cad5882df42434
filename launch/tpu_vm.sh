#!/usr/bin/env bash
# Runs k2jax-train on every worker of a Cloud TPU VM slice, detached from the ssh session that starts it.
#
#   launch/tpu_vm.sh VERB --tpu=NAME --zone=ZONE [--project=ID] [options] [-- TRAIN_FLAGS...]
#
# Verbs (each runs on all workers at once through `gcloud compute tpus tpu-vm ssh --worker=all`):
#   copy      ships the working tree of --src (tracked and untracked files git does not ignore), or the git
#             revision --rev, to --repo on every worker
#   install   runs --install-command in --repo on every worker (default: pip install -e '.[tpu]')
#   start     starts `k2jax-train --distributed TRAIN_FLAGS` on every worker with nohup/setsid, so it outlives
#             the ssh session and the launching machine; output goes to ~/k2jax-runs/RUN/train.log on each
#             worker. After --check-after seconds every worker must still be running: a worker that exited is
#             reported with its log, and the others are stopped. --workdir must be a gs:// URL (the workers
#             share no disk). A second start with the same --workdir resumes from its checkpoints.
#   status    one line per worker: running (pid) / exited (status) / not started, and its last log line
#   logs      the last --lines of one worker's log (--worker=N; --follow keeps following it)
#   stop      SIGTERM to every worker: the run saves a checkpoint and exits; waits up to --stop-timeout s
#   (none)    with TRAIN_FLAGS: copy if --copy, install if --install, then start
#
# Options: --repo=DIR (remote checkout, default $HOME/k2jax), --run=NAME (default k2jax), --src=DIR (default:
# this repository), --rev=REV, --install-command=CMD, --check-after=S (default 30), --stop-timeout=S (default
# 600), --worker=N, --lines=N (default 50), --follow, --dry-run (prints every gcloud command, runs none).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/workdir.sh
source "$here/workdir.sh"
verb="" tpu="" zone="" project="" repo="\$HOME/k2jax" run="k2jax" src="$here/.." rev=""
install_cmd="pip install -e '.[tpu]'" check_after=30 stop_timeout=600 worker="" lines=50 follow=0
do_copy=0 do_install=0 dry=0
case "${1:-}" in
  copy|install|start|status|logs|stop) verb="$1"; shift ;;
esac
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --repo=*) repo="${1#*=}" ;;
    --run=*) run="${1#*=}" ;;
    --src=*) src="${1#*=}" ;;
    --rev=*) rev="${1#*=}" ;;
    --install-command=*) install_cmd="${1#*=}" ;;
    --check-after=*) check_after="${1#*=}" ;;
    --stop-timeout=*) stop_timeout="${1#*=}" ;;
    --worker=*) worker="${1#*=}" ;;
    --lines=*) lines="${1#*=}" ;;
    --follow) follow=1 ;;
    --copy) do_copy=1 ;;
    --install) do_install=1 ;;
    --dry-run) dry=1 ;;
    --) shift; break ;;
    *) echo "tpu_vm.sh: unknown option $1 (train flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$tpu" ]] || { echo "tpu_vm.sh: --tpu=NAME is required" >&2; exit 2; }
[[ -n "$zone" ]] || { echo "tpu_vm.sh: --zone=ZONE is required" >&2; exit 2; }
[[ "$run" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "tpu_vm.sh: --run=$run: letters, digits, '.', '_' and '-' only" >&2; exit 2; }
train_flags=("$@")

target=("$tpu" "--zone=$zone")
[[ -n "$project" ]] && target+=("--project=$project")
rundir="\$HOME/k2jax-runs/$run"
# shellcheck disable=SC2016  # expanded on the worker, not here
# the worker's index: TPU_WORKER_ID where the environment has it, else the TPU VM metadata, else the host name
whoami_sh='w=${TPU_WORKER_ID:-$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null || hostname)}'

show() {
  printf '%q ' "$@"
  printf '\n'
}

# on_workers WORKERS COMMAND: runs COMMAND (a shell string) on the given workers (all, or an index)
on_workers() {
  local cmd=(gcloud compute tpus tpu-vm ssh "${target[@]}" "--worker=$1" "--command=$2")
  if [[ $dry -eq 1 ]]; then show "${cmd[@]}"; else "${cmd[@]}"; fi
}

# shellcheck disable=SC2016  # expanded on the worker, not here
status_sh="$whoami_sh; d=$rundir; "'if [ -f "$d/pid" ] && kill -0 "$(cat "$d/pid")" 2>/dev/null; then s="running (pid $(cat "$d/pid"))"; elif [ -f "$d/exit" ]; then s="exited with status $(cat "$d/exit")"; elif [ -f "$d/pid" ]; then s="exited"; else s="not started"; fi; echo "worker $w: $s | $(tail -n 1 "$d/train.log" 2>/dev/null)"'

do_copy_verb() {
  local archive
  archive="$(mktemp -t k2jax-src.XXXXXX).tar.gz"
  if [[ -n "$rev" ]]; then
    [[ $dry -eq 1 ]] || git -C "$src" archive --format=tar.gz -o "$archive" "$rev"
  elif [[ $dry -ne 1 ]]; then
    (cd "$src" && git ls-files -z --cached --others --exclude-standard |
      xargs -0 -I{} sh -c 'test -e "{}" && printf "%s\0" "{}"' | tar czf "$archive" --null -T -)
  fi
  local scp=(gcloud compute tpus tpu-vm scp "$archive" "$tpu:k2jax-src.tar.gz" "--zone=$zone" --worker=all)
  [[ -n "$project" ]] && scp+=("--project=$project")
  if [[ $dry -eq 1 ]]; then show "${scp[@]}"; else "${scp[@]}"; fi
  on_workers all "$whoami_sh; rm -rf $repo.new && mkdir -p $repo.new && tar xzf \$HOME/k2jax-src.tar.gz -C $repo.new && rm -rf $repo && mv $repo.new $repo && echo \"worker \$w: code in $repo (${rev:-working tree})\""
  rm -f "$archive"
}

do_start_verb() {
  gs_workdir tpu_vm.sh "${train_flags[@]}" > /dev/null || exit 2
  local train="k2jax-train --distributed"
  for arg in "${train_flags[@]}"; do
    train+=" $(printf '%q' "$arg")"
  done
  local inner
  inner="$train >> $rundir/train.log 2>&1 & echo \$! > $rundir/pid; wait \$!; echo \$? > $rundir/exit"
  on_workers all "$whoami_sh; export PATH=\$HOME/.local/bin:\$PATH; mkdir -p $rundir && cd $repo && if [ -f $rundir/pid ] && kill -0 \$(cat $rundir/pid) 2>/dev/null; then echo \"worker \$w: already running (pid \$(cat $rundir/pid))\"; exit 3; fi; rm -f $rundir/pid $rundir/exit; nohup setsid bash -c $(printf '%q' "$inner") > /dev/null 2>&1 < /dev/null & for _ in \$(seq 50); do [ -f $rundir/pid ] && break; sleep 0.1; done; echo \"worker \$w: started pid \$(cat $rundir/pid), log $rundir/train.log\""
  [[ $dry -eq 1 ]] && return
  echo "tpu_vm.sh: checking in ${check_after}s that every worker is still running"
  sleep "$check_after"
  local report
  report="$(on_workers all "$status_sh")"
  echo "$report"
  if grep -qv ': running (pid' <<<"$report"; then
    echo "tpu_vm.sh: some workers did not start or died at once; their logs:" >&2
    grep -v ': running (pid' <<<"$report" | sed -n 's/^worker \([^:]*\):.*/\1/p' | while read -r w; do
      echo "--- worker $w" >&2
      on_workers "$w" "tail -n 20 $rundir/train.log 2>/dev/null" >&2 || true
    done
    echo "tpu_vm.sh: stopping the workers that are still running" >&2
    do_stop_verb >&2 || true
    exit 1
  fi
}

do_stop_verb() {
  on_workers all "$whoami_sh; d=$rundir; if [ -f \$d/pid ] && kill -0 \$(cat \$d/pid) 2>/dev/null; then kill -TERM \$(cat \$d/pid) && echo \"worker \$w: SIGTERM sent to pid \$(cat \$d/pid)\"; else echo \"worker \$w: not running\"; fi"
  [[ $dry -eq 1 ]] && return
  local t0=$SECONDS report
  while :; do
    report="$(on_workers all "$status_sh")"
    grep -q ': running (pid' <<<"$report" || break
    if (( SECONDS - t0 > stop_timeout )); then
      echo "$report"
      echo "tpu_vm.sh: workers still running after ${stop_timeout}s (above)" >&2
      return 1
    fi
    sleep 2
  done
  echo "$report"
}

case "$verb" in
  copy) do_copy_verb ;;
  install) on_workers all "$whoami_sh; cd $repo && $install_cmd && echo \"worker \$w: installed\"" ;;
  start) do_start_verb ;;
  status)
    report="$(on_workers all "$status_sh")"
    echo "$report"
    if grep -q ': running (pid' <<<"$report" && grep -Eq ': exited with status [1-9]' <<<"$report"; then
      echo "tpu_vm.sh: a worker failed while others still run; they will wait in their next collective: see 'logs --worker=N', then 'stop'" >&2
    fi ;;
  logs)
    [[ -n "$worker" ]] || { echo "tpu_vm.sh: logs needs --worker=N" >&2; exit 2; }
    if [[ $follow -eq 1 ]]; then on_workers "$worker" "tail -n $lines -f $rundir/train.log"
    else on_workers "$worker" "tail -n $lines $rundir/train.log"; fi ;;
  stop) do_stop_verb ;;
  "")
    [[ ${#train_flags[@]} -gt 0 ]] || { echo "tpu_vm.sh: give a verb (copy, install, start, status, logs, stop) or train flags after --" >&2; exit 2; }
    [[ $do_copy -eq 1 ]] && do_copy_verb
    [[ $do_install -eq 1 ]] && on_workers all "cd $repo && $install_cmd"
    do_start_verb ;;
esac
