"""X-Former's dual cross-attention (Swetha et al., ECCV 2024): the fusion of the Q-Former's query
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
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from pargo_jax.models.attention import attention
from pargo_jax.models.layers import Dense
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
