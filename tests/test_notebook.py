"""``launch/colab_demo.ipynb`` executed top to bottom on CPU with nbclient, as a fresh runtime would
run it, in its quick mode (``PARGO_DEMO_QUICK=1``: small data, a few steps): it finds the code beside
itself, installs the requirements, trains both demo stages, plots the loss, answers a held-out
question and prints the shapes evaluation table."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests import procs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.slow  # a kernel, pip, both demo stages through main
def test_colab_notebook_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PARGO_DEMO_QUICK", "1")
    monkeypatch.setenv("PARGO_DEMO_WORKDIR", str(tmp_path / "workdir"))
    monkeypatch.delenv("PARGO_JAX_DIR", raising=False)
    monkeypatch.setenv("XLA_FLAGS", procs.child_env(devices=1)["XLA_FLAGS"])  # a CPU runtime: one device
    path = os.path.join(ROOT, "launch", "colab_demo.ipynb")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(path)}}
    ).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    text = "\n".join(_text(c) for c in code)
    assert f"pargo_jax code: {ROOT}" in text and "installed for CPU" in text
    assert "shapes eval at step 6" in text and "accuracy" in text
    images = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the loss curves and the image with the model's answer
    for stage in ("pretrain", "sft"):
        assert os.path.isdir(tmp_path / "workdir" / stage / "checkpoints" / "6")
