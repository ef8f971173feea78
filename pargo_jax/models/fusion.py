"""MG-LLaVA's Conv-Gate fusion of a low-res token map L (B, N, d) and a high-res map H (B, h, w, C) on
the same grid (h * w == N; e.g. CLIP-L/336's 24 x 24 tokens and ConvNeXt-L's last stage at 768 px)::

    H' = proj_h(gelu(conv1x1(H)))                       # C -> C -> d, proj_h zero-initialized
    L' = L + proj_l(gelu(depthwise_conv7x7(L)))         # on the sqrt(N) x sqrt(N) grid, proj_l zeros
    g  = W2 gelu(W1 mean_tokens(concat[L', H']))        # 2d -> d / 2 -> 1: one scalar per image
    F  = L' + tanh(g) * H'                              # mode "gate_sum": F == L at initialization

and the ablations of the same release (``DualPathFuseModule1-3``): ``gate_concat`` [L', tanh(g) H'],
``conv_concat`` [L', H'], ``concat`` [L, H] (no parameters). GELU is exact.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from pargo_jax.models.layers import DEPTHWISE_FORMS, depthwise_conv

MODES = ("gate_sum", "gate_concat", "conv_concat", "concat")
XAVIER = nn.initializers.xavier_uniform()


def xavier_depthwise(key, shape, dtype=jnp.float32):
    """torch's xavier_uniform_ on a depthwise (C, 1, 7, 7) weight: fan_in = 49, fan_out = 49 C."""
    kh, kw, _, ch = shape
    limit = math.sqrt(6.0 / (kh * kw + kh * kw * ch))
    return jax.random.uniform(key, shape, dtype, -limit, limit)


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    low_dim: int = 1024  # CLIP-L
    high_dim: int = 1536  # ConvNeXt-L's last stage
    mode: str = "gate_sum"
    zero_init: bool = True  # proj_h and proj_l start at zero (as released)
    depthwise: str = "conv"  # the 7x7 depthwise convolution's form (see layers.depthwise_conv)
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"fusion mode={self.mode!r} is not one of {MODES}.")
        if self.depthwise not in DEPTHWISE_FORMS:
            raise ValueError(f"fusion depthwise={self.depthwise!r} is not one of {DEPTHWISE_FORMS}.")

    @property
    def out_dim(self) -> int:
        return {"gate_sum": self.low_dim, "concat": self.low_dim + self.high_dim}.get(
            self.mode, 2 * self.low_dim
        )


class DualPathFusion(nn.Module):
    """(low (B, N, d), high (B, h, w, C)) -> fused tokens (B, N, ``config.out_dim``)."""

    config: FusionConfig

    def _conv1x1(self, x, features, name, init):
        c = self.config
        kernel = self.param(f"{name}_kernel", nn.with_logical_partitioning(init, ("embed", "mlp")),
                            (x.shape[-1], features), c.param_dtype)  # fmt: skip
        bias = self.param(f"{name}_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                          (features,), c.param_dtype)  # fmt: skip
        return x @ jnp.asarray(kernel, c.dtype) + jnp.asarray(bias, c.dtype)

    @nn.compact
    def __call__(self, low: jax.Array, high: jax.Array) -> jax.Array:
        c = self.config
        b, n, d = low.shape
        _, h, w, ch = high.shape
        if (d, ch) != (c.low_dim, c.high_dim):
            raise ValueError(f"fusion expects widths ({c.low_dim}, {c.high_dim}), got ({d}, {ch}).")
        if h * w != n or math.isqrt(n) ** 2 != n:
            raise ValueError(
                f"the high-res map is {h} x {w} but the low-res tokens are {n}: grids must match."
            )
        low, high = low.astype(c.dtype), high.astype(c.dtype).reshape(b, n, ch)
        if c.mode == "concat":
            return jnp.concatenate([low, high], -1)
        proj_init = nn.initializers.zeros if c.zero_init else XAVIER
        high = self._conv1x1(nn.gelu(self._conv1x1(high, ch, "slow_conv", XAVIER), approximate=False), d,
                             "slow_proj", proj_init)  # fmt: skip
        side = math.isqrt(n)
        dw_init = nn.with_logical_partitioning(xavier_depthwise, (None, None, None, "mlp"))
        dw = self.param("fast_conv_kernel", dw_init, (7, 7, 1, d), c.param_dtype)
        dw_bias = self.param("fast_conv_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                             (d,), c.param_dtype)  # fmt: skip
        grid = low.reshape(b, side, side, d)
        y = depthwise_conv(grid, jnp.asarray(dw, c.dtype), c.depthwise) + jnp.asarray(dw_bias, c.dtype)
        low = low + self._conv1x1(nn.gelu(y, approximate=False).reshape(b, n, d), d, "fast_proj", proj_init)
        if c.mode == "conv_concat":
            return jnp.concatenate([low, high], -1)
        pooled = jnp.concatenate([low, high], -1).mean(1)
        g = nn.Dense(d // 2, dtype=c.dtype, param_dtype=c.param_dtype, name="gate_fc1")(pooled)
        g = nn.Dense(1, dtype=c.dtype, param_dtype=c.param_dtype, name="gate_fc2")(
            nn.gelu(g, approximate=False)
        )
        gated = jnp.tanh(g)[:, None, :] * high
        return low + gated if c.mode == "gate_sum" else jnp.concatenate([low, gated], -1)
