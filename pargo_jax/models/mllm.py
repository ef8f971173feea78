"""VisionLanguageModel: vision tower -> projector -> image tokens spliced into the text -> LLM.

The input pipeline expands each ``<image>`` placeholder into exactly ``num_image_tokens`` copies of
the image token id, so splicing is a static-shape scatter: the k-th image-token position of a sample
receives the k-th projector output of that sample (images concatenated in order when a sample has
several). Param tree: ``{"vision_tower": ..., "projector": ..., "llm": ...}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from data_pipelines.frame import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from pargo_jax.models import blip2_objectives as objectives
from pargo_jax.models import regions
from pargo_jax.models.convnext import ConvNeXt, ConvNeXtConfig
from pargo_jax.models.fusion import DualPathFusion, FusionConfig
from pargo_jax.models.llm import CausalLM, LLMConfig
from pargo_jax.models.mae import MAE, MAEConfig, reconstruction_loss
from pargo_jax.models.projectors import projector_module
from pargo_jax.models.vision import VisionConfig, VisionTower


@dataclasses.dataclass(frozen=True)
class HighResConfig:
    """MG-LLaVA's second path: a high-res ConvNeXt fused into the tower's tokens, and object tokens.

    The model's input is the high-res image (``tower.image_size``); the vision tower sees its
    bilinear downsample (align_corners=False, as MG-LLaVA's ``F.interpolate``). ``max_boxes`` > 0 adds
    that many object tokens after the image tokens: each box (x1, y1, x2, y2 in input pixels) is
    :func:`regions.roi_align_mean` over the ConvNeXt pyramid, then Linear -> GELU -> Linear to the LLM
    width; the input pipeline masks the slots of absent boxes out of attention."""

    tower: ConvNeXtConfig
    fusion: FusionConfig
    max_boxes: int = 0
    roi_output: int = 56
    roi_grid: int = 192


@dataclasses.dataclass(frozen=True)
class DetailConfig:
    """X-Former's second tower: a masked autoencoder (frozen) whose encoder reads the image with its
    own pixel ``mean`` / ``std`` at its own size; the projector (``xformer``) fuses its tokens. Stage 1
    masks ``mae.mask_ratio`` of the patches and reconstructs them through the MAE's decoder; otherwise
    the encoder sees every patch."""

    mae: MAEConfig
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class MLLMConfig:
    vision: VisionConfig
    projector: Any  # a registered projector config (see pargo_jax.models.projectors)
    llm: LLMConfig
    image_token_id: int
    # normalize uint8 images on device; the factory passes config.input.mean / std
    pixel_mean: tuple[float, float, float] = CLIP_MEAN
    pixel_std: tuple[float, float, float] = CLIP_STD
    high_res: HighResConfig | None = None  # MG-LLaVA's ConvNeXt path (None: one tower)
    detail: DetailConfig | None = None  # X-Former's MAE (None: none)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image handed to the LLM (MG-LLaVA: + ``max_boxes`` object-token slots)."""
        boxes = self.high_res.max_boxes if self.high_res else 0
        return self.projector.num_tokens(self.vision.num_tokens) + boxes

    @property
    def image_size(self) -> int:
        """Side of the model's input images."""
        return self.high_res.tower.image_size if self.high_res else self.vision.image_size


def splice_image_tokens(
    text_embeds: jax.Array, image_tokens: jax.Array, input_ids: jax.Array, image_token_id: int
) -> jax.Array:
    """Replaces the embeddings at image-token positions, in order, by ``image_tokens`` (B, M, D)."""
    is_image = input_ids == image_token_id
    order = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_tokens.shape[1] - 1)
    gathered = jnp.take_along_axis(image_tokens.astype(text_embeds.dtype), order[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered, text_embeds)


class BoxProjector(nn.Module):
    """MG-LLaVA's box projector (xtuner's ProjectorModel, depth 2): Linear -> GELU -> Linear."""

    width: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda name, axes: nn.Dense(
            self.width, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]),
        )  # fmt: skip
        return dense("fc2", ("mlp", "embed"))(nn.gelu(dense("fc1", ("embed", "mlp"))(x), approximate=False))


class VisionLanguageModel(nn.Module):
    config: MLLMConfig

    def setup(self):
        c = self.config
        self.vision_tower = VisionTower(c.vision)
        self.projector = projector_module(c.projector)
        self.llm = CausalLM(c.llm)
        if c.high_res:
            self.high_res_tower = ConvNeXt(c.high_res.tower)
            self.fusion = DualPathFusion(c.high_res.fusion)
            if c.high_res.max_boxes:
                self.box_projector = BoxProjector(c.llm.hidden_size, c.llm.dtype, c.llm.param_dtype)
        if c.detail:
            self.detail_tower = MAE(c.detail.mae)

    def normalized(self, images: jax.Array) -> jax.Array:
        """uint8 pixels normalized with the model's mean / std (on device); float images as they are."""
        if images.dtype != jnp.uint8:
            return images
        mean, std = jnp.asarray(self.config.pixel_mean), jnp.asarray(self.config.pixel_std)
        return (images.astype(jnp.float32) / 255.0 - mean) / std

    def detail_pixels(self, images: jax.Array) -> jax.Array:
        """Normalized images (B, H, W, 3) -> the MAE's input: its own mean / std, its size (bilinear)."""
        c = self.config
        mean, std = jnp.asarray(c.pixel_mean), jnp.asarray(c.pixel_std)
        pixels = images.astype(jnp.float32) * std + mean
        pixels = (pixels - jnp.asarray(c.detail.mean)) / jnp.asarray(c.detail.std)
        size = c.detail.mae.image_size
        if pixels.shape[1:3] != (size, size):
            pixels = jax.image.resize(pixels, (pixels.shape[0], size, size, 3), "bilinear", antialias=False)
        return pixels

    def encode_images(
        self, images: jax.Array, deterministic: bool = True, boxes: jax.Array | None = None
    ) -> jax.Array:
        """images (B, H, W, 3) or (B, I, H, W, 3) -> image tokens (B, I * T_img, D_llm), image by image.
        Float images are taken as normalized; uint8 pixels are normalized here, on device
        (``input.normalize=False``). MG-LLaVA (``high_res``): ``boxes`` (B, max_boxes, 4), or (B, I,
        max_boxes, 4) with I images per sample, in input pixels; each image's T_img tokens are its
        projector tokens then its object tokens."""
        images = self.normalized(images)
        if images.ndim == 4:
            images, boxes = images[:, None], None if boxes is None else boxes[:, None]
        if boxes is not None and (boxes.ndim != 4 or boxes.shape[:2] != images.shape[:2]):
            raise ValueError(f"boxes {boxes.shape} do not match images {images.shape} (B, I, ...).")
        b, n = images.shape[:2]
        flat = images.reshape(b * n, *images.shape[2:])
        flat_boxes = None if boxes is None else boxes.reshape(b * n, *boxes.shape[2:])
        if self.config.high_res:
            tokens = self._encode_two_paths(flat, deterministic, flat_boxes)
        else:
            tokens = self._encode_one_path(flat, deterministic)
        return tokens.reshape(b, n * tokens.shape[1], tokens.shape[2])

    def _encode_one_path(self, images, deterministic):
        """Normalized images (N, H, W, 3) -> the projector's tokens (N, T_img, D_llm)."""
        features = self.vision_tower(images)
        if not self.config.detail:
            return self.projector(features, deterministic=deterministic)
        pixels = self.detail_pixels(images)  # X-Former: the MAE's tokens of the whole image
        if self.is_initializing():  # create the decoder's params too
            self.detail_tower(pixels, jnp.zeros((images.shape[0], self.config.detail.mae.num_patches)))
        detail, _, _ = self.detail_tower.encode(pixels)
        return self.projector(features, deterministic=deterministic, detail=detail)

    def _encode_two_paths(self, images, deterministic, boxes):
        """MG-LLaVA: normalized images (N, H, W, 3), boxes (N, max_boxes, 4) -> (N, T_img, D_llm)."""
        return self.high_res_tokens(**self.high_res_inputs(images, boxes), deterministic=deterministic)

    def high_res_inputs(self, images: jax.Array, boxes: jax.Array | None = None) -> dict[str, jax.Array]:
        """MG-LLaVA's frozen half: normalized images (N, H, W, 3) and boxes (N, max_boxes, 4) -> the
        tower's tokens of the bilinear downsample (``features``), the ConvNeXt's last map (``high_res``)
        and, with ``max_boxes``, each box's RoIAlign over the ConvNeXt pyramid (``box_features``)."""
        c = self.config
        b, size = images.shape[0], c.vision.image_size
        low = jax.image.resize(images, (b, size, size, 3), "bilinear", antialias=False)
        maps = self.high_res_tower(images)
        out = {"features": self.vision_tower(low), "high_res": maps[-1]}
        if not c.high_res.max_boxes:
            return out
        if boxes is None:
            raise ValueError(
                f"This model takes {c.high_res.max_boxes} boxes per image: pass boxes (B, M, 4)."
            )
        h = c.high_res
        out["box_features"] = regions.roi_align_mean(maps, boxes, image_size=h.tower.image_size,
                                                     output_size=h.roi_output, grid=h.roi_grid)  # fmt: skip
        return out

    def high_res_tokens(
        self, features: jax.Array, high_res: jax.Array, box_features: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:  # fmt: skip
        """MG-LLaVA's trained half, on :meth:`high_res_inputs`: the Conv-Gate's fusion through the
        projector, then the object tokens (N, T_img, D_llm)."""
        tokens = self.projector(self.fusion(features, high_res), deterministic=deterministic)
        if box_features is None:
            return tokens
        return jnp.concatenate([tokens, self.box_projector(box_features).astype(tokens.dtype)], axis=1)

    def stage1_losses(
        self, images: jax.Array, text_ids: jax.Array, text_mask: jax.Array, *, bos_id: int,
        deterministic: bool = False,
    ) -> dict[str, jax.Array]:  # fmt: skip
        """BLIP-2's stage-1 losses of a ``blip2`` / ``xformer`` projector on images (B, H, W, 3) and their
        captions' Q-Former tokens (B, T): ``itc``, ``itm``, ``itg`` (see
        :mod:`pargo_jax.models.blip2_objectives`) and, with the MAE (X-Former), ``recon``: the masked
        patches reconstructed from the fused tokens through the MAE decoder. The LLM is not run. Rng
        streams: ``negatives`` (ITM), ``masking`` (MAE), ``dropout``."""
        c = self.config
        images = self.normalized(images)
        xformer = c.detail is not None
        qformer = self.projector.qformer if xformer else self.projector
        features = self.vision_tower(images)
        z = qformer.encode_image(features, deterministic=deterministic)
        losses = {}
        if xformer:
            pixels = self.detail_pixels(images)
            latent, mask, ids_restore = self.detail_tower.encode(
                pixels, self.detail_tower.noise(images.shape[0])
            )
            z, fused = self.projector.fuse(z, latent)
            pred = self.detail_tower.decode(
                self.projector.fusion.to_decoder(fused), ids_restore, embedded=True
            )
            losses["recon"] = reconstruction_loss(pred, pixels, mask, c.detail.mae)
        text = qformer.encode_text(text_ids, text_mask, deterministic=deterministic)
        sim = objectives.itc_similarity(
            qformer.image_feats(z), qformer.text_feat(text), qformer.temperature()
        )
        losses["itc"] = objectives.itc_loss(sim)
        neg_text, neg_image = objectives.hard_negatives(sim, self.make_rng("negatives"))
        image_idx, text_idx, labels = objectives.itm_pairs(neg_text, neg_image)
        pairs = qformer.encode_pairs(
            features[image_idx], text_ids[text_idx], text_mask[text_idx], deterministic=deterministic
        )
        queries = pairs[:, : qformer.config.num_queries]
        if xformer:  # the matching pass's query outputs fused with their image's MAE tokens
            queries, _ = self.projector.fuse(queries, latent[image_idx])
        losses["itm"] = objectives.itm_loss(qformer.itm_logits(queries), labels)
        dec = objectives.itg_input_ids(text_ids, bos_id)
        logits = qformer.text_logits(features, dec, text_mask, deterministic=deterministic)
        losses["itg"] = objectives.itg_loss(logits, dec, text_mask)
        return losses

    def embed_inputs(self, images, input_ids, deterministic: bool = True, boxes=None) -> jax.Array:
        """Text embeddings with the image tokens spliced in: (B, T, D_llm)."""
        text = self.llm.embed(input_ids)
        image_tokens = self.encode_images(images, deterministic, boxes)
        return splice_image_tokens(text, image_tokens, input_ids, self.config.image_token_id)

    def __call__(
        self, images, input_ids, attention_mask, *, deterministic: bool = True, hidden_only: bool = False,
        boxes: jax.Array | None = None, segment_ids: jax.Array | None = None,
    ) -> jax.Array:  # fmt: skip
        """Logits (B, T, V); ``hidden_only``: the LLM's final hidden states (B, T, D) instead (see
        :func:`chunked_next_token_loss`); ``boxes``: MG-LLaVA's object boxes; ``segment_ids`` (B, T):
        packed rows (see :class:`~pargo_jax.models.llm.CausalLM`), whose images (B, I, H, W, 3) are
        the row's in the order of their image tokens."""
        embeds = self.embed_inputs(images, input_ids, deterministic, boxes)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, hidden_only=hidden_only,
                        segment_ids=segment_ids)  # fmt: skip

    def output_kernel(self) -> jax.Array:
        """The LLM's (D, V) hidden-to-logits matrix (:meth:`CausalLM.output_kernel`)."""
        return self.llm.output_kernel()


def next_token_loss(
    logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum of masked cross-entropy, number of masked tokens), in float32."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(ce * mask), jnp.sum(mask)


def chunked_next_token_loss(
    hidden: jax.Array, kernel: jax.Array, targets: jax.Array, loss_mask: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """:func:`next_token_loss` of the logits ``hidden @ kernel`` ((B, T, D) @ (D, V)) computed ``chunk``
    sequence positions at a time: a scan whose rematerialized body holds one (B, chunk, V) block, in
    the forward and the backward pass, instead of the whole (B, T, V). Same value and gradients."""
    b, t, d = hidden.shape
    pad = -t % chunk
    if pad:  # padded positions carry mask 0
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, loss_mask = (jnp.pad(x, ((0, 0), (0, pad))) for x in (targets, loss_mask))
    n = (t + pad) // chunk
    blocks = lambda x: jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)  # (n, B, chunk, ...)

    @jax.checkpoint
    def block_loss(h, y, m):
        ce = optax.softmax_cross_entropy_with_integer_labels((h @ kernel).astype(jnp.float32), y)
        return jnp.sum(ce * m.astype(jnp.float32))

    def step(total, xs):
        return total + block_loss(*xs), None

    total, _ = jax.lax.scan(
        step, jnp.zeros((), jnp.float32), (blocks(hidden), blocks(targets), blocks(loss_mask))
    )
    return total, jnp.sum(loss_mask.astype(jnp.float32))
