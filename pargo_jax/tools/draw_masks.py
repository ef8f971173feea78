"""Pictures of ParGo's attention masks and each partial token's receptive field.

  python -m pargo_jax.tools.draw_masks --out docs/masks                       # demo shape, cascaded
  python -m pargo_jax.tools.draw_masks --num_partial 288 --num_global 16 --patches 576 --layers 4 \
      --cpp released --layout raster --out /tmp/official

Writes ``cross_mask.png`` (queries x patches), ``self_masks.png`` (one panel per layer) and
``receptive_fields.png`` (rows: layers; columns: a few partial tokens; each panel is the patch grid
with the patches that token's output depends on after that layer, :func:`masks.receptive_fields`).
Needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
from absl import flags

from pargo_jax.models import masks


def mask_arrays(
    num_partial: int, num_global: int, num_patches: int, layers: int, cpp: str, layout: str, schedule="double"
) -> dict[str, np.ndarray]:
    """``cross`` (P+G, N), ``self`` (L, P+G, P+G) and ``receptive`` (L, P+G, N) boolean arrays."""
    cross = masks.partial_global_cross_mask(num_partial, num_global, num_patches, layout=layout)
    self_ = masks.self_masks(num_partial, num_global, layers, cpp, schedule)
    return {"cross": cross, "self": self_, "receptive": masks.receptive_fields(self_, cross)}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("draw_masks needs matplotlib: pip install matplotlib") from e
    return plt


def draw(out: str, arrays: dict[str, np.ndarray], num_partial: int, tokens: int = 6) -> list[str]:
    """Writes the three PNGs into ``out``; returns their paths."""
    plt = _pyplot()
    os.makedirs(out, exist_ok=True)
    cross, self_, receptive = arrays["cross"], arrays["self"], arrays["receptive"]
    layers, n = self_.shape[0], cross.shape[1]
    side = math.isqrt(n)
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.imshow(cross, cmap="Greys", aspect="auto", interpolation="nearest")
    ax.axhline(num_partial - 0.5, color="tab:red", lw=1)
    ax.set(xlabel="patch", ylabel="query (partial above the red line, global below)",
           title="cross-attention mask")  # fmt: skip
    paths.append(_save(fig, out, "cross_mask.png"))

    fig, axes = plt.subplots(1, layers, figsize=(3 * layers, 3), squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.imshow(self_[i], cmap="Greys", interpolation="nearest")
        ax.set(title=f"self mask, layer {i + 1}", xticks=[], yticks=[])
    paths.append(_save(fig, out, "self_masks.png"))

    picks = np.unique(np.linspace(0, max(num_partial - 1, 0), min(tokens, num_partial)).astype(int))
    if num_partial and side * side == n:
        fig, axes = plt.subplots(layers, len(picks), figsize=(2 * len(picks), 2 * layers), squeeze=False)
        for i in range(layers):
            for j, t in enumerate(picks):
                ax = axes[i][j]
                ax.imshow(receptive[i, t].reshape(side, side), cmap="Blues", vmin=0, vmax=1)
                ax.set(xticks=[], yticks=[])
                if i == 0:
                    ax.set_title(f"partial {t}")
                if j == 0:
                    ax.set_ylabel(f"layer {i + 1}")
        fig.suptitle("patches each partial token depends on")
        paths.append(_save(fig, out, "receptive_fields.png"))
    return paths


def _save(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    fig.clf()
    return path


def define_flags(fv: flags.FlagValues) -> None:
    """The command's flags, in ``fv`` (absl's global ``FLAGS`` when run as a command)."""
    integer = functools.partial(flags.DEFINE_integer, flag_values=fv)
    integer("num_partial", 16, "Partial queries.")
    integer("num_global", 4, "Global queries.")
    integer("patches", 64, "Vision patches (a square grid).")
    integer("layers", 3, "ParGo layers.")
    flags.DEFINE_enum("cpp", "cascaded", ["released", "cascaded"], "Self-mask schedule.", flag_values=fv)
    flags.DEFINE_enum("layout", "grid", list(masks.LAYOUTS), "Partial windows' layout.", flag_values=fv)
    flags.DEFINE_string("out", "masks", "Output directory.", flag_values=fv)


def run(a: flags.FlagValues) -> list[str]:
    """Draws the pictures ``a`` (:func:`define_flags`, parsed) asks for; their paths."""
    arrays = mask_arrays(a.num_partial, a.num_global, a.patches, a.layers, a.cpp, a.layout)
    paths = draw(a.out, arrays, a.num_partial)
    for path in paths:
        print(path)
    return paths


def main(argv: list[str]) -> None:
    """``python -m pargo_jax.tools.draw_masks``: :func:`run` on absl's parsed ``FLAGS``."""
    if len(argv) > 1:
        raise SystemExit(f"Unexpected arguments {argv[1:]}; every option is a --flag.")
    run(flags.FLAGS)


if __name__ == "__main__":
    from pargo_jax import launcher

    define_flags(flags.FLAGS)
    launcher.run(main)
