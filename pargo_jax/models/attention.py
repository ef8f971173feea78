"""The one attention core of every model: softmax(q k^T / sqrt(d)) v with an optional boolean mask.

Layouts are ``(..., length, heads, head_dim)``; any leading dims are batch-like, so the same function
serves dense attention (``(B, L, H, D)``) and block attention (``(B, blocks, L, H, D)``), where each
block of queries attends only to its own block of keys (windows, cascade groups). Keys and values
may have fewer heads than the queries (grouped-query attention: query head ``h`` reads kv head
``h // (H / H_kv)``, as HF ``repeat_kv``). Logits are accumulated and normalized in float32.

Two kernels compute it: XLA's (einsum, masked softmax, einsum; any layout) and cuDNN's fused flash
attention through ``jax.nn.dot_product_attention(implementation="cudnn")`` on GPU.
:func:`choose_implementation` (pure) decides which one a call can use; ``implementation=None`` lets it
pick (cuDNN where supported, else XLA).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_MASKED = -1e30  # finite: a masked logit underflows to probability 0 without inf - inf = NaN.
IMPLEMENTATIONS = (None, "xla", "cudnn")
# cuDNN's flash attention (jax 0.10-0.11, jax._src.cudnn.fused_attention_stablehlo): bf16 / fp16 q, k,
# v of rank 4 (B, L, H, D); head_dim a multiple of 8 and <= 128 (<= 256 from Hopper on: 128 keeps the
# rule device-free); a mask becomes an additive bias whose last two dims must be (Lq, Lk), and with a
# bias the training kernels need even Lq and Lk.
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128


def check_implementation(value: str | None) -> None:
    """A ValueError unless ``value`` is one of :data:`IMPLEMENTATIONS` (``attention_impl`` fields)."""
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"attention_impl={value!r}; use None (auto), 'xla' or 'cudnn'.")


def cudnn_unsupported(
    q_shape: Sequence[int],
    k_shape: Sequence[int],
    dtype,
    mask_shape: Sequence[int] | None = None,
    *,
    backend: str = "gpu",
) -> str | None:
    """Why cuDNN's fused attention cannot take this call (None: it can). ``q_shape`` (B, Lq, H, D),
    ``k_shape`` (B, Lk, H_kv, D), ``mask_shape`` broadcastable to (B, H, Lq, Lk) or None."""
    if backend not in ("gpu", "cuda"):
        return f"backend {backend!r} is not a CUDA GPU"
    if len(q_shape) != 4 or len(k_shape) != 4:
        return f"rank {len(q_shape)} inputs (cuDNN takes (B, L, H, D))"
    name = np.dtype(dtype).name
    if name not in CUDNN_DTYPES:
        return f"dtype {name} (cuDNN takes {' / '.join(CUDNN_DTYPES)})"
    (b, lq, h, d), (bk, lk, hk, dk) = q_shape, k_shape
    if d != dk or b != bk:
        return f"q {tuple(q_shape)} and k {tuple(k_shape)} differ in batch or head_dim"
    if d % 8 or d > CUDNN_MAX_HEAD_DIM:
        return f"head_dim {d} (cuDNN takes multiples of 8 up to {CUDNN_MAX_HEAD_DIM})"
    if h % hk:
        return f"{h} query heads are not a multiple of {hk} key/value heads"
    if mask_shape is not None:
        m = tuple(mask_shape)
        if len(m) > 4:
            return f"rank {len(m)} mask"
        m = (1,) * (4 - len(m)) + m
        if m[0] not in (1, b) or m[1] not in (1, h) or m[2] not in (1, lq) or m[3] not in (1, lk):
            return f"mask {tuple(mask_shape)} does not broadcast to (B, H, Lq, Lk) = {(b, h, lq, lk)}"
        if lq % 2 or lk % 2:
            return f"odd lengths Lq={lq}, Lk={lk} with a mask (cuDNN's masked kernels need even ones)"
    return None


def choose_implementation(
    requested: str | None,
    q_shape: Sequence[int],
    k_shape: Sequence[int],
    dtype,
    mask_shape: Sequence[int] | None = None,
    *,
    backend: str | None = None,
) -> str:
    """``"xla"`` or ``"cudnn"`` for one attention call. ``requested`` None: cuDNN where
    :func:`cudnn_unsupported` allows it, else XLA; ``"xla"`` / ``"cudnn"`` force one (a forced cuDNN
    the call cannot use is a ValueError). ``backend`` defaults to ``jax.default_backend()``."""
    check_implementation(requested)
    if requested == "xla":
        return "xla"
    why = cudnn_unsupported(q_shape, k_shape, dtype, mask_shape, backend=backend or jax.default_backend())
    if why is None:
        return "cudnn"
    if requested == "cudnn":
        raise ValueError(f"attention_impl='cudnn' cannot take this call: {why}; use None or 'xla'.")
    return "xla"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    causal: bool = False,
    implementation: str | None = "xla",
) -> jax.Array:
    """q (..., Lq, H, D), k/v (..., Lk, H_kv, D) with H a multiple of H_kv; mask bool broadcastable
    to (..., H, Lq, Lk), True = may attend; ``causal`` also masks key j > query i. Returns
    (..., Lq, H, D). Every query row needs >= 1 allowed key. ``implementation``: "xla", "cudnn"
    (cuDNN's fused kernel, (B, L, H, D) only) or None (:func:`choose_implementation` picks)."""
    mask = None if mask is None else jnp.asarray(mask)
    mask_shape = None if mask is None else mask.shape
    impl = choose_implementation(implementation, q.shape, k.shape, q.dtype, mask_shape)
    if impl == "cudnn":
        if mask is not None:  # cuDNN adds it as a bias whose last two dims must be (Lq, Lk)
            m = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
            mask = jnp.broadcast_to(m, (*m.shape[:2], q.shape[1], k.shape[1]))
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")
    if causal:
        tri = jnp.arange(k.shape[-3])[None, :] <= jnp.arange(q.shape[-3])[:, None]  # (Lq, Lk)
        mask = tri if mask is None else mask & tri
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} key/value heads.")
    groups = heads // kv_heads
    scale = q.shape[-1] ** -0.5
    # heads-major: q (..., H, Lq, D), k / v (..., H_kv, Lk, D); grouped: q (..., H_kv, G, Lq, D)
    q, k, v = (jnp.swapaxes(x, -2, -3) for x in (q * jnp.asarray(scale, q.dtype), k, v))
    if groups > 1:
        q = q.reshape(*q.shape[:-3], kv_heads, groups, *q.shape[-2:])
        k, v = k[..., None, :, :], v[..., None, :, :]
    if jax.default_backend() == "cpu":
        # XLA:CPU would otherwise fold the head transpose of k (and of v in the backward) into a
        # (..., H, D, Lk) layout: a minor-dimension transpose, 3-4x slower than the (..., H, Lk, D)
        # row copy, while its batched matmul reads k transposed natively. The barrier pins the latter.
        q, k, v = jax.lax.optimization_barrier((q, k, v))
    logits = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(_group_heads(mask, kv_heads, groups) if groups > 1 else mask, logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("...qk,...kd->...qd", probs, v)
    if groups > 1:
        out = out.reshape(*out.shape[:-4], heads, *out.shape[-2:])
    return jnp.swapaxes(out, -2, -3)


def _group_heads(mask: jax.Array, kv_heads: int, groups: int) -> jax.Array:
    """A mask broadcastable to (..., H, Lq, Lk) -> broadcastable to (..., H_kv, G, Lq, Lk)."""
    if mask.ndim < 3:
        return mask
    h = mask.shape[-3]
    split = (kv_heads, groups) if h == kv_heads * groups else (1, 1) if h == 1 else None
    if split is None:
        raise ValueError(f"Mask head axis {h} is neither 1 nor the {kv_heads * groups} query heads.")
    return mask.reshape(*mask.shape[:-3], *split, *mask.shape[-2:])


def window_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """One query per window: q (B, P, H, D), k/v (B, P, w, H, D) -> (B, P, H, D).

    For the small windows of partial tokens (w = 2 in the released model) a broadcast multiply and
    a reduction fuse into one elementwise loop, far cheaper than P tiny matmuls."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.sum((q * jnp.asarray(scale, q.dtype))[:, :, None] * k, axis=-1, dtype=jnp.float32)
    probs = jax.nn.softmax(logits, axis=2).astype(v.dtype)  # (B, P, w, H)
    return jnp.sum(probs[..., None] * v, axis=2)
