"""The BLIP-2 Q-Former with its text branch (LAVIS ``Blip2Qformer``; HF ``Blip2ForImageTextRetrieval``).

One BERT (post-LN, LayerNorm eps 1e-12, exact GELU) runs over ``[queries, text]``: the self-attention
of every layer is shared by the learned queries and the text tokens, every ``cross_attention_freq``-th
layer (0, f, 2f, ...) adds cross-attention to the image features for the query positions only, and
the feed-forward is separate for queries (``query_fc*``, LAVIS ``intermediate_query`` /
``output_query``) and text (``text_fc*``, ``intermediate`` / ``output``)::

    f = LayerNorm_1e-5(features)                                   # ln_vision (HF vision post_layernorm)
    x = LayerNorm([queries ; word_emb[ids] + pos_emb[:T]])         # queries get no position
    per layer:  x = LN(x + SelfAttn(x, mask))                      # mask: masks.qformer_mask
                x[:Q] = LN(x[:Q] + CrossAttn(x[:Q], f))            # cross layers only
                x = [LN(x + FFN_query(x))[:Q] ; LN(x + FFN_text(x))[Q:]]

The passes of stage 1 (image-text contrastive, matching and generation) and the stage-2 projector:

* :meth:`QFormer.encode_image`: queries only (no text, no mask) -> (B, Q, H).
* :meth:`QFormer.encode_text`: text only, bidirectional over the real tokens -> (B, T, H).
* :meth:`QFormer.encode_pairs`: queries + text, bidirectional -> (B, Q+T, H) (ITM).
* :meth:`QFormer.text_logits`: queries + text under the ``"generate"`` mask, the LM head on the text
  positions -> (B, T, V) (ITG). LAVIS runs the text with the query pass's cached keys / values, which
  is the same function: queries never see text.
* heads: :meth:`image_feats` / :meth:`text_feat` (ITC projections, not normalized),
  :meth:`itm_logits`, :meth:`temperature` (the learnable ITC temperature, 0.07 at init).
* ``__call__``: the projector face, ``encode_image`` then ``llm_proj`` -> (B, Q, llm_width) (HF
  ``language_projection``).

Every parameter is created in ``setup``, so ``init`` through any method (the projector face included)
gives the complete tree, the same in stage 1 and stage 2. Layers differ (cross-attention on some
only), so each has its own params (``layer_{i}/...``), not a stacked axis. Parameter layout
(H hidden, C vision width, M mlp_dim, V vocab, E embed_dim, D llm_width)::

    ln_vision_{scale,bias} (C)   query_tokens (Q, H)   word_embeddings (V, H)   position_embeddings (P, H)
    embed_norm_{scale,bias} (H)
    layer_{i}/self_qkv_{kernel (3, H, H), bias (3, H)}  self_out_{kernel, bias}  self_norm_{scale, bias}
             cross_q_*  cross_kv_{kernel (2, C, H), bias (2, H)}  cross_out_*  cross_norm_*   (cross layers)
             query_fc1_* (H, M)  query_fc2_* (M, H)  query_ffn_norm_*
             text_fc1_* (H, M)   text_fc2_* (M, H)   text_ffn_norm_*
    vision_proj_* (H, E)  text_proj_* (H, E)  itm_head_* (H, 2)  temp ()
    lm_dense_* (H, H)  lm_norm_*  lm_bias (V)   (LM head; decoder = word_embeddings^T, tied)
    llm_proj_* (H, D)

Dropout (``dropout``, BERT's hidden dropout: embeddings and each residual branch) applies when
``deterministic=False``; attention-probability dropout is not modelled.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from pargo_jax.models import masks
from pargo_jax.models.attention import attention
from pargo_jax.models.projectors.common import ProjectorModule, check_width, layer_norm

Dtype = jnp.dtype | str


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """Shape of a BLIP-2 Q-Former (defaults: BLIP-2 with EVA-CLIP ViT-g and OPT-2.7B, BERT-base with
    the ``[DEC]`` token added to bert-base-uncased's 30522)."""

    num_queries: int = 32
    hidden: int = 768
    heads: int = 12
    layers: int = 12
    mlp_dim: int = 3072
    cross_attention_freq: int = 2
    vision_width: int = 1408
    llm_width: int = 2560
    vocab_size: int = 30523
    max_positions: int = 512
    embed_dim: int = 256
    eps: float = 1e-12
    vision_eps: float = 1e-5
    dropout: float = 0.0
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"

    def __post_init__(self):
        sizes = ("num_queries", "hidden", "heads", "layers", "mlp_dim", "cross_attention_freq",
                 "vision_width", "llm_width", "vocab_size", "max_positions", "embed_dim")  # fmt: skip
        bad = [f"{k}={getattr(self, k)!r}" for k in sizes if not _positive_int(getattr(self, k))]
        if bad:
            raise ValueError(f"QFormerConfig needs positive integers: {', '.join(bad)}.")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}.")
        if not (self.eps > 0 and self.vision_eps > 0):
            raise ValueError(f"eps={self.eps} and vision_eps={self.vision_eps} must be positive.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} is not in [0, 1).")

    def has_cross_attention(self, layer: int) -> bool:
        """Whether ``layer`` cross-attends to the image (LAVIS / HF: ``layer % freq == 0``)."""
        return layer % self.cross_attention_freq == 0

    def check_text_length(self, length: int) -> None:
        """One clear error for a text longer than the position table."""
        if length > self.max_positions:
            raise ValueError(
                f"The text has {length} tokens but the Q-Former has max_positions={self.max_positions} "
                "position embeddings; truncate it (LAVIS: max_txt_len=32)."
            )

    def num_tokens(self, num_patches: int) -> int:
        """Image tokens handed to the LLM: one per query, whatever the number of patches."""
        del num_patches
        return self.num_queries

    def flops(self, num_patches: int) -> float:
        """Forward FLOPs of the projector face on one image's ``num_patches`` features: per layer the
        query self-attention (q/k/v/out, scores and mix) and FFN; per cross layer the cross q/out, the
        keys/values of all patches and the cross scores and mix; then the projection to the LLM."""
        q, n, h, cv = self.num_queries, num_patches, self.hidden, self.vision_width
        self_layer = 2 * q * h * 4 * h + 2 * 2 * q * q * h + 2 * 2 * q * h * self.mlp_dim
        cross = 2 * q * h * 2 * h + 2 * n * cv * 2 * h + 2 * 2 * q * n * h
        num_cross = sum(self.has_cross_attention(i) for i in range(self.layers))
        return float(self.layers * self_layer + num_cross * cross + 2 * q * h * self.llm_width)


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


class QFormerLayer(ProjectorModule):
    """One BERT layer over ``[queries (first num_queries positions), text]``."""

    config: QFormerConfig
    cross: bool = False

    def setup(self):
        c = self.config
        h, m, cv = c.hidden, c.mlp_dim, c.vision_width
        self.self_qkv = self._dense_params("self_qkv", (3, h, h), (None, "embed", "heads"))
        self.self_out = self._dense_params("self_out", (h, h), ("heads", "embed"))
        self.self_norm = self._norm("self_norm", (h,), ("norm",))
        if self.cross:
            self.cross_q = self._dense_params("cross_q", (h, h), ("embed", "heads"))
            self.cross_kv = self._dense_params("cross_kv", (2, cv, h), (None, "embed", "heads"))
            self.cross_out = self._dense_params("cross_out", (h, h), ("heads", "embed"))
            self.cross_norm = self._norm("cross_norm", (h,), ("norm",))
        self.query_ffn = (
            self._dense_params("query_fc1", (h, m), ("embed", "mlp")),
            self._dense_params("query_fc2", (m, h), ("mlp", "embed")),
            self._norm("query_ffn_norm", (h,), ("norm",)),
        )
        self.text_ffn = (
            self._dense_params("text_fc1", (h, m), ("embed", "mlp")),
            self._dense_params("text_fc2", (m, h), ("mlp", "embed")),
            self._norm("text_ffn_norm", (h,), ("norm",)),
        )
        self.drop = nn.Dropout(c.dropout)

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.config.heads, -1)

    def _residual_norm(self, x, update, dense, norm, deterministic):
        """Post-LN residual: ``LN(x + dropout(update @ W + b))``."""
        y = self.drop(update @ dense[0] + dense[1], deterministic=deterministic)
        return layer_norm(x + y, *norm, self.config.eps)

    def _ffn(self, x, ffn, deterministic):
        fc1, fc2, norm = ffn
        y = nn.gelu(x @ fc1[0] + fc1[1], approximate=False)
        return self._residual_norm(x, y, fc2, norm, deterministic)

    def __call__(self, x, image, mask, num_queries: int, deterministic: bool = True):
        """``x`` (B, Q+T, H) with the queries first; ``image`` (B, N, C) layer-normed features (None
        when there are no queries); ``mask`` broadcastable to (B, heads, Q+T, Q+T) or None."""
        b, n, h = x.shape
        kernel, bias = self.self_qkv
        qkv = x @ jnp.transpose(kernel, (1, 0, 2)).reshape(h, 3 * h) + bias.reshape(-1)
        q, k, v = (self._heads(t) for t in jnp.split(qkv, 3, axis=-1))
        a = attention(q, k, v, mask).reshape(b, n, h)
        x = self._residual_norm(x, a, self.self_out, self.self_norm, deterministic)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        parts = []
        if num_queries:
            if self.cross:
                kv_kernel, kv_bias = self.cross_kv
                ck, cv = (self._heads(image @ kv_kernel[i] + kv_bias[i]) for i in range(2))
                cq = self._heads(queries @ self.cross_q[0] + self.cross_q[1])
                a = attention(cq, ck, cv).reshape(queries.shape)
                queries = self._residual_norm(queries, a, self.cross_out, self.cross_norm, deterministic)
            parts.append(self._ffn(queries, self.query_ffn, deterministic))
        if n > num_queries:
            parts.append(self._ffn(text, self.text_ffn, deterministic))
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


class QFormer(ProjectorModule):
    """The BLIP-2 Q-Former: stage-1 passes and heads, and the stage-2 projector face
    ``features (B, N, C) -> tokens (B, Q, llm_width)``."""

    config: QFormerConfig

    def setup(self):
        c = self.config
        h = c.hidden
        normal = nn.initializers.normal(0.02)
        self.ln_vision = self._norm("ln_vision", (c.vision_width,), ("norm",))
        self.query_tokens = self._param("query_tokens", (c.num_queries, h), ("queries", "embed"), normal)
        self.word_embeddings = self._param("word_embeddings", (c.vocab_size, h), ("vocab", "embed"), normal)
        self.position_embeddings = self._param(
            "position_embeddings", (c.max_positions, h), (None, "embed"), normal
        )
        self.embed_norm = self._norm("embed_norm", (h,), ("norm",))
        self.layers = [
            QFormerLayer(c, cross=c.has_cross_attention(i), name=f"layer_{i}") for i in range(c.layers)
        ]
        self.vision_proj = self._dense_params("vision_proj", (h, c.embed_dim), ("embed", None))
        self.text_proj = self._dense_params("text_proj", (h, c.embed_dim), ("embed", None))
        self.itm_head = self._dense_params("itm_head", (h, 2), ("embed", None))
        self.temp = self.param(
            "temp", nn.with_logical_partitioning(nn.initializers.constant(0.07), ()), (), c.param_dtype
        )
        self.lm_dense = self._dense_params("lm_dense", (h, h), ("embed", "mlp"))
        self.lm_norm = self._norm("lm_norm", (h,), ("norm",))
        self.lm_bias = self._param("lm_bias", (c.vocab_size,), ("vocab",), nn.initializers.zeros)
        self.llm_proj = self._dense_params("llm_proj", (h, c.llm_width), ("embed", "mlp"))
        self.drop = nn.Dropout(c.dropout)

    # --- inputs -----------------------------------------------------------------------------------
    def _image(self, features: jax.Array) -> jax.Array:
        """``ln_vision(features)``: the keys / values of every cross-attention."""
        check_width(features, self.config.vision_width)
        return layer_norm(features.astype(self.config.dtype), *self.ln_vision, self.config.vision_eps)

    def _queries(self, batch: int) -> jax.Array:
        return jnp.broadcast_to(self.query_tokens, (batch, *self.query_tokens.shape))

    def _text(self, input_ids: jax.Array) -> jax.Array:
        """Word + position embeddings (B, T, H); positions count from 0 also after the queries."""
        self.config.check_text_length(input_ids.shape[1])
        words = jnp.take(self.word_embeddings, input_ids, axis=0)
        return words + self.position_embeddings[: input_ids.shape[1]]

    def _encode(self, x, image, mask, num_queries: int, deterministic: bool) -> jax.Array:
        x = self.drop(layer_norm(x, *self.embed_norm, self.config.eps), deterministic=deterministic)
        for layer in self.layers:
            x = layer(x, image, mask, num_queries, deterministic)
        return x

    # --- the stage-1 passes -----------------------------------------------------------------------
    def encode_image(self, features: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Image features (B, N, C) -> query outputs (B, Q, H): queries only, cross-attending."""
        image, q = self._image(features), self.config.num_queries
        return self._encode(self._queries(image.shape[0]), image, None, q, deterministic)

    def encode_text(self, input_ids: jax.Array, text_mask: jax.Array, *, deterministic: bool = True):
        """Text (B, T) with its padding mask (B, T) -> (B, T, H): text only, bidirectional over the
        real tokens, no cross-attention (BLIP-2's ITC text encoder; [CLS] at position 0)."""
        mask = masks.qformer_mask(0, text_mask, "pairs")
        return self._encode(self._text(input_ids), None, mask, 0, deterministic)

    def _joint(self, features, input_ids, text_mask, mode: str, deterministic: bool) -> jax.Array:
        image = self._image(features)
        if image.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{image.shape[0]} images but {input_ids.shape[0]} texts: pass one per image.")
        q = self.config.num_queries
        x = jnp.concatenate([self._queries(image.shape[0]), self._text(input_ids)], axis=1)
        return self._encode(x, image, masks.qformer_mask(q, text_mask, mode), q, deterministic)

    def encode_pairs(self, features, input_ids, text_mask, *, deterministic: bool = True) -> jax.Array:
        """Image-text matching pass -> (B, Q+T, H): queries and text attend to each other (text
        padding masked); the query positions cross-attend to ``features``."""
        return self._joint(features, input_ids, text_mask, "pairs", deterministic)

    def text_logits(self, features, input_ids, text_mask, *, deterministic: bool = True) -> jax.Array:
        """Image-grounded generation pass -> LM logits (B, T, V) of the text positions (unshifted:
        position t predicts token t+1). Queries see queries only; text token t sees every query and
        the real text tokens <= t."""
        h = self._joint(features, input_ids, text_mask, "generate", deterministic)
        return self.lm_logits(h[:, self.config.num_queries :])

    # --- heads ------------------------------------------------------------------------------------
    def lm_logits(self, h: jax.Array) -> jax.Array:
        """LAVIS ``BertLMHeadModel.cls.predictions``: dense, exact GELU, LayerNorm, then the tied
        word embeddings plus ``lm_bias``: (..., H) -> (..., V)."""
        y = nn.gelu(h @ self.lm_dense[0] + self.lm_dense[1], approximate=False)
        y = layer_norm(y, *self.lm_norm, self.config.eps)
        return y @ self.word_embeddings.T + self.lm_bias

    def image_feats(self, z: jax.Array) -> jax.Array:
        """ITC image features (B, Q, E) of the query outputs ``z`` (B, Q, H); not normalized."""
        return z @ self.vision_proj[0] + self.vision_proj[1]

    def text_feat(self, h: jax.Array) -> jax.Array:
        """ITC text feature (B, E) of the [CLS] (position 0) of ``h`` (B, T, H); not normalized."""
        return h[:, 0] @ self.text_proj[0] + self.text_proj[1]

    def itm_logits(self, h: jax.Array) -> jax.Array:
        """Match / no-match logits (B, 2): the ITM head averaged over the query positions of the
        :meth:`encode_pairs` output ``h`` (B, Q+T, H) (LAVIS: index 1 = match)."""
        q = self.config.num_queries
        return (h[:, :q] @ self.itm_head[0] + self.itm_head[1]).mean(axis=1)

    def temperature(self) -> jax.Array:
        """The learnable ITC temperature () in float32 (LAVIS ``temp``; clamp it in the loss)."""
        return jnp.asarray(self.temp, jnp.float32)

    # --- stage 2 ----------------------------------------------------------------------------------
    def project(self, z: jax.Array) -> jax.Array:
        """Query outputs (B, Q, H) -> LLM tokens (B, Q, llm_width) (HF ``language_projection``)."""
        return z @ self.llm_proj[0] + self.llm_proj[1]

    def __call__(self, features: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """The projector face: features (B, N, C) -> LLM tokens (B, Q, llm_width)."""
        return self.project(self.encode_image(features, deterministic=deterministic))
