"""``python -m pargo_jax.benchmarks.accelerator --tiny``: every part runs and reports finite positive
numbers (one subprocess); the attention core's kernel choice is pinned in-process."""

import json
import math

import jax.numpy as jnp
import pytest

from pargo_jax.models.attention import choose_implementation, cudnn_unsupported
from tests import procs

Q, K = (2, 64, 8, 64), (2, 64, 2, 64)  # (B, L, H, D): grouped-query, head_dim 64


def _positive(d: dict, *keys: str) -> None:
    for k in keys:
        assert isinstance(d[k], int | float) and math.isfinite(d[k]) and d[k] > 0, (k, d[k])


@pytest.mark.slow  # every part of the check, compiled, in one process
def test_accelerator_tiny_command(tmp_path):
    args = ("--tiny", "--projector_batch", "3", "--out", str(tmp_path))
    run = procs.run("pargo_jax.benchmarks.accelerator", *args, devices=1)
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    r = json.loads((tmp_path / "accelerator.json").read_text())
    assert r["meta"]["backend"] == "cpu" and r["meta"]["jax"] and r["meta"]["flax"]
    _positive(r["ceilings"]["matmul"], "seconds", "tflops_per_s")
    _positive(r["ceilings"]["copy"], "seconds", "gb_per_s", "bytes_moved")
    assert r["attention"]["auto_selects"] == "xla" and "not a CUDA GPU" in r["attention"]["cudnn"]
    projector = r["projector"]["xla"]
    _positive(projector, "seconds", "images_per_second", "tflops_per_s", "fraction_of_peak")
    assert projector["batch"] == 3 and projector["cudnn_calls"] == 0
    assert "CUDA GPU" in r["projector"]["auto"]["skipped"]
    xla = r["train"]["xla"]
    _positive(xla, "step_seconds", "tokens_per_second", "tflops_per_s", "mfu_measured_peak", "peak_bytes")
    assert all(math.isfinite(x) for x in xla["losses"]) and xla["remat"] == "full" and xla["scan_layers"]
    assert "CUDA GPU" in r["train"]["cudnn"]["skipped"]
    for b in (1, 4):
        for layers in ("scan", "unrolled"):
            row = r["decode"][f"{layers}_batch_{b}"]
            _positive(row, "seconds", "tokens_per_second", "fraction_of_bandwidth")
        assert r["decode"][f"unrolled_batch_{b}"]["same_tokens_as_scan"]
        checked = r["decode"][f"unrolled_every_3_batch_{b}"]  # the end checked every 3 tokens
        _positive(checked, "seconds", "tokens_per_second")
        assert checked["check_every"] == 3 and checked["same_tokens_as_every_1"]
    _positive(r["input"]["workers_0"], "images_per_second", "supply_over_demand")
    md = (tmp_path / "accelerator.md").read_text()
    assert "| train step (xla) |" in md and "| greedy decode (batch 4) | unrolled layers" in md
    assert "end checked every 3 tokens" in md
    assert run.stdout.rstrip().endswith(md.rstrip().splitlines()[-1])  # the table is printed last


def test_attention_selection():
    bf16 = jnp.bfloat16
    assert choose_implementation(None, Q, K, bf16, (2, 1, 1, 64), backend="cpu") == "xla"
    assert choose_implementation(None, Q, K, bf16, (2, 1, 1, 64)) == "xla"  # this CPU backend
    assert choose_implementation(None, Q, K, bf16, None, backend="gpu") == "cudnn"
    assert choose_implementation(None, Q, K, bf16, (2, 1, 1, 64), backend="gpu") == "cudnn"
    assert choose_implementation("xla", Q, K, bf16, None, backend="gpu") == "xla"
    packed = (2, 1, 64, 64)  # packed rows' segment mask (B, 1, T, T): still the fused kernel
    assert choose_implementation(None, Q, K, bf16, packed, backend="gpu") == "cudnn"
    assert choose_implementation(None, Q, K, jnp.float32, packed, backend="gpu") == "xla"
    assert choose_implementation(None, Q, K, bf16, packed, backend="cpu") == "xla"
    unsupported = {
        "dtype float32": ((Q, K, jnp.float32, None)),
        "head_dim 60": (((2, 64, 8, 60), (2, 64, 2, 60), bf16, None)),
        "head_dim 256": (((2, 64, 8, 256), (2, 64, 2, 256), bf16, None)),
        "rank 5": (((2, 3, 64, 8, 64), (2, 3, 64, 2, 64), bf16, None)),
        "not a multiple": (((2, 64, 6, 64), (2, 64, 4, 64), bf16, None)),
        "does not broadcast": ((Q, K, bf16, (2, 3, 64, 64))),
        "odd lengths": (((2, 63, 8, 64), (2, 63, 2, 64), bf16, (2, 1, 1, 63))),
    }
    for reason, args in unsupported.items():
        assert reason in cudnn_unsupported(*args, backend="gpu"), reason
        assert choose_implementation(None, *args, backend="gpu") == "xla"
        with pytest.raises(ValueError, match="cudnn"):
            choose_implementation("cudnn", *args, backend="gpu")
    with pytest.raises(ValueError, match="cudnn"):
        choose_implementation("cudnn", Q, K, bf16, None, backend="cpu")
    with pytest.raises(ValueError, match="flash"):
        choose_implementation("flash", Q, K, bf16, None, backend="gpu")


def test_projector_auto_row_compares_with_xla():
    """The row a GPU run adds (attention picked per call), checked against the XLA row's outputs and
    gradients; on this CPU every call is XLA's, so the check reads exactly 0."""
    from pargo_jax.benchmarks import accelerator

    shapes = accelerator.tiny_shapes()
    xla, reference = accelerator.measure_projector(shapes, None, "xla")
    row, (y, grads) = accelerator.measure_projector(shapes, None, None, reference)
    assert row["attention_impl"] == "auto" and row["cudnn_calls"] == 0 and row["images_per_second"] > 0
    assert "output_rel_error" not in xla and row["output_rel_error"] == 0 and row["grad_rel_error"] == 0
    assert y.shape == (shapes.projector_batch, 8 + 2, shapes.llm["hidden_size"]) and grads.ndim == 1


def test_train_rows_set_every_attention():
    """The XLA train row keeps the tower's, ParGo's and the LLM's attention on XLA; the cuDNN row forces
    the LLM's and lets the tower and ParGo pick."""
    from pargo_jax.benchmarks import accelerator

    for impl, others in (("xla", "xla"), ("cudnn", None)):
        c = accelerator.train_config(accelerator.tiny_shapes(), impl)
        assert c.model.llm.overrides.attention_impl == impl
        assert c.model.vision.overrides.attention_impl == others
        assert c.model.projector.attention_impl == others


def test_causal_flag_equals_the_dense_causal_mask():
    import jax
    import numpy as np

    from pargo_jax.models.attention import attention

    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 6, 4, 8))
    k, v = (jax.random.normal(x, (2, 6, 2, 8)) for x in (kk, kv))
    pad = jnp.asarray(np.arange(6)[None] < np.array([[6], [4]]))[:, None, None, :]  # (B, 1, 1, L)
    tri = jnp.tril(jnp.ones((6, 6), bool))
    got = attention(q, k, v, pad, causal=True, implementation=None)  # auto: XLA on this CPU
    np.testing.assert_array_equal(got, attention(q, k, v, pad & tri))
