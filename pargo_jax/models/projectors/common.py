"""What the projector modules share: parameters cast to the config's dtypes, with logical axes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale + bias).astype(x.dtype)


def check_width(features: jax.Array, vision_width: int) -> tuple[int, int, int]:
    """``features.shape`` (B, N, C), or one error when C is not the projector's ``vision_width``."""
    b, n, width = features.shape
    if width != vision_width:
        raise ValueError(
            f"features have width {width} but the projector expects vision_width={vision_width}."
        )
    return b, n, width


class ProjectorModule(nn.Module):
    """A module with a ``config`` holding ``dtype``, ``param_dtype`` and ``eps``."""

    def _param(self, name: str, shape, axes: tuple[str | None, ...], init) -> jax.Array:
        """Parameter ``name`` (stored in ``param_dtype``, logical ``axes``) cast to the compute dtype."""
        init = nn.with_logical_partitioning(init, axes)
        return jnp.asarray(self.param(name, init, tuple(shape), self.config.param_dtype), self.config.dtype)

    def _layer_norm(self, name: str, x: jax.Array) -> jax.Array:
        """LayerNorm of ``x`` with parameters ``{name}_scale`` / ``{name}_bias``."""
        width = (x.shape[-1],)
        scale = self._param(f"{name}_scale", width, ("norm",), nn.initializers.ones)
        bias = self._param(f"{name}_bias", width, ("norm",), nn.initializers.zeros)
        return layer_norm(x, scale, bias, self.config.eps)
