"""Smoke test of the train-step benchmark: ``--quick`` (demo shape, 1 and 8 devices, JAX + torch; the
8-device runs compile and report memory without timing steps) runs in subprocesses, prints a markdown
table and writes JSON with positive step times, throughput and memory, and FSDP over 8 devices cuts the
per-device params + optimizer state to about 1/8."""

import contextlib
import io
import json

import pytest

from pargo_jax.benchmarks import train_step as bench

# The benchmark's 1- and 8-device subprocesses compile every variant: slow by construction.
pytestmark = pytest.mark.slow

# One benchmark invocation (1 and 8 devices) for every row kind: each extra invocation costs two
# subprocess start-ups (jax, torch, model builds).
VARIANTS = "pargo:stage1,pargo:stage1:32,mlp:full,mg_llava:full"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("train_step") / "train_step.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        res = bench.main(["--quick", "--torch_threads", "1", "--variants", VARIANTS, "--out", str(out)])
    return res, json.loads(out.read_text()), printed.getvalue()


def test_train_step_benchmark_quick(quick_run):
    res, saved, text = quick_run
    rows = saved["rows"]
    assert len(rows) == len(res["rows"]) == 9  # 4 variants x 2 device counts + one torch row
    for r in rows:
        timed = ("step_seconds", "tokens_per_second", "images_per_second", "gflops_per_second")
        for key in timed:  # --quick times 1-device steps only; 8-device rows are compile + memory
            assert (r[key] > 0) if r["devices"] == 1 else (r[key] is None), (key, r)
        assert not r["mfu"]  # a CPU has no known peak: no MFU
        assert r["state_bytes_per_device"] > 0
        assert r["model_flops_per_step"] > 0
    jax_rows = [r for r in rows if r["impl"] == "jax"]
    assert {(r["devices"], r["projector"], r["train"]) for r in jax_rows} == {
        (d, p, t)
        for d in (1, 8)
        for p, t in (("pargo", "stage1"), ("pargo", "stage1, CE/32"), ("mlp", "full"), ("mg_llava", "full"))
    }
    for r in jax_rows:
        assert r["compile_seconds"] > 0
        for key in ("argument_bytes", "temp_bytes", "peak_bytes", "params_bytes_per_device"):
            assert r[key] > 0, (key, r)
        if r["devices"] == 8:
            # Norm scales stay replicated: a bit over 1/8 (with the Adam moments resharded like their params;
            # train.init_state alone leaves them replicated).
            assert 0.1 < r["fsdp_state_ratio"] < 0.3, r["fsdp_state_ratio"]
    (torch_row,) = [r for r in rows if r["impl"] == "torch"]
    assert torch_row["projector"] == "mlp" and torch_row["devices"] == 1
    assert torch_row["num_trainable"] < torch_row["num_params"]
    ours = next(r for r in jax_rows if r["devices"] == 1 and r["projector"] == "mlp")
    assert ours["speedup_vs_torch"] > 0
    assert ours["image_tokens"] == 64  # the demo tower's 64 px / 8 px patches, one MLP token each
    assert "| shape | dev |" in text and "tokens/s" in text


def test_loss_chunk_variant_gives_the_same_loss(quick_run):
    """``projector:train:loss_chunk`` rows: labelled apart, same first-step loss as the full logits."""
    rows = {r["train"]: r for r in quick_run[1]["rows"] if r["projector"] == "pargo" and r["devices"] == 1}
    assert sorted(rows) == ["stage1", "stage1, CE/32"]
    assert rows["stage1"]["losses"][0] == pytest.approx(rows["stage1, CE/32"]["losses"][0], rel=1e-6)


def test_mg_llava_row_trains_the_two_path_model(quick_run):
    """The ``mg_llava`` variant: the mg_llava_demo model (ParGo + ConvNeXt + Conv-Gate + 4 box tokens)."""
    (row,) = [r for r in quick_run[1]["rows"] if r["projector"] == "mg_llava" and r["devices"] == 1]
    assert row["image_size"] == 256
    assert row["image_tokens"] == 20 + 4 and row["step_seconds"] > 0
    assert all(loss == loss for loss in row["losses"])  # finite
    with pytest.raises(ValueError, match="demo shape only"):
        bench.shape_config("mid", "mg_llava", "full", bench._args([]))
