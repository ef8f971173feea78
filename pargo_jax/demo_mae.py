"""The X-Former demo's MAE, pretrained on the demo's first run (options: the config's ``demo_mae``).

X-Former fuses a frozen CLIP-like tower with a frozen masked autoencoder; real presets load a released
MAE (``facebook/vit-mae-*``). This stands in for that pretraining at demo scale, as
:mod:`pargo_jax.demo_tower` does for the tower: a tiny MAE learns to reconstruct the masked patches of
the shapes scenes (drawn on the fly by :func:`pargo_jax.demo_tower.scenes`, deterministic in the seed,
normalized with ImageNet's mean / std as X-Former feeds its MAE), then it is written as a Hugging Face
``ViTMAEForPreTraining`` directory (:func:`pargo_jax.convert.hf_mae.save_mae`), which the demo loads
like any HF MAE. The demo's first run builds it at ``config.model.detail.path``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from data_pipelines.frame import IMAGENET_MEAN, IMAGENET_STD
from pargo_jax.demo_tower import ensure as _ensure
from pargo_jax.demo_tower import scenes, write_into_place
from pargo_jax.models.mae import MAE, NORM_PIX_EPS, MAEConfig, patchify

# Encoder as the demo tower (8x8 patches, width 64, 2 blocks); a 1-block decoder of width 64 (a
# second block did no better in 1200 steps). Raw-pixel targets: see mae_config.
SHAPE = dict(
    patch_size=8, width=64, depth=2, heads=4, mlp_dim=128, decoder_width=64, decoder_depth=1,
    decoder_heads=4, decoder_mlp_dim=128, norm_pix_loss=False,
)  # fmt: skip


def mae_config(image_size: int = 64) -> MAEConfig:
    """The demo MAE: a ViT of the demo tower's shape (64 px: 64 patches of 8x8) and a 1-block decoder,
    reconstructing raw (ImageNet-normalized) pixels, not ``norm_pix_loss`` (each target patch
    normalized by its own mean and variance, as the released MAEs): most patches of the shapes scenes
    are flat, and normalized they keep only their colour's per-channel pattern, brightness and contrast
    gone. Measured in 1200 steps: raw pixels reach 0.34 against 0.38 for the visible patches' mean
    colour (norm_pix: 0.277 against 0.284, barely better), and a linear probe of the encoder's tokens
    names the colour of 54% of the object tokens (norm_pix: 44%; a random encoder: 40%)."""
    return MAEConfig(image_size=image_size, layer_norm_eps=1e-6, **SHAPE)


def normalize(images: np.ndarray | jax.Array) -> jax.Array:
    """uint8 images (B, H, W, 3) -> the MAE's input: ImageNet's mean / std (X-Former's default)."""
    x = jnp.asarray(images, jnp.float32) / 255.0
    return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def targets(pixels: jax.Array, cfg: MAEConfig) -> jax.Array:
    """What the MAE predicts per patch (B, L, patch_dim): the pixels, or with ``norm_pix_loss`` the
    patch normalized by its own mean and variance (as :func:`pargo_jax.models.mae.reconstruction_loss`)."""
    t = patchify(pixels.astype(jnp.float32), cfg.patch_size)
    if cfg.norm_pix_loss:
        t = (t - t.mean(-1, keepdims=True)) / jnp.sqrt(t.var(-1, keepdims=True, ddof=1) + NORM_PIX_EPS)
    return t


def baselines(pixels: jax.Array, mask: jax.Array, cfg: MAEConfig) -> dict[str, jax.Array]:
    """Reconstruction losses (mean squared error over the removed patches) of trivial predictions:
    ``zeros``; ``visible mean``, each image's mean colour over its kept patches; ``patch mean``, each
    removed patch's own mean colour (an oracle: it knows the patch, but not its edges)."""
    t = targets(pixels, cfg)
    b, n, _ = t.shape
    colours = t.reshape(b, n, -1, cfg.num_channels)  # (B, L, p*p, C): pixels in a patch, channels last
    kept = jnp.broadcast_to((1.0 - mask)[:, :, None, None], colours.shape[:3] + (1,))
    visible = (colours * kept).sum((1, 2), keepdims=True) / kept.sum((1, 2), keepdims=True)
    guesses = {
        "zeros": jnp.zeros_like(colours),
        "visible mean": jnp.broadcast_to(visible, colours.shape),
        "patch mean": jnp.broadcast_to(colours.mean(2, keepdims=True), colours.shape),
    }
    loss = lambda g: (((g - colours) ** 2).mean((2, 3)) * mask).sum() / mask.sum()
    return {k: loss(g) for k, g in guesses.items()}


def pretrain(
    cfg: MAEConfig,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    mask_ratio: float = 0.5,
    log=print,
) -> dict:
    """The MAE's params after ``steps`` of reconstructing a random ``mask_ratio`` of the patches of
    shapes scenes drawn on the fly (AdamW, warmup + cosine). Logs progress and, at the end, the
    held-out reconstruction loss beside :func:`baselines`'."""
    cfg = cfg.replace(mask_ratio=mask_ratio)
    model = MAE(cfg)
    x0 = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels))
    key = jax.random.key(seed)
    params = nn.unbox(model.init(key, x0, jnp.zeros((1, cfg.num_patches)))["params"])
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 5), steps)
    tx = optax.adamw(schedule, b2=0.95, weight_decay=0.05)
    opt = tx.init(params)

    def loss_fn(p, images, noise):
        return model.apply({"params": p}, normalize(images), noise).loss

    @jax.jit
    def step(p, o, images, i):
        noise = jax.random.uniform(jax.random.fold_in(key, i), (images.shape[0], cfg.num_patches))
        loss, grads = jax.value_and_grad(loss_fn)(p, images, noise)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    t0 = time.perf_counter()
    for i in range(steps):
        images, _ = scenes(batch_size, i, seed, cfg)
        params, opt, loss = step(params, opt, images, i)
        if (i + 1) % max(1, steps // 10) == 0 or i + 1 == steps:
            seconds = time.perf_counter() - t0
            log(f"demo MAE {i + 1}/{steps} | loss {loss:.4f} | {seconds:.0f} s")
    losses = held_out(params, cfg, seed)
    trivial = ", ".join(f"{k} {v:.4f}" for k, v in losses.items() if k != "loss")
    log(f"demo MAE: held-out reconstruction loss {losses['loss']:.4f} (predicting {trivial})")
    return jax.device_get(params)


def held_out(params: dict, cfg: MAEConfig, seed: int = 0, batch: int = 256) -> dict[str, float]:
    """``{"loss": ...}`` on held-out scenes (fixed masks), beside :func:`baselines`' on the same ones."""
    images, _ = scenes(batch, -1, seed + 1, cfg)
    noise = jax.random.uniform(jax.random.key(seed + 1), (batch, cfg.num_patches))

    @jax.jit
    def losses(p, images, noise):
        pixels = normalize(images)
        out = MAE(cfg).apply({"params": p}, pixels, noise)
        return {"loss": out.loss, **baselines(pixels, out.mask, cfg)}

    return {k: float(v) for k, v in losses(params, images, noise).items()}


# build()'s defaults: ~1 min on 2 CPU cores; held-out loss 0.28 against 0.38 for the image's visible
# mean colour and 2.09 for zeros (an oracle that knows each removed patch's mean colour: 0.17).
OPTIONS = dict(steps=2000, batch_size=32, lr=2e-3, seed=0, mask_ratio=0.5)


def build(out: str, *, image_size: int = 64, log=print, **options) -> str:
    """Pretrains the MAE (``options``: :func:`pretrain`'s over :data:`OPTIONS`, as the config's
    ``demo_mae`` section holds them) and writes its HF ``ViTMAEForPreTraining`` directory (its
    ``mask_ratio`` the one it learned with) into place at ``out``: written beside it and renamed, so
    concurrent builders leave one whole copy."""
    from pargo_jax.convert.hf_mae import save_mae

    options = {**OPTIONS, **options}
    cfg = mae_config(image_size).replace(mask_ratio=options["mask_ratio"])
    params = pretrain(cfg, log=log, **options)
    return write_into_place(out, lambda tmp: save_mae(tmp, params, cfg), ".demo_mae_")


def ensure(out: str, **options) -> bool:
    """Builds the demo MAE at ``out`` unless it is there, built with the same options (see
    :func:`pargo_jax.demo_tower.ensure`); returns whether it built."""
    return _ensure(out, build, **options)
