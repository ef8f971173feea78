"""Attention masks as pure functions of shapes (numpy, bool, True = may attend), and the BLIP-2
Q-Former's, of shapes and the runtime text padding mask (jax.numpy, so it traces under ``jit``); the
LLM's positions and mask of packed rows (several samples per row, told apart by segment ids), likewise.

Queries are ordered ``[partial_0 .. partial_{P-1}, global_0 .. global_{G-1}]``. Image patches are
ordered crop by crop, each crop in raster order (row-major over its patch grid). Every partial token
owns one *window* of patches; :func:`partial_windows` is the single source of truth for which, and
both the dense masks and the structured (windowed) computation are derived from it.

Legend for the drawings: ``#`` = may attend, ``.`` = blocked.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("raster", "grid")


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if int(v) != v or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}.")


def _square_grid(n: int, what: str) -> tuple[int, int]:
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"{what}={n} is not a square number of patches; pass grid=(rows, cols).")
    return side, side


def partial_windows(
    num_partial: int,
    num_patches: int,
    *,
    layout: str = "raster",
    num_crops: int = 1,
    grid: tuple[int, int] | None = None,
) -> np.ndarray:
    """Patch indices owned by each partial token: int array (P, k), every patch owned exactly once.

    ``layout="raster"`` (released ParGo): partial ``i`` owns patches ``[i*k, (i+1)*k)`` with
    ``k = N / P``; with several crops a window never straddles two crops. ``layout="grid"``: each
    crop's patch grid (``grid`` = rows x cols per crop, default square) is tiled by ``kh x kw``
    windows, ``P / num_crops`` per crop, numbered row-major; window patches are listed row-major.

    Example, raster, P=3, N=6 (k=2)::

        partial 0 -> [0 1]      patches: 0 1 | 2 3 | 4 5
        partial 1 -> [2 3]
        partial 2 -> [4 5]

    Example, grid, P=4 over a 4x4 grid (2x2 windows)::

        patch grid      owner       partial 0 -> [0 1 4 5]
        0  1  2  3      0 0 1 1     partial 1 -> [2 3 6 7]
        4  5  6  7      0 0 1 1     partial 2 -> [8 9 12 13]
        8  9 10 11      2 2 3 3     partial 3 -> [10 11 14 15]
       12 13 14 15      2 2 3 3
    """
    _check_positive(num_partial=num_partial, num_patches=num_patches, num_crops=num_crops)
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}.")
    if num_partial == 0:
        return np.zeros((0, 0), np.int32)
    if num_crops < 1 or num_patches % num_crops:
        raise ValueError(f"num_patches={num_patches} is not divisible by num_crops={num_crops}.")
    if num_partial % num_crops:
        raise ValueError(f"num_partial={num_partial} is not divisible by num_crops={num_crops}.")
    per_crop, partial_per_crop = num_patches // num_crops, num_partial // num_crops
    if per_crop % partial_per_crop:
        raise ValueError(
            f"num_patches={num_patches} cannot be split evenly among num_partial={num_partial} partial "
            f"tokens over num_crops={num_crops} crop(s): {per_crop} patches per crop is not divisible by "
            f"{partial_per_crop} partial tokens per crop."
        )
    if layout == "raster":
        k = num_patches // num_partial
        return np.arange(num_patches, dtype=np.int32).reshape(num_partial, k)
    rows, cols = grid if grid is not None else _square_grid(per_crop, "patches per crop")
    if rows * cols != per_crop:
        raise ValueError(f"grid={grid} has {rows * cols} patches but each crop has {per_crop}.")
    kh, kw = _window_shape(rows, cols, partial_per_crop)
    idx = np.arange(per_crop, dtype=np.int32).reshape(rows // kh, kh, cols // kw, kw)
    one_crop = idx.transpose(0, 2, 1, 3).reshape(partial_per_crop, kh * kw)
    offsets = (np.arange(num_crops, dtype=np.int32) * per_crop)[:, None, None]
    return (one_crop[None] + offsets).reshape(num_partial, kh * kw)


def _window_shape(rows: int, cols: int, num_windows: int) -> tuple[int, int]:
    """The ``kh x kw`` window tiling a rows x cols grid into ``num_windows`` windows, as square as
    possible (ties: wider windows, like the released 1x2 pairs)."""
    best = None
    for wr in range(1, rows + 1):  # windows per column
        if rows % wr or num_windows % wr:
            continue
        wc = num_windows // wr
        if cols % wc:
            continue
        kh, kw = rows // wr, cols // wc
        score = (abs(kh - kw), -kw)
        if best is None or score < best[0]:
            best = (score, (kh, kw))
    assert best is not None  # wr = gcd(num_windows, rows) always tiles when num_windows | rows*cols
    return best[1]


def partial_global_cross_mask(
    num_partial: int,
    num_global: int,
    num_patches: int,
    *,
    layout: str = "raster",
    num_crops: int = 1,
    grid: tuple[int, int] | None = None,
) -> np.ndarray:
    """Cross-attention mask (P+G, N): partial ``i`` sees its window, global tokens see everything.

    Example, released raster layout, P=3, G=1, N=6::

                  patches 0 1 2 3 4 5
        partial 0         # # . . . .
        partial 1         . . # # . .
        partial 2         . . . . # #
        global  0         # # # # # #
    """
    _check_positive(num_global=num_global)
    windows = partial_windows(num_partial, num_patches, layout=layout, num_crops=num_crops, grid=grid)
    mask = np.zeros((num_partial + num_global, num_patches), bool)
    rows = np.repeat(np.arange(num_partial), windows.shape[1] if num_partial else 0)
    mask[rows, windows.reshape(-1)] = True
    mask[num_partial:] = True
    return mask


def partial_global_self_mask(num_partial: int, num_global: int) -> np.ndarray:
    """Released self-attention mask (P+G, P+G): partial<->partial and global<->global only.

    Example, P=3, G=2::

                p0 p1 p2 g0 g1
        p0       #  #  #  .  .
        p1       #  #  #  .  .
        p2       #  #  #  .  .
        g0       .  .  .  #  #
        g1       .  .  .  #  #
    """
    _check_positive(num_partial=num_partial, num_global=num_global)
    kind = np.arange(num_partial + num_global) >= num_partial
    return kind[:, None] == kind[None, :]


def cascaded_group_sizes(
    num_partial: int, num_layers: int, schedule: str | Sequence[int] = "double"
) -> tuple[int, ...]:
    """Group size of the cascaded partial perception per layer.

    ``"double"`` (default): 1, 2, 4, ... doubling with depth, and the last layer one-to-all (P), so
    ``L=4`` gives ``(1, 2, 4, P)`` as in the paper's one-to-one, one-to-two, ..., one-to-all.
    ``"linear"``: 1, 2, 3, ..., last layer P. A sequence gives the sizes explicitly (one per layer,
    each in [1, P]).
    """
    _check_positive(num_partial=num_partial, num_layers=num_layers)
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
    if isinstance(schedule, str):
        if schedule == "double":
            sizes = [2**layer for layer in range(num_layers)]
        elif schedule == "linear":
            sizes = [layer + 1 for layer in range(num_layers)]
        else:
            raise ValueError(f"schedule={schedule!r} is not 'double', 'linear' or a list of sizes.")
        sizes[-1] = num_partial
        return tuple(max(1, min(s, num_partial)) for s in sizes)
    sizes = tuple(int(s) for s in schedule)
    if len(sizes) != num_layers:
        raise ValueError(f"schedule has {len(sizes)} group sizes but there are {num_layers} layers.")
    if any(not 1 <= s <= max(num_partial, 1) for s in sizes):
        raise ValueError(f"schedule {sizes} has sizes outside [1, num_partial={num_partial}].")
    return sizes


def cascaded_self_mask(
    num_partial: int,
    num_global: int,
    layer: int,
    num_layers: int,
    schedule: str | Sequence[int] = "double",
) -> np.ndarray:
    """Self-attention mask (P+G, P+G) of layer ``layer`` for the cascaded partial perception.

    Partial tokens are split into consecutive groups of ``cascaded_group_sizes(...)[layer]``
    neighbours (the last group may be smaller) and attend within their group; global tokens attend
    among themselves; partial<->global stays blocked. Example, P=4, G=1, layer 1 of 3 (group size 2)::

                p0 p1 p2 p3 g0
        p0       #  #  .  .  .
        p1       #  #  .  .  .
        p2       .  .  #  #  .
        p3       .  .  #  #  .
        g0       .  .  .  .  #
    """
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer={layer} is outside [0, num_layers={num_layers}).")
    size = cascaded_group_sizes(num_partial, num_layers, schedule)[layer]
    group = np.concatenate([np.arange(num_partial) // size, np.full(num_global, -1)])
    return group[:, None] == group[None, :]


def self_masks(
    num_partial: int,
    num_global: int,
    num_layers: int,
    cpp: str = "released",
    schedule: str | Sequence[int] = "double",
) -> np.ndarray:
    """Per-layer self masks (L, P+G, P+G) for ``cpp="released"`` or ``"cascaded"``."""
    if cpp == "released":
        return np.repeat(partial_global_self_mask(num_partial, num_global)[None], num_layers, axis=0)
    if cpp == "cascaded":
        return np.stack(
            [cascaded_self_mask(num_partial, num_global, i, num_layers, schedule) for i in range(num_layers)]
        )
    raise ValueError(f"cpp={cpp!r} is not 'released' or 'cascaded'.")


def receptive_fields(self_masks_: np.ndarray, cross_mask: np.ndarray) -> np.ndarray:
    """(L, P+G, N): which patches each query's output depends on after each layer. A layer is
    self-attention then cross-attention, so ``R_l = (S_l R_{l-1}) | C`` with ``R_{-1}`` empty: a query
    sees what the queries it attends to saw, plus its own cross-attention patches."""
    seen = np.zeros(cross_mask.shape, bool)
    out = []
    for s in self_masks_:
        seen = (s.astype(np.int64) @ seen.astype(np.int64) > 0) | cross_mask
        out.append(seen)
    return np.stack(out)


QFORMER_MODES = ("pairs", "generate")


def qformer_structure(num_queries: int, num_text: int, mode: str) -> np.ndarray:
    """The Q-Former's self-attention pattern (Q+T, Q+T) before text padding, queries first.

    ``"pairs"`` (image-text matching; with ``num_queries=0`` the text encoder): every position sees
    every position. ``"generate"`` (image-grounded text generation, BLIP-2's UniLM-style mask):
    queries see the queries only; text token ``t`` sees every query and the text tokens ``<= t``.
    Example, ``"generate"``, Q=2, T=3::

                q0 q1 t0 t1 t2
        q0       #  #  .  .  .
        q1       #  #  .  .  .
        t0       #  #  #  .  .
        t1       #  #  #  #  .
        t2       #  #  #  #  #
    """
    _check_positive(num_queries=num_queries, num_text=num_text)
    if mode not in QFORMER_MODES:
        raise ValueError(f"mode={mode!r} is not one of {QFORMER_MODES}.")
    n = num_queries + num_text
    if mode == "pairs":
        return np.ones((n, n), bool)
    row, col = np.arange(n)[:, None], np.arange(n)[None, :]
    return (col < num_queries) | ((row >= num_queries) & (col <= row))


def qformer_mask(num_queries: int, text_mask, mode: str = "pairs") -> jnp.ndarray:
    """Self-attention mask (B, 1, Q+T, Q+T) of the Q-Former over ``[queries, text]``: the
    :func:`qformer_structure` of ``mode`` with the padded text tokens (``text_mask`` (B, T), 0 =
    padding) blocked as keys. Every row keeps a key: a query itself or, without queries, the text
    tokens of a row with at least one real token (BERT's [CLS] comes first). Example, ``"pairs"``,
    Q=1, text_mask ``[1, 1, 0]``::

                q0 t0 t1 t2
        q0       #  #  #  .
        t0       #  #  #  .
        t1       #  #  #  .
        t2       #  #  #  .
    """
    text_mask = jnp.asarray(text_mask)
    if text_mask.ndim != 2:
        raise ValueError(f"text_mask must be (batch, length), got shape {text_mask.shape}.")
    b, t = text_mask.shape
    keys = jnp.concatenate([jnp.ones((b, num_queries), bool), text_mask.astype(bool)], axis=1)
    structure = jnp.asarray(qformer_structure(num_queries, t, mode))
    return structure[None, None] & keys[:, None, None, :]


def segment_positions(segment_ids, attention_mask) -> jnp.ndarray:
    """Positions (B, T) int32 of packed rows: within each segment (a run of equal ``segment_ids``),
    the real tokens (``attention_mask`` 1) before this one, clamped at 0; i.e. ``cumsum(mask) - 1`` of
    each sample alone, the positions it gets unpacked. A masked token (padding, an empty object-token
    slot) does not advance them. Example, one row::

        segment_ids     1 1 1 2 2 2 2 0 0
        attention_mask  1 1 1 1 1 0 1 0 0
        positions       0 1 2 0 1 1 2 0 0
    """
    seg = jnp.asarray(segment_ids)
    real = jnp.asarray(attention_mask).astype(jnp.int32)
    count = jnp.cumsum(real, axis=-1)
    start = jnp.concatenate([jnp.ones_like(seg[..., :1], bool), seg[..., 1:] != seg[..., :-1]], axis=-1)
    # real tokens before each segment's start, carried forward (non-decreasing along the row)
    before = jax.lax.cummax(jnp.where(start, count - real, 0), axis=seg.ndim - 1)
    return jnp.maximum(count - before - 1, 0).astype(jnp.int32)


def segment_mask(segment_ids, attention_mask) -> jnp.ndarray:
    """Self-attention mask (B, 1, T, T) of packed rows: query ``i`` may attend key ``j`` iff both are in
    the same segment ``> 0`` and key ``j`` is real (``attention_mask``); a padding query (segment 0)
    attends itself only, so no row is empty. Causality is not in it: the attention core adds it
    (``causal=True``), keeping the lower triangle. Every segment must start with a real token (each
    query then has >= 1 allowed key, as unpacked). Example, segment_ids ``1 1 1 2 2 2 0``,
    attention_mask ``1 1 1 1 0 1 0`` (key 4: an empty slot)::

                  k0 k1 k2 k3 k4 k5 k6
        q0 seg 1   #  #  #  .  .  .  .
        q1 seg 1   #  #  #  .  .  .  .
        q2 seg 1   #  #  #  .  .  .  .
        q3 seg 2   .  .  .  #  .  #  .
        q4 seg 2   .  .  .  #  .  #  .
        q5 seg 2   .  .  .  #  .  #  .
        q6 pad     .  .  .  .  .  .  #
    """
    seg = jnp.asarray(segment_ids)
    real = jnp.asarray(attention_mask).astype(bool)
    query, key = seg[:, :, None], seg[:, None, :]
    same = (query == key) & (query > 0) & real[:, None, :]
    itself = (query == 0) & jnp.eye(seg.shape[1], dtype=bool)[None]
    return (same | itself)[:, None]
