"""X-Former (Swetha et al., ECCV 2024): the BLIP-2 Q-Former over CLIP features, its query outputs fused
with a frozen MAE's tokens by a dual cross-attention; the fused queries feed the LLM.

The dual cross-attention fuses the Q-Former's query
outputs ``Zq`` (B, Q, H), which carry CLIP's global semantics, with an MAE's visible tokens ``M``
(B, L, C_mae), which carry local detail::

    m  = M W_in                                  # MAE width -> H
    M' = Block(q=m,  kv=Zq)                      # global semantics into the local tokens
    Z' = Block(q=Zq, kv=M')                      # local detail into the queries
    repeated ``layers`` times (each round's M', Z' feed the next)
    D  = M' W_dec                                # H -> the MAE decoder's width, for reconstruction

``Block`` is a post-LN BERT layer without self-attention, as the Q-Former's own layers:
``x = LN(x + CrossAttn(x, kv)); x = LN(x + W2 gelu(W1 x))`` (exact GELU, LayerNorm eps 1e-12). The
paper publishes no code; what it fixes is the order of the two attentions, that M' reconstructs the
masked patches through the frozen MAE decoder and that Z' feeds the LLM. The block's form follows
the Q-Former it extends.

Stage 1 (:meth:`pargo_jax.models.mllm.VisionLanguageModel.stage1_losses`) masks the MAE's input,
reconstructs the masked patches from D through the frozen MAE decoder, and computes BLIP-2's ITC on Z'
and ITM on the fused query outputs of the matching pass (ITG is BLIP-2's: the text reads the Q-Former's
queries inside its layers). Stage 2 and inference: the MAE sees the whole image and Z' -> ``llm_proj``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from pargo_jax.models.attention import attention
from pargo_jax.models.layers import Dense
from pargo_jax.models.projectors.blip2 import QFormer, QFormerConfig
from pargo_jax.models.projectors.common import layer_norm


class CrossBlock(nn.Module):
    """``x`` (B, Lq, H) attends to ``kv`` (B, Lk, H): post-LN cross-attention then feed-forward."""

    heads: int
    mlp_dim: int
    eps: float = 1e-12
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _dense(self, features: int, axes: tuple[str, str], name: str) -> Dense:
        return Dense((features,), axes, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def _norm(self, x: jax.Array, name: str) -> jax.Array:
        width = (x.shape[-1],)
        scale = self.param(f"{name}_scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           width, self.param_dtype)  # fmt: skip
        bias = self.param(f"{name}_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                          width, self.param_dtype)  # fmt: skip
        return layer_norm(x, scale.astype(self.dtype), bias.astype(self.dtype), self.eps)

    @nn.compact
    def __call__(self, x: jax.Array, kv: jax.Array) -> jax.Array:
        h = x.shape[-1]
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, h // self.heads)
        q = split(self._dense(h, ("embed", "heads"), "query")(x))
        k = split(self._dense(h, ("embed", "heads"), "key")(kv))
        v = split(self._dense(h, ("embed", "heads"), "value")(kv))
        a = attention(q, k, v).reshape(x.shape)
        x = self._norm(x + self._dense(h, ("heads", "embed"), "attn_out")(a), "attn_norm")
        y = nn.gelu(self._dense(self.mlp_dim, ("embed", "mlp"), "fc1")(x), approximate=False)
        return self._norm(x + self._dense(h, ("mlp", "embed"), "fc2")(y), "ffn_norm")


class DualCrossAttention(nn.Module):
    """(Zq (B, Q, H), M (B, L, C_mae)) -> (Z' (B, Q, H), M' (B, L, H)); :meth:`to_decoder` maps M' to
    the MAE decoder's width. Params: ``detail_in``, ``local_{i}`` / ``global_{i}`` (the two blocks of
    round i), ``to_decoder``."""

    hidden: int
    heads: int
    mlp_dim: int
    decoder_width: int
    layers: int = 1
    eps: float = 1e-12
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        if self.hidden % self.heads:
            raise ValueError(
                f"The dual cross-attention's width {self.hidden} is not divisible by {self.heads} heads."
            )
        dense = lambda n, axes, name: Dense(
            (n,), axes, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        block = lambda name: CrossBlock(
            self.heads, self.mlp_dim, self.eps, self.dtype, self.param_dtype, name=name
        )
        self.detail_in = dense(self.hidden, (None, "embed"), "detail_in")
        self.local_blocks = [block(f"local_{i}") for i in range(self.layers)]
        self.global_blocks = [block(f"global_{i}") for i in range(self.layers)]
        self.to_decoder_proj = dense(self.decoder_width, ("embed", None), "to_decoder")

    def __call__(self, queries: jax.Array, detail: jax.Array) -> tuple[jax.Array, jax.Array]:
        z, m = queries.astype(self.dtype), self.detail_in(detail)
        for local, glob in zip(self.local_blocks, self.global_blocks):
            m = local(m, z)
            z = glob(z, m)
        if self.is_initializing():  # create to_decoder's params with the rest
            self.to_decoder_proj(m)
        return z, m

    def to_decoder(self, fused_detail: jax.Array) -> jax.Array:
        """M' (B, L, H) -> (B, L, decoder_width): the MAE decoder's input after its own embedding."""
        return self.to_decoder_proj(fused_detail)


@dataclasses.dataclass(frozen=True)
class XFormerConfig(QFormerConfig):
    """A :class:`QFormerConfig` plus the fusion: ``fusion_layers`` rounds of the dual cross-attention
    (same heads, MLP width and eps as the Q-Former), the MAE encoder's ``detail_width`` (ViT-H: 1280)
    and its decoder's ``decoder_width`` (filled in from ``config.model.detail``)."""

    fusion_layers: int = 1
    detail_width: int = 1280
    decoder_width: int = 512

    def __post_init__(self):
        super().__post_init__()
        for name in ("fusion_layers", "detail_width", "decoder_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"XFormerConfig.{name}={getattr(self, name)} must be >= 1.")

    def flops(self, num_patches: int) -> float:
        """The Q-Former's, plus the fusion over ``num_patches + 1`` MAE tokens (its grid + CLS; the
        MAE's grid is taken to be the tower's): per round two cross blocks (q/k/v/out, scores and
        mix, FFN), and the MAE tokens' projection to the Q-Former width."""
        q, m, h = self.num_queries, num_patches + 1, self.hidden

        def block(lq: int, lk: int) -> int:
            return (
                2 * lq * h * 2 * h + 2 * lk * h * 2 * h + 2 * 2 * lq * lk * h + 2 * 2 * lq * h * self.mlp_dim
            )

        fusion = self.fusion_layers * (block(m, q) + block(q, m)) + 2 * m * self.detail_width * h
        return super().flops(num_patches) + float(fusion)


class XFormer(nn.Module):
    """features (B, N, C_clip), ``detail`` (B, L, C_mae) -> LLM tokens (B, Q, D). Params: ``qformer``
    (a :class:`QFormer`: a BLIP-2 checkpoint loads there), ``fusion`` (:class:`DualCrossAttention`)."""

    config: XFormerConfig

    def setup(self):
        c = self.config
        self.qformer = QFormer(c)
        self.fusion = DualCrossAttention(
            c.hidden, c.heads, c.mlp_dim, c.decoder_width, c.fusion_layers, c.eps, c.dtype, c.param_dtype
        )

    def fuse(self, queries: jax.Array, detail: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(Z', M') of the Q-Former's query outputs and the MAE's tokens."""
        if detail.shape[-1] != self.config.detail_width:
            raise ValueError(
                f"The MAE tokens have width {detail.shape[-1]} but X-Former expects detail_width="
                f"{self.config.detail_width}."
            )
        return self.fusion(queries, detail)

    def __call__(self, features: jax.Array, *, deterministic: bool = True, detail: jax.Array | None = None):
        if detail is None:
            raise ValueError("X-Former fuses an MAE's tokens: pass detail (the MAE encoder's output).")
        z = self.qformer.encode_image(features, deterministic=deterministic)
        z, _ = self.fuse(z, detail)
        return self.qformer.project(z)
