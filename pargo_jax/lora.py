"""LoRA utilities for :class:`pargo_jax.models.llm.CausalLM` adapters (``lora_rank``/``lora_alpha``/
``lora_targets`` in :class:`~pargo_jax.models.llm.LLMConfig`).

Train only the adapters with ``trainable = {".*lora_(a|b)": 1.0}`` (plus e.g. ``"projector/.*"``).
:func:`merge_lora` folds each adapter into its kernel, ``W + (alpha / r) * a @ b``, and drops the
adapter params: the result loads into the same model with ``lora_rank=0`` (for export or fast decoding)
and gives the same logits. All functions take *unboxed* param trees (any nesting: ``{"params": ...}``,
the LLM subtree or a whole multimodal model) and work on sharded arrays.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pargo_jax.models.layers import lora_a_init
from pargo_jax.models.llm import LLMConfig

LORA_PARAMS = ("lora_a", "lora_b")
LORA_PATH_REGEX = r"(.*/)?lora_(a|b)"


def _lead_axes(kernel, a, b) -> int:
    """Leading stacked axes (``layers`` under scan): a (lead, in..., r), b (lead, r, out...), kernel
    (lead, in..., out...) -> lead = (a.ndim - 1) + (b.ndim - 1) - kernel.ndim."""
    lead = (a.ndim - 1) + (b.ndim - 1) - kernel.ndim
    if lead < 0 or a.shape[:lead] != kernel.shape[:lead] or a.shape[-1] != b.shape[lead]:
        raise ValueError(f"LoRA shapes a{a.shape} b{b.shape} do not fit kernel{kernel.shape}.")
    return lead


def lora_delta(kernel, a, b, alpha: float):
    """``(alpha / r) * a @ b`` in the kernel's shape (float32 accumulation)."""
    lead = _lead_axes(kernel, a, b)
    r = a.shape[-1]
    lead_shape = kernel.shape[:lead]
    a2 = jnp.reshape(a.astype(jnp.float32), (*lead_shape, -1, r))
    b2 = jnp.reshape(b.astype(jnp.float32), (*lead_shape, r, -1))
    return (alpha / r) * jnp.reshape(jnp.matmul(a2, b2), kernel.shape)


def merge_lora(params, config: LLMConfig | float):
    """``params`` with every ``{kernel, lora_a, lora_b}`` folded into ``kernel`` and the adapters removed.

    ``config``: the LoRA model's :class:`LLMConfig` (for ``lora_alpha``) or ``lora_alpha`` itself."""
    alpha = float(config.lora_alpha if isinstance(config, LLMConfig) else config)

    def walk(node):
        if not isinstance(node, Mapping):
            return node
        out = {k: walk(v) for k, v in node.items() if k not in LORA_PARAMS}
        has = [k in node for k in LORA_PARAMS]
        if any(has):
            if not all(has) or "kernel" not in node:
                raise ValueError(f"Incomplete LoRA adapter {sorted(node)}: need kernel, lora_a and lora_b.")
            k = node["kernel"]
            delta = lora_delta(k, node["lora_a"], node["lora_b"], alpha)
            out["kernel"] = (k.astype(jnp.float32) + delta).astype(k.dtype)
        return out

    return walk(params)


def lora_param_count(params) -> int:
    """Number of scalars in ``lora_a``/``lora_b`` params."""
    total = 0

    def walk(node):
        nonlocal total
        for k, v in node.items():
            if isinstance(v, Mapping):
                walk(v)
            elif k in LORA_PARAMS:
                total += int(np.prod(v.shape))

    walk(params)
    return total


def init_lora_params(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    seed: int = 0,
    dtype: Any = np.float32,
    stacked: Callable[[str], int] | None = None,
) -> dict[str, np.ndarray]:
    """Fresh adapters for flat ``{"a/b/lora_a": shape}`` entries (as a checkpoint never holds them):
    ``lora_a`` from the same initializer :class:`~pargo_jax.models.layers.Dense` uses, ``lora_b`` zeros.

    ``lora_a`` (lead..., in..., r): ``stacked(path)`` gives the number of leading stacked axes (default:
    1 for paths under a scanned ``layers/``, else 0); ``in`` is one axis except for ``attn/o`` (heads,
    head_dim). Each tensor's key is derived from ``seed`` and a hash of its path (deterministic)."""
    out: dict[str, np.ndarray] = {}
    for path, shape in shapes.items():
        if path.endswith("lora_b"):
            out[path] = np.zeros(shape, dtype)
            continue
        if not path.endswith("lora_a"):
            raise ValueError(f"{path!r} is not a LoRA param (lora_a / lora_b).")
        lead = stacked(path) if stacked else int(path.startswith("layers/") or "/layers/" in path)
        in_axes = len(shape) - 1 - lead
        key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()) & 0x7FFFFFFF)
        init = functools.partial(lora_a_init(in_axes), shape=shape[lead:], dtype=jnp.float32)
        keys = jax.random.split(key, int(np.prod(shape[:lead], dtype=np.int64)))
        x = jax.vmap(init)(keys).reshape(shape)
        out[path] = np.asarray(x).astype(dtype)
    return out


def merged(params, config: LLMConfig):
    """``(params with every adapter folded in, config without LoRA)``: the plain LLM a LoRA run is."""
    import dataclasses

    if not config.lora_rank:
        return params, config
    return merge_lora(params, config), dataclasses.replace(config, lora_rank=0, lora_targets="")
