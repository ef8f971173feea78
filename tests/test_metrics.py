"""Metric writers (jsonl + TensorBoard events), console progress, clu collections, FLOPs and MFU."""

from __future__ import annotations

import io
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from pargo_jax import flops
from pargo_jax.metrics import MetricWriter, Progress, TrainMetrics
from pargo_jax.models.llm import CausalLM, LLMConfig
from pargo_jax.models.projectors import MLPConfig, ParGoConfig
from pargo_jax.models.vision import vision_preset


def _read_events(path):
    """TFRecord framing: u64 length, u32 crc, data, u32 crc."""
    from tensorboardX.proto import event_pb2

    events = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (n,) = struct.unpack("<Q", header[:8])
            events.append(event_pb2.Event.FromString(f.read(n)))
            f.read(4)
    return events


def test_writer_jsonl_and_tensorboard(tmp_path):
    w = MetricWriter(str(tmp_path))
    w.write(1, {"loss": jnp.asarray(2.5), "lr": 1e-3})
    w.write(2, {"loss": np.float32(2.0), "tokens": 7})
    w.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 2.5, "lr": 1e-3}, {"step": 2, "loss": 2.0, "tokens": 7}]
    files = os.listdir(tmp_path / "tensorboard")
    assert len(files) == 1 and files[0].startswith("events.out.tfevents")
    events = _read_events(tmp_path / "tensorboard" / files[0])
    scalars = {(e.step, v.tag): v.simple_value for e in events for v in e.summary.value if v.tag != "hparams"}
    assert scalars[(1, "loss")] == pytest.approx(2.5) and scalars[(2, "loss")] == pytest.approx(2.0)


def test_progress_line():
    out = io.StringIO()
    p = Progress(1000, every=10, tokens_per_step=100, file=out)
    p.start(100)
    assert p.update(105, {"loss": 1.0}) == {}  # not a report step
    timing = p.update(120, {"loss": 2.31412, "lr": 3e-4})
    line = out.getvalue().strip()
    assert line.startswith("step 120/1000 | loss 2.314 | lr 3.0e-04 | ")
    assert "s/step" in line and "tok/s" in line and "ETA " in line
    assert timing["tokens_per_s"] == pytest.approx(100 / timing["s_per_step"])
    assert timing["eta_s"] == pytest.approx(880 * timing["s_per_step"])


def test_train_metrics_aggregate_on_device():
    step = jax.jit(
        lambda loss, g, lr, bad, streak: TrainMetrics.single_from_model_output(
            loss=loss, grad_norm=g, lr=lr, skipped_nonfinite=bad, nonfinite_streak=streak
        )
    )
    acc = step(1.0, 3.0, 0.1, 1, 1).merge(step(3.0, 5.0, 0.2, 0, 0)).merge(step(2.0, 4.0, 0.3, 1, 1))
    assert isinstance(acc.loss.total, jax.Array)  # nothing left the device until compute()
    out = jax.device_get(acc.compute())
    assert out["loss"] == pytest.approx(2.0) and out["grad_norm"] == pytest.approx(4.0)
    assert out["lr"] == pytest.approx(0.3) and out["skipped_nonfinite"] == 2
    assert out["nonfinite_streak"] == 1  # the longest run of consecutive non-finite steps


def test_pargo_flops_official_shape():
    cfg = ParGoConfig(num_partial=288, num_global=16, hidden=512, heads=8, layers=4, mlp_dim=2048)
    assert cfg.flops(576) == pytest.approx(17.2e9, rel=0.02)
    mlp = MLPConfig(vision_width=3, llm_width=5, group=2)
    assert mlp.flops(4) == 2 * 2 * 6 * 5 + 2 * 2 * 5 * 5


def test_llm_flops_hand_count():
    cfg = LLMConfig(
        vocab_size=10,
        hidden_size=4,
        intermediate_size=8,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=2,
    )
    # per layer: q 16 + k 8 + v 8 + o 16 + mlp 96 = 144; x2 layers + head 40 = 328 weights per token.
    # causal attention per layer: 2 (qk, av) * 2 * 3^2 * heads 2 * head_dim 2 / 2 = 72.
    assert flops.llm_flops(cfg, 3) == 2 * 328 * 3 + 2 * 72
    # The matmul weights are all params except the embedding table and norm scales.
    shapes = jax.eval_shape(lambda: CausalLM(cfg).init(jax.random.key(0), jnp.ones((1, 1), jnp.int32)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
    assert flops.llm_matmul_params(cfg) == n - 10 * 4 - (2 * 2 + 1) * 4


def test_training_multipliers_and_vision():
    assert flops.training_flops([(10.0, False), (20.0, True), (30.0, False)]) == 10 + 60 + 60
    assert flops.training_flops([(10.0, False), (20.0, False)]) == 30
    v = vision_preset("tiny")  # siglip 32px / 8 -> 16 patches, width 32, 2 blocks, mlp 64
    per_block = 2 * 16 * 32 * 4 * 32 + 2 * 2 * 16 * 16 * 32 + 2 * 16 * 32 * 64 * 2
    assert flops.vision_flops(v) == 2 * 16 * (64 * 3) * 32 + 2 * per_block


def test_xla_counts_a_matmul_lowered_or_compiled():
    lowered = jax.jit(lambda a: a @ a).lower(jnp.ones((48, 48)))
    assert flops.xla_flops(lowered) == flops.xla_flops(lowered.compile()) == 2 * 48**3

    class NoCostModel:
        def cost_analysis(self):
            raise NotImplementedError

    assert flops.xla_flops(NoCostModel()) is None


def test_mfu():
    assert flops.mfu(1e12, 0.5, 4, "TPU v4") == pytest.approx(2e12 / (4 * 275e12))
    assert flops.peak_flops("TPU v5 lite") == 197e12 and flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.mfu(1e12, 1.0, 1, "mystery accelerator") is None
    assert flops.mfu(1e11, 1.0, 1, "cpu") is None  # no peak without a measurement: no MFU on CPU


def test_batch_flops_count_non_pad_tokens_only():
    from pargo_jax.models.llm import LLMConfig
    from pargo_jax.models.projectors import MLPConfig
    from pargo_jax.models.vision import vision_preset

    v, p = vision_preset("tiny"), MLPConfig(vision_width=32, llm_width=16)
    llm = LLMConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=8)  # fmt: skip
    one = lambda n: flops.mllm_training_flops(v, p, llm, n, train_llm=True)
    assert flops.batch_training_flops(v, p, llm, [10, 30], train_llm=True) == pytest.approx(one(10) + one(30))
    assert flops.batch_training_flops(v, p, llm, [10, 30], train_llm=True) < 2 * one(30)  # padding is free
    # several images per sample: lengths per sample, images counted in all (1 + 2 here)
    two = flops.mllm_training_flops(v, p, llm, 30, train_llm=True, images_per_example=2)
    assert flops.batch_training_flops(v, p, llm, [10, 30], 3, train_llm=True) == pytest.approx(one(10) + two)


def test_sample_lengths_per_row_or_per_packed_segment():
    mask = np.array([[1, 1, 1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(flops.sample_lengths(mask), [5, 8])
    segments = np.array([[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 2, 2, 2, 3, 3, 3]])
    np.testing.assert_array_equal(flops.sample_lengths(mask, segments), [3, 2, 2, 3, 3])
