"""The one attention core of every model: softmax(q k^T / sqrt(d)) v with an optional boolean mask.

Layouts are ``(..., length, heads, head_dim)``; any leading dims are batch-like, so the same function
serves dense attention (``(B, L, H, D)``) and block attention (``(B, blocks, L, H, D)``), where each
block of queries attends only to its own block of keys (windows, cascade groups). Keys and values
may have fewer heads than the queries (grouped-query attention: query head ``h`` reads kv head
``h // (H / H_kv)``, as HF ``repeat_kv``). Logits are accumulated and normalized in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite: a masked logit underflows to probability 0 without inf - inf = NaN.


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    implementation: str | None = None,
) -> jax.Array:
    """q (..., Lq, H, D), k/v (..., Lk, H_kv, D) with H a multiple of H_kv; mask bool broadcastable
    to (..., H, Lq, Lk), True = may attend. Returns (..., Lq, H, D). Every query row needs >= 1
    allowed key. ``implementation="cudnn"`` hands (B, L, H, D) inputs to cuDNN's fused kernel."""
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
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
        mask = jnp.asarray(mask)
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
