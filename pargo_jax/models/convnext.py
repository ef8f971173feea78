"""ConvNeXt (Liu et al. 2022) in timm's layout, returning the feature pyramid: MG-LLaVA's high-res tower
(OpenCLIP ``convnext_large_d_320``: timm ``convnext_large``, channels 192 / 384 / 768 / 1536, strides
4 / 8 / 16 / 32). Channels last::

    x = LN(conv4x4_s4(x))                                   # stem
    stage k: x = conv2x2_s2(LN(x)) for k > 0                # downsample
             repeat depths[k]: x = x + gamma * fc2(gelu(fc1(LN(dwconv7x7(x)))))
    returns [x after each stage]                            # (B, S / 4, S / 4, 192), ...

LayerNorms are over channels with eps 1e-6, GELU exact, the 7x7 convolution depthwise with padding 3.
Param names follow timm's (``stages_1/blocks_0/conv_dw``, ``mlp/fc1``, ``gamma``) so that
:func:`pargo_jax.convert.hf_vision.convnext_rules` is a one-to-one table.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = jnp.dtype | str
CONV_AXES = (None, None, None, "embed")  # (kh, kw, in / groups, out)


@dataclasses.dataclass(frozen=True)
class ConvNeXtConfig:
    depths: tuple[int, ...] = (3, 3, 27, 3)
    dims: tuple[int, ...] = (192, 384, 768, 1536)
    image_size: int = 768
    layer_scale: float = 1e-6  # gamma's initial value
    eps: float = 1e-6
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"

    def __post_init__(self):
        if len(self.depths) != len(self.dims):
            raise ValueError(f"depths {self.depths} and dims {self.dims} need one entry per stage.")
        if self.image_size % (4 * 2 ** (len(self.dims) - 1)):
            raise ValueError(f"image_size={self.image_size} is not divisible by the last stride.")

    def grid_sizes(self) -> tuple[int, ...]:
        """Side of each stage's feature map."""
        return tuple(self.image_size // (4 * 2**k) for k in range(len(self.dims)))


CONVNEXT_PRESETS = {
    "convnext_large": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
    "convnext_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    "tiny_test": dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), image_size=64),
}


class ConvNeXt(nn.Module):
    """pixels (B, S, S, 3) -> the 4 stage maps [(B, S / 4, S / 4, C_0), ..., (B, S / 32, S / 32, C_3)]."""

    config: ConvNeXtConfig

    def _conv(self, x, features, kernel, stride, name, groups=1):
        c = self.config
        return nn.Conv(
            features, (kernel, kernel), (stride, stride), padding="SAME" if kernel == 7 else "VALID",
            feature_group_count=groups, dtype=c.dtype, param_dtype=c.param_dtype, name=name,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        )(x)  # fmt: skip

    def _norm(self, x, name):
        c = self.config
        return nn.LayerNorm(
            c.eps, dtype=c.dtype, param_dtype=c.param_dtype, name=name,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        )(x)  # fmt: skip

    def _dense(self, x, features, axes, name):
        c = self.config
        return nn.Dense(
            features, dtype=c.dtype, param_dtype=c.param_dtype, name=name,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]),
        )(x)  # fmt: skip

    @nn.compact
    def __call__(self, pixels: jax.Array) -> list[jax.Array]:
        c = self.config
        x = pixels.astype(c.dtype)
        x = self._norm(self._conv(x, c.dims[0], 4, 4, "stem_conv"), "stem_norm")
        maps = []
        for k, (depth, dim) in enumerate(zip(c.depths, c.dims)):
            if k:
                x = self._conv(
                    self._norm(x, f"stages_{k}_downsample_norm"), dim, 2, 2, f"stages_{k}_downsample_conv"
                )
            for j in range(depth):
                name = f"stages_{k}_blocks_{j}"
                y = self._conv(x, dim, 7, 1, f"{name}_conv_dw", groups=dim)
                y = self._dense(self._norm(y, f"{name}_norm"), 4 * dim, ("embed", "mlp"), f"{name}_fc1")
                y = self._dense(nn.gelu(y, approximate=False), dim, ("mlp", "embed"), f"{name}_fc2")
                scale_init = nn.with_logical_partitioning(nn.initializers.constant(c.layer_scale), ("norm",))
                gamma = self.param(f"{name}_gamma", scale_init, (dim,), c.param_dtype)
                x = x + y * jnp.asarray(gamma, c.dtype)
            maps.append(x)
        return maps
