#!/usr/bin/env bash
# One task per node, all GPUs of a node per task; jax.distributed.initialize() reads the SLURM env.
#   sbatch --nodes=4 launch/slurm_gpu.sh experiments/sft.py:paper /shared/runs/sft [--config.x=y ...]
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
set -euo pipefail
config=$1 workdir=$2; shift 2
srun python -m pargo_jax.main --config="$config" --workdir="$workdir" --multihost=yes "$@"
