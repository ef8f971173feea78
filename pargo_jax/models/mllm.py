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

from pargo_jax.models.llm import CausalLM, LLMConfig
from pargo_jax.models.projectors import projector_module
from pargo_jax.models.vision import VisionConfig, VisionTower


@dataclasses.dataclass(frozen=True)
class MLLMConfig:
    vision: VisionConfig
    projector: Any  # a registered projector config (see pargo_jax.models.projectors)
    llm: LLMConfig
    image_token_id: int
    pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # for uint8 images normalized on device
    pixel_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image handed to the LLM."""
        return self.projector.num_tokens(self.vision.num_tokens)


def splice_image_tokens(
    text_embeds: jax.Array, image_tokens: jax.Array, input_ids: jax.Array, image_token_id: int
) -> jax.Array:
    """Replaces the embeddings at image-token positions, in order, by ``image_tokens`` (B, M, D)."""
    is_image = input_ids == image_token_id
    order = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_tokens.shape[1] - 1)
    gathered = jnp.take_along_axis(image_tokens.astype(text_embeds.dtype), order[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered, text_embeds)


class VisionLanguageModel(nn.Module):
    config: MLLMConfig

    def setup(self):
        c = self.config
        self.vision_tower = VisionTower(c.vision)
        self.projector = projector_module(c.projector)
        self.llm = CausalLM(c.llm)

    def encode_images(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        """images (B, H, W, 3) or (B, I, H, W, 3) -> image tokens (B, I * T_img, D_llm). Float images are
        taken as normalized; uint8 pixels are normalized here, on device (``input.normalize=False``)."""
        if images.dtype == jnp.uint8:
            mean, std = jnp.asarray(self.config.pixel_mean), jnp.asarray(self.config.pixel_std)
            images = (images.astype(jnp.float32) / 255.0 - mean) / std
        if images.ndim == 4:
            images = images[:, None]
        b, n = images.shape[:2]
        features = self.vision_tower(images.reshape(b * n, *images.shape[2:]))
        tokens = self.projector(features, deterministic=deterministic)
        return tokens.reshape(b, n * tokens.shape[1], tokens.shape[2])

    def embed_inputs(self, images, input_ids, deterministic: bool = True) -> jax.Array:
        """Text embeddings with the image tokens spliced in: (B, T, D_llm)."""
        text = self.llm.embed(input_ids)
        image_tokens = self.encode_images(images, deterministic)
        return splice_image_tokens(text, image_tokens, input_ids, self.config.image_token_id)

    def __call__(
        self, images, input_ids, attention_mask, *, deterministic: bool = True, hidden_only: bool = False
    ) -> jax.Array:
        """Logits (B, T, V); ``hidden_only``: the LLM's final hidden states (B, T, D) instead (see
        :func:`chunked_next_token_loss`)."""
        embeds = self.embed_inputs(images, input_ids, deterministic)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, hidden_only=hidden_only)

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
