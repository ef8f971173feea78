"""ParGo: partial-global queries over vision features (AAAI 2025), exactly as released, plus the
paper's cascaded partial perception. ``num_partial=0`` gives the Q-Former baseline.

Released computation (post-LN BERT), ``x`` = raw tower features (B, N, C)::

    f = LayerNorm_1e-5(x)                                   # ln_vision
    h = LayerNorm_1e-12(queries + pos_emb[:Q])              # Q = P partial + G global queries
    repeat L times:
        h = LN(h + SelfAttn(h, mask=self_mask[l]))          # partial<->partial, global<->global
        h = LN(h + CrossAttn(h, f, mask=cross_mask))        # partial i: its window; global: all
        h = LN(h + W2 gelu(W1 h))                           # exact (erf) GELU
    tokens = h @ W_llm + b                                  # (B, Q, D_llm)

Parameters are stacked over layers (leading axis L) so that the cross-attention keys/values of all
layers come from one large matmul, and self-attention q/k/v from one matmul per layer.

Layout choices for speed (measured on XLA:CPU, ``python -m pargo_jax.benchmarks.projector``): stacked
params and fused projection outputs are cut with ``lax.split``, never indexed, since the gradient of
an index is a zero-padded full-size array per use (8 padded copies of the 75 MB key/value gradient
before); activations stay 2-D (B*Q, H) so weight gradients contract one row axis (a 3-D contraction
made XLA transpose the gradient first); attention transposes are pinned in ``attention``. Two
computation paths give the same function: ``impl="dense"`` (masked full attention, the reference)
and ``impl="structured"`` (partial queries attend over their own window via reshape, no Q x N score
matrix; global queries dense; cascade groups as blocks).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from pargo_jax.models import masks
from pargo_jax.models.attention import attention, check_implementation, window_attention
from pargo_jax.models.layers import KERNEL_INIT
from pargo_jax.models.projectors.common import ProjectorModule, check_width, layer_norm

Dtype = jnp.dtype | str


@dataclasses.dataclass(frozen=True)
class ParGoConfig:
    """Shape and semantics of a ParGo projector (defaults: the released checkpoint)."""

    num_partial: int = 288
    num_global: int = 16
    hidden: int = 512
    heads: int = 8
    layers: int = 4
    mlp_dim: int = 2048
    vision_width: int = 1024
    llm_width: int = 4096
    max_positions: int = 512  # rows of the BERT position table (only the first P+G are used)
    cpp: str = "released"  # "released" | "cascaded"
    cascade_schedule: str | tuple[int, ...] = "double"
    layout: str = "raster"  # "raster" (released) | "grid"
    num_crops: int = 1
    grid: tuple[int, int] | None = None
    impl: str = "structured"  # "structured" | "dense"
    # the attention kernel (models.attention): None = cuDNN's fused one on a GPU where the call allows
    # it (bf16 / fp16, rank 4, head_dim a multiple of 8 <= 128), else XLA's | "xla" | "cudnn"
    attention_impl: str | None = None
    vision_eps: float = 1e-5
    eps: float = 1e-12
    dropout: float = 0.0
    init: str = (
        "bert"  # kernels: "bert" N(0, 0.02) as BERT / the release's new layers; "fan_in" N(0, 1/fan_in)
    )
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}.")
        if self.num_partial + self.num_global < 1:
            raise ValueError("ParGo needs at least one query: num_partial + num_global is 0.")
        if self.num_partial + self.num_global > self.max_positions:
            raise ValueError(
                f"{self.num_partial + self.num_global} queries exceed max_positions={self.max_positions}."
            )
        if self.impl not in ("structured", "dense"):
            raise ValueError(f"impl={self.impl!r} is not 'structured' or 'dense'.")
        check_implementation(self.attention_impl)
        if self.cpp not in ("released", "cascaded"):
            raise ValueError(f"cpp={self.cpp!r} is not 'released' or 'cascaded'.")
        if self.init not in ("bert", "fan_in"):
            raise ValueError(f"init={self.init!r} is not 'bert' or 'fan_in'.")

    @property
    def num_queries(self) -> int:
        return self.num_partial + self.num_global

    def num_tokens(self, num_patches: int) -> int:
        """Image tokens handed to the LLM: one per query, whatever the number of patches."""
        del num_patches
        return self.num_queries

    def flops(self, num_patches: int) -> float:
        """Forward FLOPs on one image's ``num_patches`` features, attention counted dense (what
        ``impl="dense"`` computes; the official EVA02-L/Vicuna shape gives 17.2 GFLOP): per layer self
        q/k/v/out, self attention, cross q/out, the cross keys/values of all patches, cross attention,
        the FFN; then the projection to the LLM."""
        q, n, h, cv = self.num_queries, num_patches, self.hidden, self.vision_width
        per_layer = (
            2 * q * h * 4 * h  # self q, k, v, out
            + 2 * 2 * q * q * h  # self attention
            + 2 * q * h * 2 * h  # cross q, out
            + 2 * n * cv * 2 * h  # cross k, v over the patches
            + 2 * 2 * q * n * h  # cross attention
            + 2 * 2 * q * h * self.mlp_dim  # fc1, fc2
        )
        return float(self.layers * per_layer + 2 * q * h * self.llm_width)


class ParGo(ProjectorModule):
    """features (B, N, C_vision) -> image tokens (B, P+G, D_llm)."""

    config: ParGoConfig

    def _dense_params(self, name, shape, axes):
        """Kernel (lead..., in, out) + bias. ``init="fan_in"`` scales the kernel by its own ``in``
        axis, so that from scratch at small widths the image path is not ~50x weaker than the
        queries (N(0, 0.02) at hidden 64 leaves the tokens 0.6% image-dependent)."""
        init = KERNEL_INIT
        if self.config.init == "fan_in":
            lead = tuple(range(len(shape) - 2))
            init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", -2, -1, lead)
        return super()._dense_params(name, shape, axes, init)

    @nn.compact
    def __call__(self, features: jax.Array, *, deterministic: bool = True) -> jax.Array:
        c = self.config
        b, n, cv = check_width(features, c.vision_width)
        h_dim, heads, nl, q_len = c.hidden, c.heads, c.layers, c.num_queries
        L = ("layers",)
        windows = masks.partial_windows(c.num_partial, n, layout=c.layout, num_crops=c.num_crops, grid=c.grid)

        f = layer_norm(features.astype(c.dtype), *self._norm("ln_vision", (cv,), ("norm",)), c.vision_eps)
        queries = self._param(
            "query_tokens", (q_len, h_dim), ("queries", "embed"), nn.initializers.normal(0.02)
        )
        pos = self._param(
            "position_embeddings", (c.max_positions, h_dim), (None, "embed"), nn.initializers.normal(0.02)
        )
        h = layer_norm(queries + pos[:q_len], *self._norm("embed_norm", (h_dim,), ("norm",)), c.eps)
        # Activations stay 2-D (B*Q, H) between attentions: every projection is then a plain matmul
        # whose weight gradient contracts one row axis (a 3-D one made XLA transpose the gradient).
        h = jnp.broadcast_to(h, (b, q_len, h_dim)).reshape(b * q_len, h_dim)
        h = self._dropout(h, deterministic)

        self_qkv = self._dense_params("self_qkv", (nl, 3, h_dim, h_dim), L + (None, "embed", "heads"))
        self_out = self._dense_params("self_out", (nl, h_dim, h_dim), L + ("heads", "embed"))
        self_norm = self._norm("self_norm", (nl, h_dim), L + ("norm",))
        cross_q = self._dense_params("cross_q", (nl, h_dim, h_dim), L + ("embed", "heads"))
        cross_kv = self._dense_params("cross_kv", (nl, 2, cv, h_dim), L + (None, "embed", "heads"))
        cross_out = self._dense_params("cross_out", (nl, h_dim, h_dim), L + ("heads", "embed"))
        cross_norm = self._norm("cross_norm", (nl, h_dim), L + ("norm",))
        fc1 = self._dense_params("fc1", (nl, h_dim, c.mlp_dim), L + ("embed", "mlp"))
        fc2 = self._dense_params("fc2", (nl, c.mlp_dim, h_dim), L + ("mlp", "embed"))
        ffn_norm = self._norm("ffn_norm", (nl, h_dim), L + ("norm",))

        # Per-layer views of the stacked params via lax.split, whose transpose is one concatenate
        # (indexing would give a zero-padded full-size gradient per layer, summed afterwards).
        unstack = lambda t: [[x.reshape(x.shape[1:]) for x in _split(p, nl, 0)] for p in t]
        self_qkv, self_out, self_norm = unstack(self_qkv), unstack(self_out), unstack(self_norm)
        cross_q, cross_out, cross_norm = unstack(cross_q), unstack(cross_out), unstack(cross_norm)
        fc1, fc2, ffn_norm = unstack(fc1), unstack(fc2), unstack(ffn_norm)

        # Keys/values of every layer's cross-attention in one (B*N, C) x (C, L*2*H) matmul, split
        # per layer with lax.split so that the backward concatenates instead of padding.
        if c.impl == "structured" and c.num_partial:
            f = f[:, np.asarray(windows).reshape(-1)] if not _is_identity(windows) else f
        kv_kernel = jnp.transpose(cross_kv[0], (2, 0, 1, 3)).reshape(cv, nl * 2 * h_dim)
        kv = f.reshape(b * n, cv) @ kv_kernel + cross_kv[1].reshape(-1)
        kv = [x.reshape(b, n, heads, h_dim // heads) for x in _split(kv, 2 * nl, 1)]

        self_masks = masks.self_masks(c.num_partial, c.num_global, nl, c.cpp, c.cascade_schedule)
        cross_mask = masks.partial_global_cross_mask(
            c.num_partial, c.num_global, n, layout=c.layout, num_crops=c.num_crops, grid=c.grid
        )
        for i in range(nl):
            w = jnp.transpose(self_qkv[0][i], (1, 0, 2)).reshape(h_dim, 3 * h_dim)
            qkv = h @ w + self_qkv[1][i].reshape(-1)
            qs, ks, vs = (x.reshape(b, q_len, heads, h_dim // heads) for x in _split(qkv, 3, 1))
            a = self._self_attention(qs, ks, vs, self_masks[i], i)
            h = self._residual_norm(h, a, self_out, self_norm, i, deterministic)
            q = (h @ cross_q[0][i] + cross_q[1][i]).reshape(b, q_len, heads, h_dim // heads)
            a = self._cross_attention(q, kv[2 * i], kv[2 * i + 1], cross_mask, windows.shape[-1])
            h = self._residual_norm(h, a, cross_out, cross_norm, i, deterministic)
            y = nn.gelu(h @ fc1[0][i] + fc1[1][i], approximate=False)
            h = self._residual_norm(h, y, fc2, ffn_norm, i, deterministic, flat=True)
        kernel, bias = self._dense_params("llm_proj", (h_dim, c.llm_width), ("embed", "mlp"))
        return (h @ kernel + bias).reshape(b, q_len, c.llm_width)

    def _dropout(self, x, deterministic):
        return nn.Dropout(self.config.dropout)(x, deterministic=deterministic) if self.config.dropout else x

    def _residual_norm(self, h, update, dense, norm, i, deterministic, flat=False):
        """Post-LN residual: LN(h + dropout(update @ W + b))."""
        if not flat:
            update = update.reshape(h.shape)
        y = self._dropout(update @ dense[0][i] + dense[1][i], deterministic)
        return layer_norm(h + y, norm[0][i], norm[1][i], self.config.eps)

    def _self_attention(self, q, k, v, mask: np.ndarray, layer: int):
        c, impl = self.config, self.config.attention_impl
        if c.impl == "dense" or not c.num_partial:
            return attention(q, k, v, mask, implementation=impl)
        p = c.num_partial
        if not c.num_global:
            return _self_partial(q, k, v, mask, impl)
        (qp, qg), (kp, kg), (vp, vg) = (_split(x, (p, c.num_global), 1) for x in (q, k, v))
        partial = _self_partial(qp, kp, vp, mask[:p, :p], impl)
        return jnp.concatenate([partial, attention(qg, kg, vg, implementation=impl)], axis=1)

    def _cross_attention(self, q, k, v, mask: np.ndarray, window: int):
        c, impl = self.config, self.config.attention_impl
        if c.impl == "dense" or not c.num_partial:
            return attention(q, k, v, mask, implementation=impl)
        p = c.num_partial
        b, n = k.shape[:2]
        # Features were permuted so that window i is rows [i*w, (i+1)*w): a reshape, no gather.
        kw = k.reshape(b, p, window, *k.shape[2:])
        vw = v.reshape(b, p, window, *v.shape[2:])
        if not c.num_global:
            return window_attention(q, kw, vw)
        qp, qg = _split(q, (p, c.num_global), 1)
        glob = attention(qg, k, v, implementation=impl)  # global queries see every patch (in any order)
        return jnp.concatenate([window_attention(qp, kw, vw), glob], axis=1)


def _split(x: jax.Array, sections, axis: int) -> list[jax.Array]:
    """``x`` cut along ``axis`` into equal ``sections`` (an int) or the given sizes; unlike slicing,
    its transpose is a single concatenate."""
    if isinstance(sections, int):
        sections = (x.shape[axis] // sections,) * sections
    return jax.lax.split(x, tuple(sections), axis=axis)


def _is_identity(windows: np.ndarray) -> bool:
    flat = np.asarray(windows).reshape(-1)
    return bool(np.array_equal(flat, np.arange(flat.size)))


def _self_partial(q, k, v, mask: np.ndarray, impl: str | None):
    """Partial<->partial self-attention: full (released), block-diagonal groups (cascade) as blocks
    folded into the batch (rank 4, as cuDNN takes it), or masked dense when the groups are ragged."""
    b, p = q.shape[:2]
    if mask.all():
        return attention(q, k, v, implementation=impl)
    size = int(mask[0].sum())
    blocks = np.kron(np.eye(p // size, dtype=bool), np.ones((size, size), bool)) if p % size == 0 else None
    if blocks is None or not np.array_equal(blocks, mask):
        return attention(q, k, v, mask, implementation=impl)
    fold = lambda x: x.reshape(b * (p // size), size, *x.shape[2:])
    out = attention(fold(q), fold(k), fold(v), implementation=impl)
    return out.reshape(q.shape)
