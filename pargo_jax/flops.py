"""Analytic FLOP counts (per example) and model-FLOPs utilization (MFU).

Conventions (as PaLM / MaxText): a matmul of (m, k) x (k, n) is ``2 m k n`` FLOPs; only matmuls and
attention score/value products count (norms, softmax, activations and embedding lookups are ignored);
attention is counted dense, except the LLM's causal attention which is halved (only the lower
triangle is useful work). All ``*_flops`` functions return FORWARD FLOPs of one example.

Training multiplies each component of the forward chain ``tower -> projector -> LLM`` by
(:func:`training_flops`)::

    3  trainable            forward + activation grads + weight grads
    2  frozen, but a component BEFORE it trains (e.g. the LLM while pretraining the projector):
       forward + activation grads only (no weight grads)
    1  frozen and nothing before it trains (e.g. the vision tower): forward only

LoRA adapters, rematerialization (recomputed forwards) and padding are not counted: MFU measures
useful model FLOPs, not hardware FLOPs (training counts each batch's non-pad tokens:
:func:`batch_training_flops`). :func:`xla_flops` reads XLA's own count of a program instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pargo_jax.models.llm import LLMConfig
from pargo_jax.models.vision import VisionConfig

# Dense bf16 peak FLOP/s per chip (device_kind as reported by jax.devices()[0].device_kind, lowercase
# substring match). CPUs have no entry: their peak depends on the cores a run gets, so no MFU there.
PEAK_FLOPS: dict[str, float] = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,  # v5p reports "TPU v5"
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
    "h200": 989e12,
    "h100": 989e12,
    "a100": 312e12,
}


def vision_flops(config: VisionConfig) -> float:
    """Forward FLOPs of the tower on one image: patch embedding + the ``num_blocks`` blocks run."""
    c = config
    t, w, m = c.num_positions, c.width, c.mlp_dim
    patch = 2 * c.grid**2 * (c.patch_size**2 * 3) * w
    attn_proj = 2 * t * w * 4 * w  # q, k, v, out
    attn = 2 * 2 * t * t * w  # q k^T and weights @ v (dense)
    mlp = 2 * t * w * m * (3 if c.activation == "swiglu" else 2)
    return float(patch + c.num_blocks * (attn_proj + attn + mlp))


def llm_matmul_params(config: LLMConfig) -> int:
    """Weights that multiply every token: attention + MLP (SwiGLU: 3 matrices, OPT's ReLU: 2) of all
    layers + the output head (also when tied to the embeddings)."""
    c = config
    d, qd, kvd = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    mlp_matrices = 3 if c.mlp == "swiglu" else 2
    per_layer = d * qd + 2 * d * kvd + qd * d + mlp_matrices * d * c.intermediate_size
    return c.num_layers * per_layer + d * c.vocab_size


def llm_flops(config: LLMConfig, seq_len: int) -> float:
    """Forward FLOPs of one sequence of ``seq_len`` tokens: ``2 * matmul params`` per token plus causal
    attention ``2 * 2 * T^2 * heads * head_dim / 2`` per layer."""
    c = config  # (elementwise for an array of lengths)
    attn = 2 * 2 * seq_len * seq_len * c.num_heads * c.head_dim / 2
    return 2 * llm_matmul_params(c) * seq_len + c.num_layers * attn


def training_flops(stages: Sequence[tuple[float, bool]]) -> float:
    """Training FLOPs of a forward chain ``[(forward_flops, trainable), ...]`` in forward order (see
    the module docstring for the 3 / 2 / 1 multipliers)."""
    total, upstream_trains = 0.0, False
    for fwd, trainable in stages:
        total += fwd * (3 if trainable else 2 if upstream_trains else 1)
        upstream_trains = upstream_trains or trainable
    return total


def mllm_training_flops(
    vision: VisionConfig,
    projector: Any,
    llm: LLMConfig,
    seq_len: int,
    *,
    train_vision: bool = False,
    train_projector: bool = True,
    train_llm: bool = False,
    images_per_example: int = 1,
) -> float:
    """Training FLOPs of one example: ``images_per_example`` images through tower and projector (any
    registered projector config: its ``flops(num_patches)``), then ``seq_len`` tokens (image tokens
    included) through the LLM."""
    return training_flops(
        [
            (images_per_example * vision_flops(vision), train_vision),
            (images_per_example * projector.flops(vision.num_tokens), train_projector),
            (llm_flops(llm, seq_len), train_llm),
        ]
    )


def batch_training_flops(
    vision: VisionConfig,
    projector: Any,
    llm: LLMConfig,
    lengths: Sequence[int],
    images: int | None = None,
    **trains: bool,
) -> float:
    """Training FLOPs of a batch whose samples hold ``lengths`` non-pad tokens each (image tokens
    included; :func:`sample_lengths`) and which has ``images`` images in all (None: one per sample):
    each sample's sequence through the LLM on its own (packed samples attend only within themselves),
    each image through tower and projector, so padding counts for nothing (one closed form per batch:
    it runs every training step). ``trains``: the ``train_vision`` / ``train_projector`` /
    ``train_llm`` flags."""
    n = len(lengths) if images is None else images
    text = float(np.sum(llm_flops(llm, np.asarray(lengths, np.float64))))
    return training_flops([
        (n * vision_flops(vision), trains.get("train_vision", False)),
        (n * projector.flops(vision.num_tokens), trains.get("train_projector", True)),
        (text, trains.get("train_llm", False)),
    ])  # fmt: skip


def sample_lengths(attention_mask: np.ndarray, segment_ids: np.ndarray | None = None) -> np.ndarray:
    """Non-pad tokens of each sample of a (B, T) batch: of each row, or with ``segment_ids`` (packed rows:
    sample k >= 1 of its row, 0 = padding) of each segment."""
    mask = np.asarray(attention_mask)
    if segment_ids is None:
        return mask.sum(1)
    seg = np.asarray(segment_ids)
    width = int(seg.max(initial=0)) + 1
    keys = (np.arange(len(seg))[:, None] * width + seg).ravel()
    count = lambda w: np.bincount(keys, weights=w, minlength=len(seg) * width).reshape(len(seg), width)[:, 1:]
    return count(mask.ravel()).astype(np.int64)[count(None) > 0]


def peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one device of this kind, or None when unknown."""
    kind = device_kind.lower()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):  # "tpu v5 lite" before "tpu v5"
        if key in kind:
            return PEAK_FLOPS[key]
    return None


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, device_kind: str) -> float | None:
    """Model-FLOPs utilization: achieved ``flops_per_step / step_seconds`` over the peak of
    ``num_devices`` devices of ``device_kind`` (None when the kind is unknown or the time is 0)."""
    peak = peak_flops(device_kind)
    if peak is None or step_seconds <= 0 or num_devices <= 0:
        return None
    return flops_per_step / step_seconds / (peak * num_devices)


def xla_flops(program: Any) -> float | None:
    """XLA's FLOP count of a lowered or compiled jax program (``.cost_analysis()``), or None where the
    backend gives none. A loop's body counts once, whatever its trip count."""
    try:
        cost = program.cost_analysis()
    except Exception:  # noqa: BLE001  (cost analysis is optional and backend dependent)
        return None
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None
