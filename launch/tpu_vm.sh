#!/usr/bin/env bash
# Starts k2jax-train on every worker of a Cloud TPU VM slice (one process per host; jax.distributed finds
# its peers from the TPU metadata, so --distributed is all the train command needs).
#
#   launch/tpu_vm.sh --tpu=NAME --zone=ZONE [--project=ID] [--repo=DIR] [--install] [--dry-run] -- TRAIN_FLAGS...
#
# --install   first pip-installs k2jax with TPU support (jax[tpu]) from --repo on every worker
# --dry-run   prints the gcloud commands instead of running them
set -euo pipefail

tpu="" zone="" project="" repo="\$HOME/k2jax" install=0 dry=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --repo=*) repo="${1#*=}" ;;
    --install) install=1 ;;
    --dry-run) dry=1 ;;
    --) shift; break ;;
    *) echo "tpu_vm.sh: unknown option $1 (train flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$tpu" ]] || { echo "tpu_vm.sh: --tpu=NAME is required" >&2; exit 2; }
[[ -n "$zone" ]] || { echo "tpu_vm.sh: --zone=ZONE is required" >&2; exit 2; }

train="k2jax-train --distributed"
for arg in "$@"; do
  train+=" $(printf '%q' "$arg")"
done

gcloud_ssh=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" --worker=all)
[[ -n "$project" ]] && gcloud_ssh+=("--project=$project")

run() {
  if [[ $dry -eq 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

if [[ $install -eq 1 ]]; then
  run "${gcloud_ssh[@]}" "--command=cd $repo && pip install -e '.[tpu]'"
fi
run "${gcloud_ssh[@]}" "--command=cd $repo && $train"
