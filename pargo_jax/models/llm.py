"""Decoder-only LLMs: the Llama family (Llama 2/3/3.1, SmolLM2), Qwen2/2.5, InternLM2 (whose fused
``wqkv`` is split into q/k/v at load time, see ``pargo_jax.convert.hf``) and OPT (the frozen LLM of
BLIP-2 / X-Former).

One block: ``x + Attn(RMSNorm(x))`` then ``x + SwiGLU(RMSNorm(x))``, grouped-query attention with
rotary embeddings (HF "rotate half" layout, optional llama3 frequency scaling), optional q/k/v biases
(Qwen2), optional tied input/output embeddings (SmolLM2). OPT swaps in, by :class:`LLMConfig` fields:
LayerNorm with bias (``norm="layer"``), a learned absolute position table instead of RoPE
(``position_embedding="learned"``, row ``position + position_offset``), biases on every projection
(``qkv_bias``, ``bias``) and a ReLU feed-forward ``fc2(relu(fc1(x)))`` (``mlp="relu"``).

Decoding uses an explicit cache pytree (:class:`KVCache`): ``logits, cache = model.apply(v, ids,
attention_mask=m, cache=cache)`` writes the new keys/values at ``cache.index`` and advances it. Cache
slots are in time order; ``cache.mask`` marks which slots hold real (non-pad) tokens, so a left-padded
prompt and its continuation attend exactly like the unpadded sequence. Positions are derived from the
masks: ``position = (#real tokens before this one)``, i.e. ``cumsum(mask) - 1`` over cache + input.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from pargo_jax.models.attention import attention, check_implementation
from pargo_jax.models.layers import Dense
from pargo_jax.models.masks import segment_mask, segment_positions

Dtype = Any


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 ("llama3") rotary frequency scaling."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Architecture + numerics of a decoder LLM. ``dtype`` is the compute dtype, ``param_dtype`` the
    storage dtype of the parameters."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6  # the epsilon of every norm, LayerNorm too when norm="layer"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    # One fused q/k/v projection in InternLM2's ``wqkv`` layout (per kv head: its q heads, k, v), so a
    # LoRA adapter on ``attn/qkv`` is one adapter over all three, as the ParGo release trains it.
    fused_qkv: bool = False
    max_position_embeddings: int = 4096
    scan_layers: bool = False
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # None: auto (cuDNN's fused kernel where attention.choose_implementation allows it, else XLA) |
    # "xla" | "cudnn" (an error where cuDNN cannot take the call)
    attention_impl: str | None = None
    # LoRA adapters on every projection whose module path matches ``lora_targets`` (see :func:`proj`).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = ""
    # OPT's architecture: "rms" | "layer" (LayerNorm with scale and bias) norms; "rope" | "learned" (an
    # ``embed_positions`` table of max_position_embeddings + position_offset rows, added to the input
    # embeddings at row position + position_offset) positions; "swiglu" (gate / up / down) | "relu"
    # (fc1 / fc2) feed-forward; ``bias``: biases on attn/o and the feed-forward projections.
    norm: str = "rms"
    position_embedding: str = "rope"
    position_offset: int = 0
    mlp: str = "swiglu"
    bias: bool = False
    family: str = "llama"  # the checkpoint layout it came from / exports to: llama, qwen2, internlm2, opt

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}."
            )
        check_implementation(self.attention_impl)
        if self.remat_policy not in ("none", "full") and not hasattr(
            jax.checkpoint_policies, self.remat_policy
        ):
            raise ValueError(
                f"remat_policy={self.remat_policy!r} is neither 'none', 'full' nor a "
                "jax.checkpoint_policies name (e.g. 'dots_with_no_batch_dims_saveable')."
            )
        if self.lora_rank < 0 or (self.lora_rank > 0 and not self.lora_targets):
            raise ValueError(
                f"lora_rank={self.lora_rank} needs a rank >= 0 and, when > 0, a lora_targets regex "
                "(e.g. '.*attn/(q|k|v|o)')."
            )
        if self.lora_targets:
            re.compile(self.lora_targets)
        choices = dict(norm=("rms", "layer"), position_embedding=("rope", "learned"), mlp=("swiglu", "relu"))
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field}={getattr(self, field)!r}; use one of {allowed}.")
        if self.position_offset < 0 or (self.position_offset and self.position_embedding != "learned"):
            raise ValueError(
                f"position_offset={self.position_offset} needs position_embedding='learned' and must be >= 0."
            )


class KVCache(NamedTuple):
    """Decoding state. ``k``/``v``: (layers, batch, max_length, kv_heads, head_dim); ``mask``: (batch,
    max_length) bool, True where a slot holds a real token; ``index``: () int32, next slot to write."""

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array


def init_cache(config: LLMConfig, batch_size: int, max_length: int, dtype: Dtype | None = None) -> KVCache:
    """An empty cache for ``batch_size`` sequences of up to ``max_length`` tokens (prompt included)."""
    if max_length > config.max_position_embeddings:
        raise ValueError(
            f"Cache length {max_length} exceeds max_position_embeddings="
            f"{config.max_position_embeddings}; shorten the prompt or max_new_tokens."
        )
    shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
    dtype = dtype or config.dtype
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        mask=jnp.zeros((batch_size, max_length), bool),
        index=jnp.zeros((), jnp.int32),
    )


def rope_inv_freq(config: LLMConfig) -> np.ndarray:
    """Rotary inverse frequencies (head_dim // 2,), float32, with llama3 scaling when configured."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF "rotate half" RoPE on (B, T, H, D) with cos/sin (B, T, D)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rot = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, :, None, :].astype(x.dtype) + rot * sin[:, :, None, :].astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled in the compute dtype (as HF Llama)."""

    eps: float
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with scale and bias, normalized in float32, scaled in the compute dtype (OPT)."""

    eps: float
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape, names = (x.shape[-1],), ("norm",)
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, names), shape, self.param_dtype
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, names), shape, self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(self.dtype) + bias.astype(self.dtype)


def norm(config: LLMConfig, name: str) -> nn.Module:
    """The LLM's norm (``config.norm``): :class:`RMSNorm` or :class:`LayerNorm`."""
    cls = LayerNorm if config.norm == "layer" else RMSNorm
    return cls(config.rms_norm_eps, config.dtype, config.param_dtype, name=name)


def proj(
    config: LLMConfig,
    features: tuple[int, ...],
    in_axes: int,
    names: tuple[str, ...],
    name: str,
    use_bias: bool = False,
) -> Dense:
    """A :class:`~pargo_jax.models.layers.Dense` in the LLM's numerics, with LoRA adapters where
    ``config.lora_targets`` matches its path (e.g. ``layers_3/attn/q``, or ``layers/attn/q`` under
    ``scan_layers``)."""
    c = config
    return Dense(
        features, names, in_axes, use_bias, c.dtype, c.param_dtype,
        lora_rank=c.lora_rank, lora_alpha=c.lora_alpha, lora_targets=c.lora_targets, name=name,
    )  # fmt: skip


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE (none when ``cos`` is None: learned positions). ``kv`` is
    None or the full stacked (k, v) cache, updated in place at (``layer``, slot ``index``) so that no
    per-step copy of the cache is needed."""

    config: LLMConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv, layer, index):
        c = self.config
        hd = (c.num_heads, c.head_dim)
        kvd = (c.num_kv_heads, c.head_dim)
        qn, kvn = ("heads", "head_dim"), ("kv_heads", "head_dim")
        if c.fused_qkv:
            g = c.num_heads // c.num_kv_heads
            fused = (c.num_kv_heads, g + 2, c.head_dim)
            qkv = proj(c, fused, 1, ("embed", "kv_heads", None, "head_dim"), "qkv", c.qkv_bias)(x)
            q = qkv[..., :g, :].reshape(*qkv.shape[:-3], *hd)  # query head h belongs to kv head h // g
            k, v = qkv[..., g, :], qkv[..., g + 1, :]
        else:
            q = proj(c, hd, 1, ("embed", *qn), "q", c.qkv_bias)(x)
            k = proj(c, kvd, 1, ("embed", *kvn), "k", c.qkv_bias)(x)
            v = proj(c, kvd, 1, ("embed", *kvn), "v", c.qkv_bias)(x)
        if cos is not None:
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", None))
        if kv is not None:
            k_all, v_all = kv
            start = (layer, 0, index, 0, 0)
            k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
            v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
            kv = (k_all, v_all)
            k, v = k_all[layer], v_all[layer]
        k = nn.with_logical_constraint(k, ("batch", "length", "act_heads", None))
        v = nn.with_logical_constraint(v, ("batch", "length", "act_heads", None))
        # Without a cache the mask is padding only and causality is structural (cuDNN skips the masked
        # upper triangle); with one, the mask holds both (query slots start at the cache index).
        out = attention(
            q, k.astype(q.dtype), v.astype(q.dtype), mask, causal=kv is None, implementation=c.attention_impl
        )
        out = proj(c, (c.hidden_size,), 2, ("heads", "head_dim", "embed"), "o", c.bias)(out)
        return out, kv


class MLP(nn.Module):
    """Feed-forward: SwiGLU ``down(silu(gate(x)) * up(x))`` or (``mlp="relu"``) ``fc2(relu(fc1(x)))``."""

    config: LLMConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        up = lambda name: proj(c, (c.intermediate_size,), 1, ("embed", "mlp"), name, c.bias)(x)
        swiglu = c.mlp == "swiglu"
        h = nn.silu(up("gate")) * up("up") if swiglu else nn.relu(up("fc1"))
        h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
        return proj(c, (c.hidden_size,), 1, ("mlp", "embed"), "down" if swiglu else "fc2", c.bias)(h)


class DecoderLayer(nn.Module):
    """Pre-norm block with an nn.scan-compatible signature: ``carry = (hidden, full cache (k, v) or
    None, layer index)`` -> ``(carry, None)``."""

    config: LLMConfig

    @nn.compact
    def __call__(self, carry, cos, sin, mask, index):
        x, kv, layer = carry
        c = self.config
        h, kv = Attention(c, name="attn")(norm(c, "input_norm")(x), cos, sin, mask, kv, layer, index)
        x = x + h
        x = x + MLP(c, name="mlp")(norm(c, "post_attn_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return (x, kv, layer + 1), None


def unscanned(config: LLMConfig, params: dict[str, Any]) -> tuple[LLMConfig, dict[str, Any]]:
    """The same model with one weight buffer per layer (``layers_i``) instead of the ``scan_layers``
    stack: what decoding wants, since a scanned step slices every layer's weights out of the stack
    anew for every token. ``params`` is the LLM's unboxed tree; unscanned input is returned as is."""
    if not config.scan_layers:
        return config, params
    params = dict(params)
    stack = params.pop("layers")
    for i in range(config.num_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stack)
    return dataclasses.replace(config, scan_layers=False), params


def _layer_class(config: LLMConfig):
    if config.remat_policy == "none":
        return DecoderLayer
    policy = None if config.remat_policy == "full" else getattr(jax.checkpoint_policies, config.remat_policy)
    return nn.remat(DecoderLayer, policy=policy, prevent_cse=not config.scan_layers)


class CausalLM(nn.Module):
    """Decoder LLM. Params: ``embed_tokens``, ``embed_positions`` (learned positions only),
    ``layers_{i}`` (or ``layers`` stacked on a leading axis when ``scan_layers``), ``norm``,
    ``lm_head`` (absent when embeddings are tied)."""

    config: LLMConfig

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        if c.scan_layers:
            self.layers = nn.scan(
                _layer_class(c),
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, name="layers")
        else:
            cls = _layer_class(c)
            self.blocks = [cls(c, name=f"layers_{i}") for i in range(c.num_layers)]
        if c.position_embedding == "learned":
            self.embed_positions = nn.Embed(
                c.max_position_embeddings + c.position_offset,
                c.hidden_size,
                dtype=c.dtype,
                param_dtype=c.param_dtype,
                embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
            )
        self.norm = norm(c, "norm")
        if not c.tie_word_embeddings:
            self.lm_head = proj(c, (c.vocab_size,), 1, ("embed", "vocab"), "lm_head")

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings (B, T, hidden) in the compute dtype."""
        return self.embed_tokens(input_ids)

    def output_kernel(self) -> jax.Array:
        """The (D, V) matrix in the compute dtype that turns final hidden states into logits: the
        tied embedding's transpose or ``lm_head``'s kernel."""
        c = self.config
        if c.tie_word_embeddings:
            return jnp.asarray(self.embed_tokens.embedding, c.dtype).T
        head = self.lm_head.variables["params"]
        if "lora_a" in head:
            raise ValueError(
                "A chunked loss needs lm_head without a LoRA adapter; drop it from lora_targets."
            )
        return nn.meta.unbox(head["kernel"]).astype(c.dtype)

    def init_cache(self, batch_size: int, max_length: int, dtype: Dtype | None = None) -> KVCache:
        """See :func:`init_cache` (needs no variables: call it on the unbound module)."""
        return init_cache(self.config, batch_size, max_length, dtype)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        last_logits_only: bool = False,
        hidden_only: bool = False,
        segment_ids: jax.Array | None = None,
    ):
        """Logits (B, T, V) (or (B, 1, V) with ``last_logits_only``); with ``cache``, returns
        ``(logits, new_cache)``. ``attention_mask`` (B, T): 1 = real token, 0 = padding.
        ``hidden_only``: the final-norm hidden states (B, T, D) instead, whose logits are their product
        with :meth:`output_kernel` (for a loss that never holds all the logits). ``segment_ids`` (B, T)
        (packed rows, no cache): sample k >= 1 of a row, 0 = padding; each sample gets its own
        positions (:func:`~pargo_jax.models.masks.segment_positions`) and attends only within itself
        (:func:`~pargo_jax.models.masks.segment_mask`), exactly as unpacked."""
        c = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) are for training: decode without them.")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(c.dtype)
        b, t = x.shape[:2]
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if cache is None:
            kv_mask, index, past = mask, jnp.zeros((), jnp.int32), jnp.zeros((b, 1), jnp.int32)
        else:
            kv_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, cache.index))
            index, past = cache.index, cache.mask.sum(-1, keepdims=True, dtype=jnp.int32)
        if positions is None and segment_ids is not None:
            positions = segment_positions(segment_ids, mask)
        elif positions is None:
            positions = jnp.maximum(past + jnp.cumsum(mask, -1, dtype=jnp.int32) - 1, 0)
        if c.position_embedding == "learned":  # OPT: inputs_embeds get their positions here too
            x, cos, sin = x + self.embed_positions(positions + c.position_offset), None, None
        else:
            freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(c))
            emb = jnp.concatenate([freqs, freqs], -1)
            cos, sin = jnp.cos(emb), jnp.sin(emb)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        # Without a cache: padding only (B, 1, 1, S), or with segment ids the samples' blocks (B, 1, T, T);
        # the attention core adds causality. With one: the slots up to each query's own (T, S) too.
        attn_mask = kv_mask[:, None, None, :]
        if segment_ids is not None:
            attn_mask = segment_mask(segment_ids, mask)
        elif cache is not None:
            q_slot = index + jnp.arange(t)
            causal = jnp.arange(kv_mask.shape[1])[None, :] <= q_slot[:, None]  # (T, S)
            attn_mask = causal[None, None] & attn_mask  # (B, 1, T, S)

        carry = (x, None if cache is None else (cache.k, cache.v), jnp.zeros((), jnp.int32))
        for blk in [self.layers] if c.scan_layers else self.blocks:
            carry, _ = blk(carry, cos, sin, attn_mask, index)
        x, kv, _ = carry
        if last_logits_only:
            x = x[:, -1:]
        x = self.norm(x)
        if hidden_only and cache is None:
            return x
        logits = self.embed_tokens.attend(x) if c.tie_word_embeddings else self.lm_head(x)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        if cache is None:
            return logits
        return logits, KVCache(kv[0], kv[1], kv_mask, index + t)
