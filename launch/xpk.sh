#!/usr/bin/env bash
# Submits k2jax-train as a GKE workload with xpk (one pod per TPU host).
#
#   launch/xpk.sh --cluster=NAME --tpu-type=v5p-512 --image=IMAGE [--workload=NAME] [--num-slices=N]
#                 [--project=ID] [--zone=ZONE] [--dry-run] -- TRAIN_FLAGS...
#
# IMAGE is a container with k2jax installed (pip install '.[tpu]'); --dry-run prints the xpk command.
set -euo pipefail

cluster="" tpu_type="" image="" workload="k2jax-$(date +%Y%m%d-%H%M%S)" slices=1 project="" zone="" dry=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cluster=*) cluster="${1#*=}" ;;
    --tpu-type=*) tpu_type="${1#*=}" ;;
    --image=*) image="${1#*=}" ;;
    --workload=*) workload="${1#*=}" ;;
    --num-slices=*) slices="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --dry-run) dry=1 ;;
    --) shift; break ;;
    *) echo "xpk.sh: unknown option $1 (train flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
for required in cluster tpu_type image; do
  [[ -n "${!required}" ]] || { echo "xpk.sh: --${required//_/-}=... is required" >&2; exit 2; }
done

train="k2jax-train --distributed"
for arg in "$@"; do
  train+=" $(printf '%q' "$arg")"
done

cmd=(xpk workload create "--cluster=$cluster" "--workload=$workload" "--tpu-type=$tpu_type"
     "--num-slices=$slices" "--docker-image=$image" "--command=$train")
[[ -n "$project" ]] && cmd+=("--project=$project")
[[ -n "$zone" ]] && cmd+=("--zone=$zone")

if [[ $dry -eq 1 ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
else
  "${cmd[@]}"
fi
