"""Object features from boxes, as MG-LLaVA pools them (``mg_llava/module/box_model.py``): every stage
map of a feature pyramid upsampled bilinearly (``align_corners=False``) to ``grid x grid``, the maps
concatenated on channels, torchvision's ``roi_align`` (``aligned=False``, ``sampling_ratio=-1``) with
``output_size x output_size`` bins per box, and the bins averaged.

Upsampling, RoIAlign and the mean are all linear and separable in y and x, so each box's result is
``sum_ij a[i] b[j] F_k[i, j]`` per stage with 1-D weight vectors ``a`` (H_k) and ``b`` (W_k): the
grid x grid x sum(C_k) map is never built. Boxes lie inside the image (at most
``ceil(grid / output_size) + 1`` samples per bin are taken, RoIAlign's count for a whole-image box).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def _upsample_matrix(src: int, dst: int) -> jax.Array:
    """(dst, src): 1-D bilinear resize, ``align_corners=False``, negative source indices clamped to 0."""
    s = jnp.maximum((jnp.arange(dst) + 0.5) * src / dst - 0.5, 0.0)
    lo = jnp.floor(s).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, src - 1)
    w = s - lo
    cols = jnp.arange(src)
    return (1 - w)[:, None] * (cols == lo[:, None]) + w[:, None] * (cols == hi[:, None])


def _bin_weights(start: jax.Array, end: jax.Array, size: int, output_size: int, max_grid: int) -> jax.Array:
    """(M, size): RoIAlign's weight of each of ``size`` positions along one axis, averaged over the
    ``output_size`` bins and their adaptive samples, for boxes spanning ``[start, end)`` (M,)."""
    length = jnp.maximum(end - start, 1.0)
    bin_len = length / output_size
    samples = jnp.ceil(length / output_size)  # sampling_ratio=-1: ceil(bin size) samples per bin
    p = jnp.arange(output_size)[:, None]
    i = jnp.arange(max_grid)[None, :]
    pos = start[:, None, None] + p * bin_len[:, None, None] + (i + 0.5) * (bin_len / samples)[:, None, None]
    used = (i < samples[:, None, None]) & (pos >= -1.0) & (pos <= size)  # (M, P, G)
    y = jnp.maximum(pos, 0.0)
    lo = jnp.floor(y).astype(jnp.int32)
    edge = lo >= size - 1
    lo = jnp.where(edge, size - 1, lo)
    hi = jnp.where(edge, size - 1, lo + 1)
    frac = jnp.where(edge, 0.0, y - lo)
    cols = jnp.arange(size)
    w = (1 - frac)[..., None] * (cols == lo[..., None]) + frac[..., None] * (cols == hi[..., None])
    w = jnp.where(used[..., None], w, 0.0)
    return w.sum((1, 2)) / (output_size * samples)[:, None]


def roi_align_mean(
    feature_maps: Sequence[jax.Array],
    boxes: jax.Array,
    *,
    image_size: int,
    output_size: int = 56,
    grid: int = 192,
) -> jax.Array:
    """``feature_maps`` [(B, H_k, W_k, C_k)], ``boxes`` (B, M, 4) x1, y1, x2, y2 in input pixels
    -> (B, M, sum C_k): each box's RoIAlign over the maps upsampled to ``grid`` and concatenated,
    averaged over its ``output_size`` x ``output_size`` bins (spatial scale ``grid / image_size``)."""
    scale = grid / image_size
    b, m = boxes.shape[:2]
    flat = boxes.reshape(b * m, 4).astype(jnp.float32) * scale
    max_grid = math.ceil(grid * 1.0 / output_size) + 1  # samples per bin when a box spans the grid
    wy = _bin_weights(flat[:, 1], flat[:, 3], grid, output_size, max_grid).reshape(b, m, grid)
    wx = _bin_weights(flat[:, 0], flat[:, 2], grid, output_size, max_grid).reshape(b, m, grid)
    out = []
    for f in feature_maps:
        a = wy @ _upsample_matrix(f.shape[1], grid)  # (B, M, H_k)
        c = wx @ _upsample_matrix(f.shape[2], grid)  # (B, M, W_k)
        out.append(jnp.einsum("bmi,bmj,bijc->bmc", a, c, f.astype(jnp.float32)))
    return jnp.concatenate(out, -1)
