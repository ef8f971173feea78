"""Honeybee's C-Abstractor (CVPR 2024): convolutions keep locality while an adaptive average pool
sets the number of tokens.

``x`` = tower features (B, N, C) on an ``h x w`` patch grid, ``T = t x t`` tokens::

    x = x + pos                                  # learned (N, C), N(0, 0.02)
    x = stage(depth, C -> H)(x)                  # (B, h, w, H)
    x = adaptive_avg_pool(x, (t, t))             # PyTorch's bins: [floor(i h / t), ceil((i + 1) h / t))
    x = stage(depth, H -> H)(x)
    tokens = MLP(x)                              # Linear(H, D), then (SiLU, Linear(D, D)) x (mlp_depth - 1)

A stage is ``depth`` RegNet bottleneck blocks (timm's ``RegStage`` with SiLU and LayerNorm2d, bottle
ratio 1, as Honeybee builds it); a block, channels last::

    y = silu(LN(x @ W1))                         # 1x1 conv, no bias
    y = silu(LN(depthwise_conv3x3(y)))           # one 3x3 filter per channel, zero padding 1
    y = y * sigmoid(silu(mean_hw(y) @ S1 + s1) @ S2 + s2)   # squeeze-excite, round(in / 4) channels
    y = LN(y @ W3)
    out = silu(y + shortcut(x))                  # shortcut: LN(x @ W_s) when in != out, else x
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from pargo_jax.models.layers import DEPTHWISE_FORMS, dense_params, depthwise_conv
from pargo_jax.models.projectors.common import ProjectorModule, check_width
from pargo_jax.models.projectors.resampler import patch_grid

Dtype = jnp.dtype | str
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@dataclasses.dataclass(frozen=True)
class CAbstractorConfig:
    num_queries: int = 144  # output tokens, a square (Honeybee: 144 or 256)
    hidden: int = 1024
    depth: int = 3  # bottleneck blocks per stage
    mlp_depth: int = 2
    se_ratio: float = 0.25
    vision_width: int = 1024
    llm_width: int = 4096
    grid: tuple[int, int] | None = None  # the features' patch grid (default: square)
    eps: float = 1e-6  # timm's LayerNorm2d
    depthwise: str = "conv"  # the depthwise convolution's form: "conv" | "views" (see layers.depthwise_conv)
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"

    def __post_init__(self):
        if math.isqrt(self.num_queries) ** 2 != self.num_queries:
            raise ValueError(f"num_queries={self.num_queries} is not a square (16, 36, 64, ...).")
        if self.depth < 1 or self.mlp_depth < 1:
            raise ValueError(f"depth={self.depth} and mlp_depth={self.mlp_depth} must be >= 1.")
        if self.depthwise not in DEPTHWISE_FORMS:
            raise ValueError(f"depthwise={self.depthwise!r} is not one of {DEPTHWISE_FORMS}.")

    def num_tokens(self, num_patches: int) -> int:
        del num_patches
        return self.num_queries

    def flops(self, num_patches: int) -> float:
        """Forward FLOPs on one image: both stages' 1x1 convs, depthwise 3x3 convs, squeeze-excite, the
        shortcut projection, and the readout MLP (pooling and norms not counted)."""

        def stage(n, c_in, h):
            total = 0
            for i in range(self.depth):
                cin = c_in if i == 0 else h
                rd = round(cin * self.se_ratio)
                total += 2 * n * (cin * h + 9 * h + h * h) + 2 * 2 * h * rd
                total += 2 * n * cin * h if cin != h else 0
            return total

        t, h, d = self.num_queries, self.hidden, self.llm_width
        readout = 2 * t * h * d + (self.mlp_depth - 1) * 2 * t * d * d
        return float(stage(num_patches, self.vision_width, h) + stage(t, h, h) + readout)


def adaptive_pool_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) averaging weights of PyTorch's ``AdaptiveAvgPool1d``: bin i covers
    [floor(i * size / out), ceil((i + 1) * size / out))."""
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        lo, hi = (i * size) // out, -((-(i + 1) * size) // out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


class CAbstractor(ProjectorModule):
    """features (B, N, C_vision) -> image tokens (B, T, D_llm)."""

    config: CAbstractorConfig

    def _dense(self, name: str, x: jax.Array, out: int, axes, *, bias: bool = True, conv: bool = True):
        """``x @ W (+ b)``; ``conv``: a 1x1 convolution, initialized as timm's RegNet (N(0, 2 / fan_out)),
        else a linear layer (LeCun normal)."""
        c = self.config
        init = CONV_INIT if conv else nn.initializers.lecun_normal()
        kernel, b = dense_params(
            self, f"{name}_", (x.shape[-1], out), axes, use_bias=bias, param_dtype=c.param_dtype, init=init
        )
        y = x @ jnp.asarray(kernel, c.dtype)
        return y + jnp.asarray(b, c.dtype) if b is not None else y

    def _block(self, name: str, x: jax.Array, out: int) -> jax.Array:
        c = self.config
        cin = x.shape[-1]
        y = nn.silu(
            self._layer_norm(
                f"{name}_ln1", self._dense(f"{name}_conv1", x, out, ("embed", "mlp"), bias=False)
            )
        )
        # timm's fan_out of a depthwise 3x3 kernel is 9, which flax sees as the fan_in of (3, 3, 1, C).
        dw = self._param(
            f"{name}_conv2_kernel", (3, 3, 1, out), (None, None, None, "mlp"),
            nn.initializers.variance_scaling(2.0, "fan_in", "normal", in_axis=(0, 1, 2), out_axis=3),
        )  # fmt: skip
        y = depthwise_conv(y, jnp.asarray(dw, y.dtype), c.depthwise)
        y = nn.silu(self._layer_norm(f"{name}_ln2", y))
        rd = round(cin * c.se_ratio)
        if rd:
            s = nn.silu(self._dense(f"{name}_se1", y.mean((1, 2), keepdims=True), rd, ("mlp", None)))
            y = y * jax.nn.sigmoid(self._dense(f"{name}_se2", s, out, (None, "mlp")))
        y = self._layer_norm(
            f"{name}_ln3", self._dense(f"{name}_conv3", y, out, ("mlp", "embed"), bias=False)
        )
        if cin != out:
            x = self._layer_norm(
                f"{name}_lns", self._dense(f"{name}_shortcut", x, out, ("embed", "mlp"), bias=False)
            )
        return nn.silu(y + x)

    @nn.compact
    def __call__(self, features: jax.Array, *, deterministic: bool = True) -> jax.Array:
        del deterministic
        c = self.config
        b, n, cv = check_width(features, c.vision_width)
        rows, cols = patch_grid(n, c.grid)
        side = math.isqrt(c.num_queries)
        pos = self._param("pos_embed", (n, cv), (None, "embed"), nn.initializers.normal(0.02))
        x = (features.astype(c.dtype) + pos).reshape(b, rows, cols, cv)
        for i in range(c.depth):
            x = self._block(f"s1_b{i}", x, c.hidden)
        pool_r = jnp.asarray(adaptive_pool_matrix(rows, side), c.dtype)
        pool_c = jnp.asarray(adaptive_pool_matrix(cols, side), c.dtype)
        x = jnp.einsum("ir,jc,brcd->bijd", pool_r, pool_c, x)
        for i in range(c.depth):
            x = self._block(f"s2_b{i}", x, c.hidden)
        x = x.reshape(b, c.num_queries, c.hidden)
        x = self._dense("readout_0", x, c.llm_width, ("embed", "mlp"), conv=False)
        for i in range(1, c.mlp_depth):
            x = self._dense(f"readout_{i}", nn.silu(x), c.llm_width, ("mlp", "embed"), conv=False)
        return x
