#!/usr/bin/env bash
# Submits k2jax-train as a GKE workload with xpk (one pod per TPU host).
#
#   launch/xpk.sh --cluster=NAME --tpu-type=v5p-512 --image=IMAGE [--workload=NAME] [--num-slices=N]
#                 [--project=ID] [--zone=ZONE] [--dry-run] -- TRAIN_FLAGS...
#
# IMAGE is a container with k2jax installed (pip install '.[tpu]'); --dry-run prints the xpk command.
# The train flags must name a --workdir=gs://BUCKET/PATH: the pods share no disk, and a restarted or replaced pod
# resumes from the bucket. After submitting, the script prints how to follow the workload and how to stop it.
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

# shellcheck source=SCRIPTDIR/workdir.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/workdir.sh"
workdir="$(gs_workdir xpk.sh "$@")" || exit 2

train="k2jax-train --distributed"
for arg in "$@"; do
  train+=" $(printf '%q' "$arg")"
done

cmd=(xpk workload create "--cluster=$cluster" "--workload=$workload" "--tpu-type=$tpu_type"
     "--num-slices=$slices" "--docker-image=$image" "--command=$train")
[[ -n "$project" ]] && cmd+=("--project=$project")
[[ -n "$zone" ]] && cmd+=("--zone=$zone")

where=("--cluster=$cluster")
[[ -n "$project" ]] && where+=("--project=$project")
[[ -n "$zone" ]] && where+=("--zone=$zone")

if [[ $dry -eq 1 ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
else
  "${cmd[@]}"
fi
cat >&2 <<EOF2
xpk.sh: workload $workload ($tpu_type x $slices); checkpoints and metrics in $workdir
  follow it:   xpk workload list ${where[*]}
               kubectl logs -f -l jobset.sigs.k8s.io/jobset-name=$workload --prefix --max-log-requests=1000
  metrics:     tensorboard --logdir=$workdir
  stop it:     xpk workload delete ${where[*]} --workload=$workload   (SIGTERM: every host saves, then exits)
  resume:      submit again with the same --workdir
EOF2
