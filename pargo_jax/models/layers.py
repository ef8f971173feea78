"""The one linear layer of every model: logically partitioned kernel + bias, optional LoRA adapter.

``dense_params`` creates the parameters (also used by ParGo for its layer-stacked kernels), ``Dense``
applies them. A kernel has shape ``(lead..., in..., out...)`` with one logical axis name per axis
(see :mod:`pargo_jax.sharding`); its bias drops the ``in`` axes. Kernels are initialized from
N(0, 0.02), biases with zeros.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

KERNEL_INIT = nn.initializers.normal(0.02)


def dense_params(
    module: nn.Module,
    prefix: str,
    shape: Sequence[int],
    names: Sequence[str | None],
    *,
    num_in: int = 1,
    num_out: int = 1,
    use_bias: bool = True,
    param_dtype: Any = jnp.float32,
    init=KERNEL_INIT,
) -> tuple[jax.Array, jax.Array | None]:
    """``(kernel, bias or None)`` params named ``{prefix}kernel`` / ``{prefix}bias`` of ``module``.

    ``shape`` = lead + ``num_in`` contracted axes + ``num_out`` output axes; ``names`` their logical
    axis names. The bias has shape lead + out."""
    shape, names = tuple(shape), tuple(names)
    if len(shape) != len(names) or len(shape) < num_in + num_out:
        raise ValueError(f"Kernel shape {shape} needs one logical name per axis, got {names}.")
    init = nn.with_logical_partitioning(init, names)
    kernel = module.param(f"{prefix}kernel", init, shape, param_dtype)
    if not use_bias:
        return kernel, None
    lead = len(shape) - num_in - num_out
    bias_shape, bias_names = shape[:lead] + shape[-num_out:], names[:lead] + names[-num_out:]
    zeros = nn.with_logical_partitioning(nn.initializers.zeros, bias_names)
    return kernel, module.param(f"{prefix}bias", zeros, bias_shape, param_dtype)


@functools.cache
def _regex(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def path_matches(pattern: str, path: tuple[str, ...] | str) -> bool:
    """Whether ``pattern`` fully matches the ``/``-joined module ``path`` or any suffix of it that
    starts at a path component (so ``"layers_\\d+/attn/q"`` also matches ``"llm/layers_0/attn/q"``
    when the LLM is a submodule)."""
    parts = path.split("/") if isinstance(path, str) else list(path)
    rx = _regex(pattern)
    return any(rx.fullmatch("/".join(parts[i:])) for i in range(len(parts)))


def lora_a_init(in_axes: int) -> nn.initializers.Initializer:
    """PEFT's ``kaiming_uniform_(a=sqrt(5))`` for ``lora_a`` (in..., rank): U(+-1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(
        1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(in_axes)), out_axis=in_axes
    )


def _contract(x: jax.Array, w: jax.Array, num_in: int) -> jax.Array:
    """``x`` (..., in...) . ``w`` (in..., out...) over the ``num_in`` trailing axes of ``x``, as one 2-D
    matmul: for a 3-D ``dot_general`` XLA:CPU transposes the activation gradient in the backward pass
    (17% of the demo step; docs/results/performance.md)."""
    lead, ins, outs = x.shape[: x.ndim - num_in], w.shape[:num_in], w.shape[num_in:]
    y = jnp.reshape(x, (-1, math.prod(ins))) @ jnp.reshape(w, (math.prod(ins), math.prod(outs)))
    return jnp.reshape(y, lead + outs)


class Dense(nn.Module):
    """``y = x . kernel + bias`` contracting the last ``in_axes`` axes of ``x`` into ``features``.

    The kernel keeps its full ``(in..., out...)`` shape so logical partitioning applies to the real
    axes (flax's DenseGeneral initializes a flat 2-D kernel). ``names``: logical names of the kernel
    axes. With ``lora_rank = r > 0`` and ``lora_targets`` matching this module's path (see
    :func:`path_matches`) it adds ``(lora_alpha / r) * (x @ lora_a) @ lora_b`` with ``lora_a``
    (in..., r) kaiming-uniform and ``lora_b`` (r, out...) zeros, so a fresh adapter is the identity."""

    features: tuple[int, ...]
    names: tuple[str | None, ...]
    in_axes: int = 1
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = ""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape[x.ndim - self.in_axes :] + tuple(self.features)
        kernel, bias = dense_params(
            self, "", shape, self.names, num_in=self.in_axes, num_out=len(self.features),
            use_bias=self.use_bias, param_dtype=self.param_dtype,
        )  # fmt: skip
        x = x.astype(self.dtype)
        y = _contract(x, kernel.astype(self.dtype), self.in_axes)
        if self.lora_rank > 0 and path_matches(self.lora_targets, self.scope.path):
            r, n_in = self.lora_rank, self.in_axes
            a_init = nn.with_logical_partitioning(lora_a_init(n_in), self.names[:n_in] + (None,))
            b_init = nn.with_logical_partitioning(nn.initializers.zeros, (None,) + self.names[n_in:])
            a = self.param("lora_a", a_init, shape[:n_in] + (r,), self.param_dtype)
            b = self.param("lora_b", b_init, (r,) + tuple(self.features), self.param_dtype)
            h = _contract(_contract(x, a.astype(self.dtype), n_in), b.astype(self.dtype), 1)
            y = y + jnp.asarray(self.lora_alpha / r, self.dtype) * h
        if bias is not None:
            y = y + bias.astype(self.dtype)
        return y


def sincos_2d(rows: int, cols: int, dim: int) -> np.ndarray:
    """(rows * cols, dim) positions, raster order: [sin, cos](row * w) ++ [sin, cos](col * w) with
    w_i = 10000^(-i / (dim / 4)), i < dim / 4."""
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    one = lambda p: np.concatenate([np.sin(p.reshape(-1, 1) * omega), np.cos(p.reshape(-1, 1) * omega)], 1)
    return np.concatenate([one(r), one(c)], 1).astype(np.float32)


DEPTHWISE_FORMS = ("conv", "views")


def depthwise_conv(x: jax.Array, kernel: jax.Array, form: str = "conv") -> jax.Array:
    """Depthwise k x k convolution (cross-correlation, zero padding k // 2, odd k) of NHWC ``x`` with a
    (k, k, 1, C) kernel. ``form="conv"``: ``lax.conv_general_dilated(..., feature_group_count=C)``, the
    native kernel. ``form="views"``: the k * k shifted views contracted with the kernel, the same numbers;
    for ``vmap`` over kernels (the projector grid's seeds), where XLA's CPU backend turns the conv into
    one grouped convolution whose gradient ran 20x slower. Views cost memory: forward + backward of a
    3 x 3 at (8, 24, 24, 1024) on CPU took 486 MB of temporaries against 72 MB."""
    if form not in DEPTHWISE_FORMS:
        raise ValueError(f"depthwise={form!r} is not one of {DEPTHWISE_FORMS}.")
    k = kernel.shape[0]
    pad = k // 2
    if form == "conv":
        dims, padding = ("NHWC", "HWIO", "NHWC"), ((pad, pad), (pad, pad))
        return jax.lax.conv_general_dilated(
            x, kernel, (1, 1), padding, dimension_numbers=dims, feature_group_count=x.shape[-1]
        )
    h, w = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    views = jnp.stack([padded[:, i : i + h, j : j + w, :] for i in range(k) for j in range(k)], axis=3)
    return jnp.einsum("bhwkc,kc->bhwc", views, kernel.reshape(k * k, -1))
