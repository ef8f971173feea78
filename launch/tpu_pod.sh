#!/usr/bin/env bash
# Run an experiment on every host of a Cloud TPU pod slice (each host runs the same command;
# pargo_jax.main detects the pod and calls jax.distributed.initialize()).
#   launch/tpu_pod.sh TPU_NAME ZONE experiments/pretrain.py:paper gs://bucket/runs/pt [--config.x=y ...]
set -euo pipefail
tpu=$1 zone=$2 config=$3 workdir=$4; shift 4
cmd="cd ~/pargo_jax && pip install -q -r requirements.txt 'jax[tpu]' && \
python -m pargo_jax.main --config=${config} --workdir=${workdir} $*"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$cmd"
