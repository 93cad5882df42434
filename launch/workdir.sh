# shellcheck shell=bash
# Sourced by the launchers: the workdir rule every pod run follows.

# gs_workdir SCRIPT TRAIN_FLAGS...: prints the --workdir among the train flags; exits 2 naming SCRIPT unless it is
# a gs:// URL (the hosts of a pod share no disk: checkpoints and metrics go to a bucket every host can reach)
gs_workdir() {
  local script="$1" workdir="" arg
  shift
  for arg in "$@"; do
    case "$arg" in --workdir=*) workdir="${arg#*=}" ;; esac
  done
  if [[ "$workdir" != gs://* ]]; then
    echo "$script: the train flags need --workdir=gs://BUCKET/PATH (got '${workdir:-nothing}'): the hosts share no disk, so checkpoints and metrics must go to a bucket every host can reach" >&2
    exit 2
  fi
  printf '%s\n' "$workdir"
}
