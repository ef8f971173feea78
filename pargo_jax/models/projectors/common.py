"""What the projector modules share: parameters cast to the config's dtypes, with logical axes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from pargo_jax.models.layers import KERNEL_INIT, dense_params


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

    def _norm(self, name: str, shape, axes) -> tuple[jax.Array, jax.Array]:
        """LayerNorm parameters ``({name}_scale, {name}_bias)`` (ones, zeros) of ``shape``."""
        return (
            self._param(f"{name}_scale", shape, axes, nn.initializers.ones),
            self._param(f"{name}_bias", shape, axes, nn.initializers.zeros),
        )

    def _dense_params(self, name: str, shape, axes, init=KERNEL_INIT) -> tuple[jax.Array, jax.Array]:
        """``({name}_kernel, {name}_bias)`` of ``shape`` (lead..., in, out), cast to the compute dtype."""
        c = self.config
        kernel, bias = dense_params(self, f"{name}_", shape, axes, param_dtype=c.param_dtype, init=init)
        return jnp.asarray(kernel, c.dtype), jnp.asarray(bias, c.dtype)

    def _layer_norm(self, name: str, x: jax.Array, eps: float | None = None) -> jax.Array:
        """LayerNorm of ``x`` with parameters ``{name}_scale`` / ``{name}_bias`` (``eps``: the config's)."""
        scale, bias = self._norm(name, (x.shape[-1],), ("norm",))
        return layer_norm(x, scale, bias, self.config.eps if eps is None else eps)
