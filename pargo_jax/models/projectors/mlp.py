"""LLaVA-1.5 projector: Linear -> GELU -> Linear over every patch, optionally over groups of ``group``
adjacent patches concatenated along channels (MiniGPT-v2 style token reduction)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from pargo_jax.models.projectors.common import check_width


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    vision_width: int = 1024
    llm_width: int = 4096
    group: int = 1  # adjacent patches (raster order) merged into one token
    dtype: str = "float32"
    param_dtype: str = "float32"

    def num_tokens(self, num_patches: int) -> int:
        if num_patches % self.group:
            raise ValueError(f"num_patches={num_patches} is not divisible by group={self.group}.")
        return num_patches // self.group

    def flops(self, num_patches: int) -> float:
        """Forward FLOPs on one image: fc1 over grouped patches, fc2."""
        t = self.num_tokens(num_patches)
        return float(2 * t * (self.group * self.vision_width) * self.llm_width + 2 * t * self.llm_width**2)


class MLPProjector(nn.Module):
    """features (B, N, C) -> (B, N / group, D)."""

    config: MLPConfig

    @nn.compact
    def __call__(self, features: jax.Array, *, deterministic: bool = True) -> jax.Array:
        del deterministic
        c = self.config
        b, n, width = check_width(features, c.vision_width)
        x = features.reshape(b, c.num_tokens(n), c.group * width).astype(c.dtype)
        dense = lambda name, axes: nn.Dense(
            c.llm_width,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            name=name,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]),
        )
        x = nn.gelu(dense("fc1", ("embed", "mlp"))(x), approximate=False)
        return dense("fc2", ("mlp", "embed"))(x).astype(jnp.dtype(c.dtype))
