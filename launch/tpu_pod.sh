#!/usr/bin/env bash
# Train on every host of a Cloud TPU pod slice: the code at a git ref goes to every worker (git archive
# + scp, so unpushed commits work too), is installed there with jax[tpu], every worker runs the same
# pargo_jax.main command with --multihost=yes (detached), and worker 0's log streams here.
#
#   launch/tpu_pod.sh [--dry_run] --tpu NAME --zone ZONE --config experiments/pretrain.py:paper \
#       --workdir gs://bucket/runs/pt [--ref HEAD] [-- --config.x=y ...]
#
# --dry_run prints the commands instead of running them. Needs gcloud and a clone of this repo.
set -euo pipefail
dry=0 tpu="" zone="" config="" workdir="" ref=HEAD
usage() { sed -n '2,9p' "$0" >&2; exit 2; }
while (($#)); do
  case $1 in
    --dry_run) dry=1 ;;
    --tpu) tpu=$2; shift ;;
    --zone) zone=$2; shift ;;
    --config) config=$2; shift ;;
    --workdir) workdir=$2; shift ;;
    --ref) ref=$2; shift ;;
    --) shift; break ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
  shift
done
[[ -n $tpu && -n $zone && -n $config && -n $workdir ]] || usage
run() { if ((dry)); then printf '%q ' "$@"; echo; else "$@"; fi; }

cd "$(dirname "$0")/.."
sha=$(git rev-parse --short=12 "$ref^{commit}")
archive=/tmp/pargo_jax-$sha.tar.gz
ssh=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone")
extra=$(printf '%q ' "$@")
run git archive --format=tar.gz -o "$archive" "$sha"
run gcloud compute tpus tpu-vm scp "$archive" "$tpu:pargo_jax.tar.gz" --zone "$zone" --worker=all
run "${ssh[@]}" --worker=all --command "rm -rf ~/pargo_jax && mkdir ~/pargo_jax && \
tar -xzf ~/pargo_jax.tar.gz -C ~/pargo_jax && cd ~/pargo_jax && \
pip install -q -r requirements.txt 'jax[tpu]>=0.10,<0.11'"
run "${ssh[@]}" --worker=all --command "cd ~/pargo_jax && nohup python -m pargo_jax.main \
--config=$config --workdir=$workdir --multihost=yes $extra > ~/pargo_jax-$sha.log 2>&1 < /dev/null &"
run "${ssh[@]}" --worker=0 --command "tail -n +1 -F ~/pargo_jax-$sha.log"
