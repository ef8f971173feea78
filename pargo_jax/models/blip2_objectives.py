"""BLIP-2's stage-1 objectives (Li et al. 2023) as pure functions of arrays, as LAVIS's
``Blip2Qformer.forward`` computes them:

- ITC, image-text contrastive: cosine similarity of each of the Q query features with the text's
  [CLS] feature (both L2-normalized), the max over queries, divided by a learnable temperature;
  cross-entropy with label smoothing 0.1 in both directions, averaged.
- ITM, image-text matching: per image one hard negative text and per text one hard negative image,
  drawn with probability softmax(similarity) over the batch, the positive excluded; the 2-way head's
  cross-entropy over (positive pairs: 1, the two sets of negatives: 0).
- ITG, image-grounded text generation: next-token cross-entropy with label smoothing 0.1 over the real
  text tokens after the first, whose input token was replaced by ``[DEC]``.

Negatives come from the whole global batch. LAVIS gathers them from every GPU; here the batch is one
global array, so XLA gathers across the mesh and the loss is the same on 1 device as on 8. One
difference from LAVIS on several GPUs: its gathered copies carry no gradient, while here the gradient
flows through every pair, as LAVIS's single-GPU run computes it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

LABEL_SMOOTHING = 0.1


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||, eps)`` over the last axis (torch's ``F.normalize``), in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def smoothed_cross_entropy(
    logits: jax.Array, labels: jax.Array, smoothing: float, weights: jax.Array | None = None
) -> jax.Array:
    """Mean (weighted by ``weights``, e.g. a token mask) over rows of the cross-entropy of ``logits``
    (..., C) against ``labels`` (...) smoothed as torch's ``label_smoothing``: the target is
    ``(1 - s) * one_hot + s / C``."""
    classes = logits.shape[-1]
    target = optax.smooth_labels(jax.nn.one_hot(labels, classes, dtype=jnp.float32), smoothing)
    ce = optax.softmax_cross_entropy(logits.astype(jnp.float32), target)
    if weights is None:
        return jnp.mean(ce)
    weights = weights.astype(jnp.float32)
    return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def itc_similarity(image_feats: jax.Array, text_feat: jax.Array, temp: jax.Array) -> jax.Array:
    """``sim_i2t`` (B_img, B_txt): max over the Q queries of cos(image query, text) / ``temp``, from
    unnormalized ``image_feats`` (B, Q, E) and ``text_feat`` (B, E). ``sim_t2i`` is its transpose."""
    per_query = jnp.einsum("iqe,te->itq", l2_normalize(image_feats), l2_normalize(text_feat))
    return jnp.max(per_query, axis=-1) / temp.astype(jnp.float32)


def itc_loss(sim_i2t: jax.Array, smoothing: float = LABEL_SMOOTHING) -> jax.Array:
    """(CE(image -> its text) + CE(text -> its image)) / 2; pair i is row i and column i."""
    labels = jnp.arange(sim_i2t.shape[0])
    return (smoothed_cross_entropy(sim_i2t, labels, smoothing)
            + smoothed_cross_entropy(sim_i2t.T, labels, smoothing)) / 2  # fmt: skip


def negative_probabilities(sim: jax.Array) -> jax.Array:
    """Row-wise softmax of ``sim`` (B, B) with the diagonal (each row's positive) excluded: the
    probability of drawing each column as that row's hard negative. No gradient flows."""
    sim = jax.lax.stop_gradient(sim.astype(jnp.float32))
    b = sim.shape[0]
    if b < 2:
        raise ValueError(f"ITM draws negatives from the batch: it needs >= 2 pairs, got a batch of {b}.")
    return jax.nn.softmax(jnp.where(jnp.eye(b, dtype=bool), -jnp.inf, sim), axis=-1)


def hard_negatives(sim_i2t: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(a negative text index per image (B,), a negative image index per text (B,)), each drawn from
    :func:`negative_probabilities` of ``sim_i2t`` resp. its transpose."""
    rng_text, rng_image = jax.random.split(rng)
    draw = lambda key, sim: jax.random.categorical(key, jnp.log(negative_probabilities(sim)), axis=-1)
    return draw(rng_text, sim_i2t), draw(rng_image, sim_i2t.T)


def itm_pairs(neg_text: jax.Array, neg_image: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(image index (3B,), text index (3B,), label (3B,)) of the ITM batch in LAVIS's order: the B
    positive pairs (label 1), each text with its negative image, each image with its negative text."""
    ar = jnp.arange(neg_text.shape[0])
    images = jnp.concatenate([ar, neg_image, ar])
    texts = jnp.concatenate([ar, ar, neg_text])
    labels = jnp.concatenate([jnp.ones_like(ar), jnp.zeros_like(ar), jnp.zeros_like(ar)])
    return images, texts, labels


def itm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of the 2-way ``logits`` (3B, 2) (no smoothing)."""
    return smoothed_cross_entropy(logits, labels, 0.0)


def itg_input_ids(input_ids: jax.Array, bos_id: int) -> jax.Array:
    """The decoder's input: the text with its first token ([CLS]) replaced by ``[DEC]``."""
    return input_ids.at[:, 0].set(bos_id)


def itg_loss(
    logits: jax.Array, input_ids: jax.Array, text_mask: jax.Array, smoothing: float = LABEL_SMOOTHING
) -> jax.Array:
    """Next-token cross-entropy of ``logits`` (B, T, V) predicting ``input_ids[:, 1:]``, over the real
    tokens (``text_mask``), label-smoothed."""
    return smoothed_cross_entropy(logits[:, :-1], input_ids[:, 1:], smoothing, text_mask[:, 1:])
