"""``python -m pargo_jax.benchmarks.memory`` (state only, no compile): the real presets' exact
parameter counts, bfloat16 storage of what is frozen, and FSDP over 8 devices holding an eighth of
the weights per device."""

from __future__ import annotations

import json

from tests import procs


def test_paper_state_per_device(tmp_path):
    out = tmp_path / "memory.json"
    proc = procs.run("pargo_jax.benchmarks.memory", "--presets=paper,siglip_qwen2", "--devices=1,8",
                     "--activations=false", f"--out={out}", timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    all_rows = {(r["preset"], r["stage"], r["devices"]): r for r in json.loads(out.read_text())["rows"]}
    rows = {k[1:]: r for k, r in all_rows.items() if k[0] == "paper"}
    one, eight = rows["pretrain", 1], rows["pretrain", 8]
    assert 8.0e9 < one["num_params"] < 8.1e9  # EVA02-L 0.30 B + InternLM2-7B 7.74 B + ParGo
    # model.frozen_dtype: the frozen tower and LLM in bfloat16, the trained projector in float32
    assert one["params_float32"] == 4 * one["num_params"] and one["frozen_dtype"] == "bfloat16"
    assert one["params"] == 2 * (one["num_params"] - one["num_trainable"]) + 4 * one["num_trainable"]
    assert (
        one["params"] / 8 <= eight["params"] < 1.01 * one["params"] / 8
    )  # FSDP: an eighth (+ small replicated)
    assert rows["sft", 1]["num_trainable"] > one["num_trainable"]  # + the LoRA on wqkv
    assert 0 <= one["optimizer"] - 8 * one["num_trainable"] < 64  # Adam: 2 float32 moments + step counts
    assert "| paper | pretrain | 8 | data 1 x fsdp 8 |" in proc.stdout and "GB (bfloat16) |" in proc.stdout
    qwen = all_rows["siglip_qwen2", "pretrain", 1]  # SigLIP-so400m + Qwen2.5-7B + ParGo: 8.04 B
    assert 8.0e9 < qwen["num_params"] < 8.1e9 and qwen["frozen_dtype"] == "bfloat16"
    assert qwen["params"] == 2 * (qwen["num_params"] - qwen["num_trainable"]) + 4 * qwen["num_trainable"]
