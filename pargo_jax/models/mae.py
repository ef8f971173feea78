"""Masked autoencoder (MAE, He et al. 2021), laid out as HF ``ViTMAEForPreTraining``.

The encoder embeds the patches, adds fixed 2-D sin-cos position embeddings, keeps a random
``1 - mask_ratio`` of the patches (per-sample argsort of uniform noise), prepends the CLS token and
runs pre-LN ViT blocks (:class:`pargo_jax.models.vision.Block`) and a final LayerNorm. The decoder
projects the kept tokens, fills the removed positions with a learned mask token, restores the patch
order, adds its own sin-cos embeddings, runs its blocks, norms and predicts each patch's pixels.
The loss is the mean squared error per patch, averaged over the removed patches; with
``norm_pix_loss`` the target patch is ``(x - mean) / sqrt(var + 1e-6)`` (unbiased variance).

Input: pixels (B, H, W, C) NHWC, H == W == ``image_size``. Patches are raster-ordered and flattened
as (row in patch, column in patch, channel), as HF's ``patchify``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from pargo_jax.models.layers import KERNEL_INIT, Dense, sincos_2d
from pargo_jax.models.vision import VisionConfig, _layer_norm, _p, block_stack, patch_embed

NORM_PIX_EPS = 1e-6


@dataclass(frozen=True)
class MAEConfig:
    """Shape and options of an MAE (defaults: HF ``ViTMAEConfig``, i.e. ViT-B/16 with an 8-block,
    512-wide decoder). ``act``: the MLP activation (a :class:`VisionConfig` ``act``)."""

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_dim: int = 2048
    layer_norm_eps: float = 1e-12
    act: str = "gelu"
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    def __post_init__(self):
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {self.mask_ratio}.")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}."
            )
        for name in ("width", "decoder_width"):
            if getattr(self, name) % 4:
                raise ValueError(
                    f"{name} {getattr(self, name)} must be divisible by 4 (2-D sin-cos embedding)."
                )
        _ = (self.encoder, self.decoder)  # building both block configs validates heads and act

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def len_keep(self) -> int:
        """Patches the encoder sees: ``int(num_patches * (1 - mask_ratio))``, as MAE."""
        return int(self.num_patches * (1 - self.mask_ratio))

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.num_channels

    def _blocks(self, width: int, depth: int, heads: int, mlp_dim: int) -> VisionConfig:
        return VisionConfig(
            image_size=self.image_size, patch_size=self.patch_size, width=width, depth=depth, heads=heads,
            mlp_dim=mlp_dim, layer_norm_eps=self.layer_norm_eps, act=self.act, dtype=self.dtype,
            param_dtype=self.param_dtype, remat=self.remat,
        )  # fmt: skip

    @property
    def encoder(self) -> VisionConfig:
        """The encoder blocks' config (pre-LN, q/k/v biases, plain MLP)."""
        return self._blocks(self.width, self.depth, self.heads, self.mlp_dim)

    @property
    def decoder(self) -> VisionConfig:
        return self._blocks(self.decoder_width, self.decoder_depth, self.decoder_heads, self.decoder_mlp_dim)

    def replace(self, **changes) -> MAEConfig:
        return dataclasses.replace(self, **changes)


@flax.struct.dataclass
class MAEOutput:
    """``loss`` (), ``logits`` (B, L, patch_dim) predicted patches, ``mask`` (B, L) 1 = removed,
    ``ids_restore`` (B, L) each patch's rank in the shuffle, ``latent`` (B, 1 + len_keep, width)."""

    loss: jax.Array
    logits: jax.Array
    mask: jax.Array
    ids_restore: jax.Array
    latent: jax.Array


def sincos_pos_embed(grid: int, dim: int) -> np.ndarray:
    """Fixed MAE position embeddings (1 + grid**2, dim) float32: a zero CLS row, then per patch in
    raster order :func:`~pargo_jax.models.layers.sincos_2d` with its halves swapped (the column's
    sin-cos first: the released checkpoints' layout)."""
    table = np.roll(sincos_2d(grid, grid, dim), dim // 2, axis=1)
    return np.concatenate([np.zeros((1, dim), np.float32), table])


def random_masking(x: jax.Array, noise: jax.Array, len_keep: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keeps the ``len_keep`` tokens of ``x`` (B, L, D) with the smallest ``noise`` (B, L).

    Returns (kept (B, len_keep, D) in noise order, mask (B, L) float32 with 1 = removed,
    ids_restore (B, L) = ``argsort(argsort(noise))``, which gathers the shuffled order back)."""
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    kept = jnp.take_along_axis(x, ids_shuffle[:, :len_keep, None], axis=1)
    return kept, (ids_restore >= len_keep).astype(jnp.float32), ids_restore


def patchify(pixels: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/p * W/p, p * p * C), raster patches flattened as (row, column, channel)."""
    b, h, w, c = pixels.shape
    p = patch_size
    x = pixels.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def reconstruction_loss(logits: jax.Array, pixels: jax.Array, mask: jax.Array, cfg: MAEConfig) -> jax.Array:
    """Mean over removed patches of the per-patch mean squared error (float32)."""
    target = patchify(pixels.astype(jnp.float32), cfg.patch_size)
    if cfg.norm_pix_loss:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1)
        target = (target - mean) / jnp.sqrt(var + NORM_PIX_EPS)
    per_patch = jnp.mean((logits.astype(jnp.float32) - target) ** 2, axis=-1)
    return jnp.sum(per_patch * mask) / jnp.sum(mask)


class MAEEncoder(nn.Module):
    """pixels (B, H, W, C), noise (B, L) -> (latent (B, 1 + len_keep, width), mask, ids_restore).

    ``noise=None`` keeps every patch in raster order (latent (B, 1 + L, width), mask all 0): the
    whole image's features, as a model that only reads them wants.
    Params: ``patch_embed`` (Conv), ``cls_token`` (width,), ``blocks`` (stacked), ``norm``."""

    config: MAEConfig

    @nn.compact
    def __call__(self, pixels: jax.Array, noise: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg, vc = self.config, self.config.encoder
        b = pixels.shape[0]
        x = patch_embed(vc)(pixels.astype(cfg.dtype)).reshape(b, cfg.num_patches, cfg.width)
        pos = jnp.asarray(sincos_pos_embed(cfg.grid, cfg.width), x.dtype)
        if noise is None:
            x, mask = x + pos[1:], jnp.zeros((b, cfg.num_patches), jnp.float32)
            ids_restore = jnp.broadcast_to(jnp.arange(cfg.num_patches), (b, cfg.num_patches))
        else:
            x, mask, ids_restore = random_masking(x + pos[1:], noise, cfg.len_keep)
        cls = self.param("cls_token", _p(KERNEL_INIT, "embed"), (cfg.width,), cfg.param_dtype)
        cls = jnp.broadcast_to(cls.astype(x.dtype) + pos[0], (b, 1, cfg.width))
        x = nn.with_logical_constraint(jnp.concatenate([cls, x], axis=1), ("batch", "length", "act_embed"))
        x, _ = block_stack(vc, cfg.depth, "blocks")(x, None)
        return _layer_norm(vc, "norm")(x), mask, ids_restore


class MAEDecoder(nn.Module):
    """latent (B, 1 + len_keep, width), ids_restore (B, L) -> predicted patches (B, L, patch_dim).

    ``embedded=True``: ``latent`` is already in the decoder's width (B, 1 + len_keep, decoder_width)
    and skips ``embed`` (X-Former feeds its fused tokens so).
    Params: ``embed``, ``mask_token`` (decoder_width,), ``blocks`` (stacked), ``norm``, ``pred``."""

    config: MAEConfig

    @nn.compact
    def __call__(self, latent: jax.Array, ids_restore: jax.Array, embedded: bool = False) -> jax.Array:
        cfg, vc = self.config, self.config.decoder
        d = cfg.decoder_width
        embed = Dense((d,), ("embed", None), dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="embed")
        x = latent.astype(cfg.dtype) if embedded else embed(latent)
        b, n = x.shape[:2]
        token = self.param("mask_token", _p(KERNEL_INIT, None), (d,), cfg.param_dtype)
        fill = jnp.broadcast_to(token.astype(x.dtype), (b, cfg.num_patches + 1 - n, d))
        patches = jnp.take_along_axis(
            jnp.concatenate([x[:, 1:], fill], axis=1), ids_restore[..., None], axis=1
        )
        x = jnp.concatenate([x[:, :1], patches], axis=1) + jnp.asarray(sincos_pos_embed(cfg.grid, d), x.dtype)
        x, _ = block_stack(vc, cfg.decoder_depth, "blocks")(x, None)
        x = _layer_norm(vc, "norm")(x)
        pred = Dense(
            (cfg.patch_dim,), (None, None), dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="pred"
        )
        return pred(x[:, 1:])


class MAE(nn.Module):
    """``ViTMAEForPreTraining``: pixels (B, H, W, C) [, noise (B, L)] -> :class:`MAEOutput`.

    Without ``noise`` it is drawn uniformly from the ``"masking"`` rng stream. :meth:`encode` and
    :meth:`decode` run the halves alone (X-Former reads the encoder and feeds the decoder)."""

    config: MAEConfig

    def setup(self):
        self.encoder = MAEEncoder(self.config)
        self.decoder = MAEDecoder(self.config)

    def _check(self, pixels: jax.Array) -> None:
        cfg = self.config
        if pixels.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(
                f"MAE expects {cfg.image_size}x{cfg.image_size}x{cfg.num_channels} images (NHWC), got "
                f"{'x'.join(map(str, pixels.shape[1:]))}."
            )

    def noise(self, batch: int) -> jax.Array:
        """Uniform per-patch noise (batch, L) from the ``"masking"`` rng stream."""
        return jax.random.uniform(self.make_rng("masking"), (batch, self.config.num_patches))

    def encode(self, pixels: jax.Array, noise: jax.Array | None = None):
        """:class:`MAEEncoder`: (latent, mask, ids_restore); ``noise=None`` keeps every patch."""
        self._check(pixels)
        return self.encoder(pixels, noise)

    def decode(self, latent: jax.Array, ids_restore: jax.Array, embedded: bool = False) -> jax.Array:
        """:class:`MAEDecoder`: predicted patches (B, L, patch_dim)."""
        return self.decoder(latent, ids_restore, embedded)

    def __call__(self, pixels: jax.Array, noise: jax.Array | None = None) -> MAEOutput:
        cfg = self.config
        self._check(pixels)
        if noise is None:
            noise = self.noise(pixels.shape[0])
        elif noise.shape != (pixels.shape[0], cfg.num_patches):
            raise ValueError(
                f"noise must have shape {(pixels.shape[0], cfg.num_patches)}, got {noise.shape}."
            )
        latent, mask, ids_restore = self.encoder(pixels, noise)
        logits = self.decoder(latent, ids_restore)
        loss = reconstruction_loss(logits, pixels, mask, cfg)
        return MAEOutput(loss=loss, logits=logits, mask=mask, ids_restore=ids_restore, latent=latent)
