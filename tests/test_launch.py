"""The pod and cluster launchers' ``--dry_run``: the commands they would run, in order (code at the
git ref to every worker, installed, ``pargo_jax.main --multihost=yes`` everywhere, worker 0's log
streamed); the printed archive command runs and holds the code; bad arguments give the usage."""

from __future__ import annotations

import os
import shlex
import subprocess
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry_run(script: str, *args: str) -> list[list[str]]:
    proc = subprocess.run(["bash", f"launch/{script}", "--dry_run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def _sha() -> str:
    return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip


def test_tpu_pod_dry_run(tmp_path):
    args = ["--tpu", "pod", "--zone", "us-central2-b", "--config", "experiments/pretrain.py:paper"]
    cmds = _dry_run("tpu_pod.sh", *args, "--workdir", "gs://b/pt", "--", "--config.seed=3")
    sha = _sha()
    archive, scp, install, train, tail = cmds
    assert archive[:2] == ["git", "archive"] and archive[-1] == sha
    subprocess.run([*archive[:-3], "-o", str(tmp_path / "code.tgz"), sha], cwd=ROOT, check=True)
    assert "pargo_jax/main.py" in tarfile.open(tmp_path / "code.tgz").getnames()
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert "--worker=all" in install and "jax[tpu]" in install[-1] and "requirements.txt" in install[-1]
    run = train[-1]
    assert "--worker=all" in train
    assert "python -m pargo_jax.main --config=experiments/pretrain.py:paper --workdir=gs://b/pt" in run
    assert "--multihost=yes --config.seed=3" in run and f"pargo_jax-{sha}.log" in run
    assert "--worker=0" in tail and tail[-1] == f"tail -n +1 -F ~/pargo_jax-{sha}.log"


def test_slurm_gpu_dry_run():
    cmds = _dry_run("slurm_gpu.sh", "--nodes", "4", "--config", "experiments/sft.py:paper", "--workdir",
                    "/shared/sft", "--partition", "a100", "--", "--config.seed=3")  # fmt: skip
    sha = _sha()
    code = f"/shared/sft/code-{sha}"
    mkdir, unpack, venv, install, sbatch, tail = cmds
    assert (
        mkdir == ["mkdir", "-p", code] and unpack[-1] == f"git archive --format=tar {sha} | tar -x -C {code}"
    )
    assert venv[-1] == f"{code}/.venv" and install[-1].startswith("jax[cuda12]")
    assert sbatch[0] == "sbatch" and "--nodes=4" in sbatch and "--partition=a100" in sbatch
    assert "--ntasks-per-node=1" in sbatch and "--gpus-per-node=8" in sbatch
    assert sbatch[-1] == (f"srun {code}/.venv/bin/python -m pargo_jax.main --config=experiments/sft.py:paper "
                          "--workdir=/shared/sft --multihost=yes --config.seed=3 ")  # fmt: skip
    assert tail == ["tail", "-n", "+1", "-F", f"/shared/sft/slurm-{sha}.log"]


def test_launchers_refuse_missing_or_unknown_arguments():
    for script, args in (("tpu_pod.sh", ["--tpu", "pod"]), ("slurm_gpu.sh", ["--nodes", "2", "--bogus"])):
        proc = subprocess.run(["bash", f"launch/{script}", "--dry_run", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 2 and "--dry_run" in proc.stderr and not proc.stdout
