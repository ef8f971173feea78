"""The one attention core of the projectors: softmax(q k^T / sqrt(d)) v with optional boolean mask.

Layouts are ``(..., length, heads, head_dim)``; any leading dims are batch-like, so the same function
serves dense attention (``(B, L, H, D)``) and block attention (``(B, blocks, L, H, D)``), where each
block of queries attends only to its own block of keys (windows, cascade groups).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite: a masked logit underflows to probability 0 without inf - inf = NaN.


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """q (..., Lq, H, D), k/v (..., Lk, H, D), mask bool broadcastable to (..., H, Lq, Lk), True =
    may attend. Returns (..., Lq, H, D). Softmax in float32; every query row needs >= 1 allowed key."""
    scale = q.shape[-1] ** -0.5
    heads_major = lambda x: jnp.swapaxes(x, -2, -3)
    q, k, v = heads_major(q * jnp.asarray(scale, q.dtype)), heads_major(k), heads_major(v)
    if jax.default_backend() == "cpu":
        # XLA:CPU would otherwise fold the head transpose of k (and of v in the backward) into a
        # (..., H, D, Lk) layout: a minor-dimension transpose, 3-4x slower than the (..., H, Lk, D)
        # row copy, while its batched matmul reads k transposed natively. The barrier pins the latter.
        q, k, v = jax.lax.optimization_barrier((q, k, v))
    logits = jnp.einsum("...qd,...kd->...qk", q, k)
    logits = logits.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return heads_major(jnp.einsum("...qk,...kd->...qd", probs, v))


def window_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """One query per window: q (B, P, H, D), k/v (B, P, w, H, D) -> (B, P, H, D).

    For the small windows of partial tokens (w = 2 in the released model) a broadcast multiply and
    a reduction fuse into one elementwise loop, far cheaper than P tiny matmuls."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.sum((q * jnp.asarray(scale, q.dtype))[:, :, None] * k, axis=-1, dtype=jnp.float32)
    probs = jax.nn.softmax(logits, axis=2).astype(v.dtype)  # (B, P, w, H)
    return jnp.sum(probs[..., None] * v, axis=2)
