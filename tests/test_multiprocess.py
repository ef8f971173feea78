"""Two processes on one machine as one JAX job (localhost coordinator, 4 CPU devices each, gloo
collectives) train the demo through ``python -m pargo_jax.main``: the losses and the end-of-run eval
equal a 1-process 8-device run on the same data 2 x fsdp 4 mesh, and the 2-process checkpoint resumes
in 1 process on another mesh (data 2 x fsdp 2 x tensor 2) with the losses of the uninterrupted run; with
one sample per row and with packed rows (every host plans the global batch, reads its rows)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import numpy as np
import pytest

from tests import procs
from tests.demo import demo_config, demo_flags, eval_metrics, losses, metric_rows, prepare_and_train


def _overrides(data_dir: str, mesh: dict[str, int], packing: bool) -> dict:
    return {
        "input.data_dir": data_dir, "input.packing": packing, "input.batch_size": 8, "total_steps": 4,
        "log_every_steps": 1,
        "optim.warmup_steps": 1, "checkpoint.every_steps": 2, "sample_at_end": "", "evals.val.log_steps": 4,
        **{f"mesh.{axis}": size for axis, size in mesh.items()},
    }  # fmt: skip


def _flags(data_dir: str, workdir: str, mesh: dict[str, int], packing: bool) -> list[str]:
    return [
        "--config=experiments/pretrain.py", f"--workdir={workdir}", *demo_flags(data_dir),
        *(f"--config.{k}={v}" for k, v in _overrides(data_dir, mesh, packing).items()),
    ]  # fmt: skip


def _one_process(data_dir: str, workdir: str, mesh: dict[str, int], packing: bool) -> None:
    """The same run in this process (8 devices), as ``python -m pargo_jax.main`` would configure it."""
    prepare_and_train(demo_config(data_dir, 4, **_overrides(data_dir, mesh, packing)), workdir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes form one job, then two reference runs
@pytest.mark.parametrize("packing", [False, True], ids=["rows", "packed"])  # packed: every host plans
def test_two_processes_equal_one_and_resume_on_another_mesh(shapes_dir, tmp_path, packing):
    mesh = {"data": 2, "fsdp": 4, "tensor": 1}
    two, one, resumed = (str(tmp_path / name) for name in ("two", "one", "resumed"))
    job = ["--multihost=yes", f"--coordinator_address=localhost:{_free_port()}", "--num_processes=2"]
    workers = [
        procs.popen(
            "pargo_jax.main",
            *_flags(shapes_dir, two, mesh, packing),
            *job,
            f"--process_id={i}",
            devices=4,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        logs = [p.communicate(timeout=600)[0] for p in workers]
    finally:
        for p in workers:
            p.kill()
    assert [p.returncode for p in workers] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "Process 1/2" in logs[1] and "Process 0/2" in logs[0]
    assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["2", "4"]

    _one_process(shapes_dir, one, mesh, packing)
    want = losses(one)
    assert sorted(want) == [1, 2, 3, 4] and len(set(want.values())) == 4
    np.testing.assert_allclose([losses(two)[s] for s in want], list(want.values()), rtol=0, atol=1e-5)
    val_two, val_one = eval_metrics(two, "val")[4], eval_metrics(one, "val")[4]
    assert val_two["examples"] == val_one["examples"] == 16
    assert val_two["colour_tokens"] == val_one["colour_tokens"] > 0  # the groups, shared like the rest
    for metric in ("loss", "token_accuracy", "colour_loss", "shape_token_accuracy"):
        np.testing.assert_allclose(val_two[metric], val_one[metric], rtol=0, atol=1e-5)

    # The 2-process checkpoint of step 2, resumed by 1 process on another mesh, trains on as before.
    shutil.copytree(two, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    rows = [r for r in metric_rows(resumed) if r["step"] <= 2]
    with open(os.path.join(resumed, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    _one_process(shapes_dir, resumed, {"data": 2, "fsdp": 2, "tensor": 2}, packing)
    again = losses(resumed)
    np.testing.assert_allclose([again[3], again[4]], [want[3], want[4]], rtol=0, atol=1e-5)
