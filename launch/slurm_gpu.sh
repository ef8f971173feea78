#!/usr/bin/env bash
# Train on a SLURM GPU cluster: the code at a git ref is unpacked into the (shared) workdir and
# installed into a venv there with jax[cuda12]; one task per node with all its GPUs runs
# pargo_jax.main --multihost=yes (jax.distributed.initialize() reads the SLURM environment), and the
# job's log streams here.
#
#   launch/slurm_gpu.sh [--dry_run] --nodes 4 --config experiments/sft.py:paper \
#       --workdir /shared/runs/sft [--ref HEAD] [--gpus_per_node 8] [--partition P] [-- --config.x=y ...]
#
# --dry_run prints the commands instead of running them. Run on a login node, from a clone.
set -euo pipefail
dry=0 nodes="" config="" workdir="" ref=HEAD gpus=8 partition=""
usage() { sed -n '2,11p' "$0" >&2; exit 2; }
while (($#)); do
  case $1 in
    --dry_run) dry=1 ;;
    --nodes) nodes=$2; shift ;;
    --config) config=$2; shift ;;
    --workdir) workdir=$2; shift ;;
    --ref) ref=$2; shift ;;
    --gpus_per_node) gpus=$2; shift ;;
    --partition) partition=$2; shift ;;
    --) shift; break ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
  shift
done
[[ -n $nodes && -n $config && -n $workdir ]] || usage
run() { if ((dry)); then printf '%q ' "$@"; echo; else "$@"; fi; }

cd "$(dirname "$0")/.."
sha=$(git rev-parse --short=12 "$ref^{commit}")
code=$workdir/code-$sha log=$workdir/slurm-$sha.log
run mkdir -p "$code"
run sh -c "git archive --format=tar $sha | tar -x -C $code"
run python3 -m venv "$code/.venv"
run "$code/.venv/bin/pip" install -q -r "$code/requirements.txt" 'jax[cuda12]>=0.10,<0.11'
job=(sbatch --parsable --nodes="$nodes" --ntasks-per-node=1 --gpus-per-node="$gpus" --exclusive
     --output="$log" --chdir="$code")
[[ -n $partition ]] && job+=(--partition="$partition")
run "${job[@]}" --wrap "srun $code/.venv/bin/python -m pargo_jax.main --config=$config \
--workdir=$workdir --multihost=yes $(printf '%q ' "$@")"
run tail -n +1 -F "$log"
