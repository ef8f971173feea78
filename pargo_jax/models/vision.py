"""ViT vision towers: SigLIP, CLIP, EVA02-CLIP and BLIP-2's EVA-CLIP ViT-g, one transformer block
shared by all.

Layouts follow the checkpoints we import (``pargo_jax.convert.hf_vision``):

  siglip  HF ``SiglipVisionModel``: patch conv (+bias) + learned pos emb; pre-LN blocks, gelu-tanh MLP;
          ``post_layernorm`` on ``last_hidden_state``.
  clip    HF ``CLIPVisionModel``: patch conv (no bias), CLS token + pos emb, ``pre_layrnorm``; pre-LN
          blocks, quick_gelu MLP. HF applies ``post_layernorm`` to the pooled CLS only, so
          ``last_hidden_state`` (our default output) has no final norm.
  eva02   timm ``eva02_large_patch14_clip_336``: patch conv (+bias), CLS + abs pos emb, 2D RoPE on the
          patch tokens (not CLS), q/v bias without k bias, LayerNorm on the attention output before
          ``proj`` (``scale_attn_inner``), SwiGLU MLP with a LayerNorm before ``fc2`` (``scale_mlp``);
          final ``norm``.
  blip2   HF ``Blip2VisionModel`` (LAVIS ``eva_vit_g``: EVA-CLIP ViT-g/14 without its last block):
          patch conv (+bias), CLS + pos emb, no pre-norm; pre-LN blocks, fused qkv with q/v biases
          (the k slice of HF's ``qkv.bias`` is zero and loads as a zero k bias: a constant key bias
          shifts every logit of a query equally, so softmax ignores it), exact gelu MLP. Its
          ``post_layernorm`` is the Q-Former's ``ln_vision``, so no final norm here by default.

Input: pixels (B, H, W, 3) NHWC, normalized as the checkpoint expects, H == W == ``image_size``.
Output: (B, tokens, width); by default identical to the HF ``last_hidden_state`` (timm
``forward_features`` for EVA02). ``feature_layer`` picks an earlier block output (HF
``hidden_states[feature_layer]``, index 0 = embeddings); only the blocks needed are built and run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from pargo_jax.models.attention import attention, check_implementation
from pargo_jax.models.layers import KERNEL_INIT, Dense

KINDS = ("siglip", "clip", "eva02", "blip2")
_ACTS = ("gelu_tanh", "gelu", "quick_gelu", "swiglu")
_DEFAULT_ACT = {"siglip": "gelu_tanh", "clip": "quick_gelu", "eva02": "swiglu", "blip2": "gelu"}


@dataclass(frozen=True)
class VisionConfig:
    """Shape and options of a vision tower.

    Structure options (set by presets / the importer): ``act`` ("" = the kind's default: siglip
    gelu_tanh, clip quick_gelu, eva02 swiglu, blip2 gelu), ``attn_norm`` / ``mlp_norm`` (EVA02
    sub-LNs), ``rope_ref_grid`` (EVA02 RoPE reference grid, timm ``ref_feat_shape``).
    Output options: ``feature_layer`` (HF ``hidden_states`` index; -1 last block, -2 penultimate as
    LLaVA), ``final_norm`` (None = as HF/timm: the tower's final norm only on the last block's output
    and never for CLIP tokens nor BLIP-2's, whose ``post_layernorm`` is the Q-Former's ``ln_vision``;
    True/False forces it), ``drop_cls`` (drop the CLS token of clip/eva02/blip2).
    Numerics: ``dtype`` (compute), ``param_dtype``; ``remat`` rematerializes each block;
    ``attention_impl`` the attention kernel (None: cuDNN's on a GPU in bf16 / fp16 where the head size
    allows, else XLA's; "xla"; "cudnn").
    """

    kind: str = "siglip"
    image_size: int = 384
    patch_size: int = 14
    width: int = 1152
    depth: int = 27
    heads: int = 16
    mlp_dim: int = 4304
    layer_norm_eps: float = 1e-6
    act: str = ""
    attn_norm: bool = False
    mlp_norm: bool = False
    rope_ref_grid: int = 16
    feature_layer: int = -1
    final_norm: bool | None = None
    drop_cls: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    attention_impl: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Unknown vision kind {self.kind!r}; supported: {KINDS}.")
        if self.act and self.act not in _ACTS:
            raise ValueError(f"Unknown activation {self.act!r}; supported: {_ACTS}.")
        if self.heads < 1 or self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}.")
        check_implementation(self.attention_impl)
        if not -(self.depth + 1) <= self.feature_layer <= self.depth:
            raise ValueError(
                f"feature_layer {self.feature_layer} is out of range for depth {self.depth}: use "
                f"{-(self.depth + 1)}..{self.depth} (HF hidden_states index)."
            )

    # --- derived structure --------------------------------------------------------------------
    @property
    def activation(self) -> str:
        return self.act or _DEFAULT_ACT[self.kind]

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def class_token(self) -> bool:
        return self.kind in ("clip", "eva02", "blip2")

    @property
    def num_prefix(self) -> int:
        return int(self.class_token)

    @property
    def num_positions(self) -> int:
        return self.grid**2 + self.num_prefix

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def patch_bias(self) -> bool:
        return self.kind != "clip"

    @property
    def pre_norm(self) -> bool:
        return self.kind == "clip"

    @property
    def k_bias(self) -> bool:
        return self.kind != "eva02"

    @property
    def rope(self) -> bool:
        return self.kind == "eva02"

    @property
    def num_blocks(self) -> int:
        """Blocks actually built and run: those up to ``feature_layer``."""
        return self.feature_layer % (self.depth + 1)

    @property
    def apply_final_norm(self) -> bool:
        if self.final_norm is not None:
            return self.final_norm
        return self.kind not in ("clip", "blip2") and self.num_blocks == self.depth

    @property
    def num_tokens(self) -> int:
        """Tokens in the output."""
        return self.grid**2 + (0 if self.drop_cls else self.num_prefix)

    def replace(self, **changes) -> VisionConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, VisionConfig] = {
    "siglip-so400m-patch14-384": VisionConfig(
        kind="siglip",
        image_size=384,
        patch_size=14,
        width=1152,
        depth=27,
        heads=16,
        mlp_dim=4304,
        layer_norm_eps=1e-6,
    ),
    "clip-vit-large-patch14-336": VisionConfig(
        kind="clip",
        image_size=336,
        patch_size=14,
        width=1024,
        depth=24,
        heads=16,
        mlp_dim=4096,
        layer_norm_eps=1e-5,
    ),
    "eva02-large-patch14-clip-336": VisionConfig(
        kind="eva02",
        image_size=336,
        patch_size=14,
        width=1024,
        depth=24,
        heads=16,
        mlp_dim=2730,
        layer_norm_eps=1e-6,
        attn_norm=True,
        mlp_norm=True,
        rope_ref_grid=16,
    ),
    "tiny": VisionConfig(
        kind="siglip",
        image_size=32,
        patch_size=8,
        width=32,
        depth=2,
        heads=4,
        mlp_dim=64,
    ),
}
PRESETS["so400m-384"] = PRESETS["siglip-so400m-patch14-384"]
PRESETS["clip-L/14-336"] = PRESETS["clip-vit-large-patch14-336"]
PRESETS["eva02-L/14-336"] = PRESETS["eva02-large-patch14-clip-336"]


def vision_preset(name: str, **overrides) -> VisionConfig:
    """A named :class:`VisionConfig` with field overrides, e.g. ``vision_preset("tiny", kind="clip")``.

    For ``tiny`` with ``kind="eva02"`` the EVA02 sub-norms are switched on unless given."""
    if name not in PRESETS:
        raise ValueError(f"Unknown vision preset {name!r}; available: {sorted(PRESETS)}.")
    if name == "tiny" and overrides.get("kind") == "eva02":
        overrides = {"attn_norm": True, "mlp_norm": True, **overrides}
    return PRESETS[name].replace(**overrides)


# --- building blocks -------------------------------------------------------------------------------
def _p(init: Callable, *names: str | None) -> Callable:
    return nn.with_logical_partitioning(init, names)


def _layer_norm(cfg: VisionConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        name=name,
        scale_init=_p(nn.initializers.ones, "norm"),
        bias_init=_p(nn.initializers.zeros, "norm"),
    )


def _dense(cfg: VisionConfig, features, names, name: str, contract: int = 1, use_bias: bool = True):
    features = features if isinstance(features, tuple) else (features,)
    return Dense(features, names, contract, use_bias, cfg.dtype, cfg.param_dtype, name=name)


def rope_tables(cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """EVA02 2D RoPE (timm ``RotaryEmbeddingCat(head_dim, in_pixels=False, feat_shape=grid,
    ref_feat_shape=(r, r))``): (sin, cos), each (grid*grid, head_dim), raster order.

    Bands ``10000 ** -(k / (head_dim/4))``; positions ``arange(grid) / grid * r``; channels are
    [row bands, column bands], each repeated twice (interleaved pairs)."""
    n_bands = cfg.head_dim // 4
    bands = 1.0 / (10000.0 ** (np.arange(n_bands, dtype=np.float32) / n_bands))
    t = np.arange(cfg.grid, dtype=np.float32) / cfg.grid * cfg.rope_ref_grid
    rows, cols = np.meshgrid(t, t, indexing="ij")
    grid = np.stack([rows, cols], axis=-1)[..., None] * bands  # (G, G, 2, n_bands)
    pos = grid.reshape(cfg.grid**2, 2 * n_bands)
    return np.repeat(np.sin(pos), 2, axis=-1), np.repeat(np.cos(pos), 2, axis=-1)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """x (B, N, H, D) * cos + rot(x) * sin with interleaved pairs: rot([x0, x1, ...]) = [-x1, x0, ...]."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rot = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return x * cos[:, None, :] + rot * sin[:, None, :]


class Attention(nn.Module):
    """Multi-head self-attention (no mask); optional EVA02 RoPE on non-prefix tokens and inner LN."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None) -> jax.Array:
        cfg = self.config
        hd = (cfg.heads, cfg.head_dim)
        names = ("embed", "heads", "head_dim")
        q = _dense(cfg, hd, names, "q")(x)
        k = _dense(cfg, hd, names, "k", use_bias=cfg.k_bias)(x)
        v = _dense(cfg, hd, names, "v")(x)
        if rope is not None:
            sin, cos = rope
            p = cfg.num_prefix
            rot = lambda t: jnp.concatenate(
                [t[:, :p], apply_rope(t[:, p:].astype(jnp.float32), sin, cos).astype(t.dtype)], axis=1
            )
            q, k = rot(q), rot(k)
        out = attention(q, k, v, implementation=cfg.attention_impl)
        if cfg.attn_norm:
            b, n = out.shape[:2]
            out = _layer_norm(cfg, "norm")(out.reshape(b, n, cfg.width)).reshape(b, n, *hd)
        return _dense(cfg, cfg.width, ("heads", "head_dim", "embed"), "out", contract=2)(out)


class Mlp(nn.Module):
    """fc1 -> act -> fc2, or SwiGLU: silu(gate(x)) * up(x) -> [LayerNorm] -> down."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        act = cfg.activation
        if act == "swiglu":
            h = nn.silu(_dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "gate")(x))
            h = h * _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "up")(x)
            if cfg.mlp_norm:
                h = _layer_norm(cfg, "norm")(h)
            return _dense(cfg, cfg.width, ("mlp", "embed"), "down")(h)
        h = _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "fc1")(x)
        if act == "quick_gelu":
            h = h * jax.nn.sigmoid(1.702 * h)
        else:
            h = jax.nn.gelu(h, approximate=act == "gelu_tanh")
        return _dense(cfg, cfg.width, ("mlp", "embed"), "fc2")(h)


class Block(nn.Module):
    """Pre-LN transformer block shared by every tower (scan body: returns ``(x, None)``)."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x: jax.Array, rope) -> tuple[jax.Array, None]:
        cfg = self.config
        x = x + Attention(cfg, name="attn")(_layer_norm(cfg, "norm1")(x), rope)
        x = x + Mlp(cfg, name="mlp")(_layer_norm(cfg, "norm2")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, None


def patch_embed(cfg: VisionConfig) -> nn.Module:
    """The patch embedding ``patch_embed``: a ``patch_size`` stride convolution to ``width`` channels;
    call it inside a compact method on (B, H, W, C) pixels."""
    return nn.Conv(
        cfg.width,
        (cfg.patch_size,) * 2,
        strides=(cfg.patch_size,) * 2,
        padding="VALID",
        use_bias=cfg.patch_bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=_p(KERNEL_INIT, None, None, "conv", "embed"),  # flax: no repeated names
        bias_init=_p(nn.initializers.zeros, "embed"),
        name="patch_embed",
    )


def block_stack(cfg: VisionConfig, length: int, name: str) -> nn.Module:
    """``length`` :class:`Block` s scanned under ``name`` (params stacked along a leading ``layers``
    axis; rematerialized with ``cfg.remat``); call it inside a compact method as ``(x, rope)``."""
    block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
    return nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,),
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, name=name)


class VisionTower(nn.Module):
    """SigLIP / CLIP / EVA02 ViT: pixels (B, H, W, 3) -> features (B, tokens, width).

    Params: ``patch_embed`` (Conv), ``cls_token`` (width,), ``pos_embed`` (positions, width),
    ``pre_norm`` (clip), ``blocks`` (stacked along a leading ``layers`` axis of length
    ``config.num_blocks``), ``final_norm`` (when applied)."""

    config: VisionConfig

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.config
        b, h, w, c = pixels.shape
        if (h, w) != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"Vision tower expects {cfg.image_size}x{cfg.image_size} images, got {h}x{w}; resize the "
                "input or set image_size."
            )
        x = patch_embed(cfg)(pixels.astype(cfg.dtype)).reshape(b, cfg.grid**2, cfg.width)
        if cfg.class_token:
            cls = self.param("cls_token", _p(KERNEL_INIT, "embed"), (cfg.width,), cfg.param_dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, cfg.width)), x], axis=1)
        pos = self.param(
            "pos_embed", _p(KERNEL_INIT, None, "embed"), (cfg.num_positions, cfg.width), cfg.param_dtype
        )
        x = x + pos.astype(x.dtype)[None]
        if cfg.pre_norm:
            x = _layer_norm(cfg, "pre_norm")(x)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

        if cfg.num_blocks:
            rope = None
            if cfg.rope:
                sin, cos = rope_tables(cfg)
                rope = (jnp.asarray(sin), jnp.asarray(cos))
            x, _ = block_stack(cfg, cfg.num_blocks, "blocks")(x, rope)

        if cfg.apply_final_norm:
            x = _layer_norm(cfg, "final_norm")(x)
        if cfg.drop_cls and cfg.class_token:
            x = x[:, cfg.num_prefix :]
        return x
