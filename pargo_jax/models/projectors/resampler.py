"""Perceiver resampler (Flamingo; Qwen-VL's one-layer form): learnable queries cross-attend to the
features, queries and keys normalized, 2-D sin-cos positions on both.

``x`` = tower features (B, N, C) on an ``h x w`` patch grid, ``T`` queries on a ``t x t`` grid::

    f = LN_kv(x @ W_kv)                                     # (B, N, H); no W_kv when C == H
    h = queries                                             # (T, H), N(0, 0.02)
    repeat L times:
        h = h + Attn(LN_q(h) + pos(t, t), f + pos(h, w), f) # multi-head, keys = features only
        h = h + W2 gelu(W1 LN_ffn(h))                       # exact GELU; only when mlp_dim > 0 (Flamingo)
    tokens = LN_post(h) @ W_llm + b                         # (B, T, D_llm)

``pos(h, w)`` is the 2-D sin-cos table of :func:`sincos_2d`: the first half of the channels encodes
the row, the second the column. With ``layers=1, mlp_dim=0`` this is Qwen-VL's resampler.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from pargo_jax.models.attention import attention
from pargo_jax.models.layers import KERNEL_INIT, dense_params, sincos_2d
from pargo_jax.models.projectors.common import ProjectorModule, check_width

Dtype = jnp.dtype | str


@dataclasses.dataclass(frozen=True)
class ResamplerConfig:
    num_queries: int = 64  # a square: the queries sit on a sqrt x sqrt grid for their positions
    hidden: int = 1024
    heads: int = 16
    layers: int = 1
    mlp_dim: int = 0  # 0: no feed-forward (Qwen-VL); > 0: one per layer (Flamingo)
    vision_width: int = 1024
    llm_width: int = 4096
    grid: tuple[int, int] | None = None  # the features' patch grid (default: square)
    eps: float = 1e-6
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}.")
        if self.hidden % 4:
            raise ValueError(f"hidden={self.hidden} is not divisible by 4 (2-D sin-cos positions).")
        if math.isqrt(self.num_queries) ** 2 != self.num_queries:
            raise ValueError(f"num_queries={self.num_queries} is not a square (16, 36, 64, ...).")

    def num_tokens(self, num_patches: int) -> int:
        del num_patches
        return self.num_queries

    def flops(self, num_patches: int) -> float:
        """Forward FLOPs on one image: W_kv, per layer q / k / v / out and attention (+ FFN), W_llm."""
        t, n, h, c = self.num_queries, num_patches, self.hidden, self.vision_width
        kv_in = 2 * n * c * h if c != h else 0
        per_layer = 2 * t * h * 2 * h + 2 * n * h * 2 * h + 2 * 2 * t * n * h + 2 * 2 * t * h * self.mlp_dim
        return float(kv_in + self.layers * per_layer + 2 * t * h * self.llm_width)


def patch_grid(num_patches: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """``grid``, or the square grid of ``num_patches`` (a clear error when there is none)."""
    if grid is not None:
        if grid[0] * grid[1] != num_patches:
            raise ValueError(f"grid={tuple(grid)} does not hold the {num_patches} patches.")
        return tuple(grid)
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patches are not a square grid; set the projector's grid=(h, w).")
    return side, side


class Resampler(ProjectorModule):
    """features (B, N, C_vision) -> image tokens (B, T, D_llm)."""

    config: ResamplerConfig

    def _dense(self, name: str, x: jax.Array, out: int, axes: tuple[str, str]) -> jax.Array:
        c = self.config
        kernel, bias = dense_params(self, f"{name}_", (x.shape[-1], out), axes, param_dtype=c.param_dtype)
        return x @ jnp.asarray(kernel, c.dtype) + jnp.asarray(bias, c.dtype)

    @nn.compact
    def __call__(self, features: jax.Array, *, deterministic: bool = True) -> jax.Array:
        del deterministic
        c = self.config
        b, n, cv = check_width(features, c.vision_width)
        hd, heads, side = c.hidden, c.heads, math.isqrt(c.num_queries)
        f = features.astype(c.dtype)
        if cv != hd:
            kernel = self._param("kv_in_kernel", (cv, hd), ("embed", "heads"), KERNEL_INIT)
            f = f @ kernel
        f = self._layer_norm("ln_kv", f)
        keys = f + jnp.asarray(sincos_2d(*patch_grid(n, c.grid), hd), c.dtype)
        split = lambda x: x.reshape(*x.shape[:-1], heads, hd // heads)
        h = self._param(
            "query_tokens", (c.num_queries, hd), ("queries", "embed"), nn.initializers.normal(0.02)
        )
        h = jnp.broadcast_to(h, (b, c.num_queries, hd))
        pos_q = jnp.asarray(sincos_2d(side, side, hd), c.dtype)
        for i in range(c.layers):
            q = self._dense(f"q_{i}", self._layer_norm(f"ln_q_{i}", h) + pos_q, hd, ("embed", "heads"))
            k = self._dense(f"k_{i}", keys, hd, ("embed", "heads"))
            v = self._dense(f"v_{i}", f, hd, ("embed", "heads"))
            a = attention(split(q), split(k), split(v)).reshape(b, c.num_queries, hd)
            h = h + self._dense(f"out_{i}", a, hd, ("heads", "embed"))
            if c.mlp_dim:
                y = self._dense(f"fc1_{i}", self._layer_norm(f"ln_ffn_{i}", h), c.mlp_dim, ("embed", "mlp"))
                y = nn.gelu(y, approximate=False)
                h = h + self._dense(f"fc2_{i}", y, hd, ("mlp", "embed"))
        return self._dense("llm_proj", self._layer_norm("ln_post", h), c.llm_width, ("embed", "mlp"))
