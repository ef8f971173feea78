"""Projectors compared at equal visual-token budgets on the shapes set, in one command.

  python -m pargo_jax.benchmarks.projectors                    # the full grid (hours on 2 cores)
  python -m pargo_jax.benchmarks.projectors --quick            # smoke run (CI), under 2 minutes
  python -m pargo_jax.benchmarks.projectors --budgets 36 --seeds 0,1,2 --variants pargo,qformer

Every run is the demo's two stages (``experiments/pretrain.py`` then ``experiments/sft.py``, preset
``demo``) on the shapes set's ``--data`` variant (default ``fine``: 128 px, 5-8 small shapes and a
2-digit number; the demo tower is pretrained on the same variant) with only the projector, the seed and
the learning rate changed: the same tower, LLM shape, data and steps. Each (variant, budget, seed, lr)
run writes ``OUT/<data>/runs/<run>/result.json`` when it ends; a run whose result exists is not
retrained, so an interrupted benchmark resumes where it stopped. The learning rate of each (variant,
budget) is the one with the lowest mean final SFT training loss over seeds (never chosen on the eval
split).

Outputs: ``OUT/projectors_<data>.md`` (mean +- std over seeds per question kind, tokens, projector
params and FLOPs, train time per run), ``.json`` (every run) and ``.png`` (accuracy against visual
tokens; needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

KINDS = ("colour", "shape", "count", "position", "refer", "ground", "digit", "kth", "relation", "accuracy")
# The shapes variant -> its image size: the demo tower's 8 px patches give 8 x 8 or 16 x 16 of them.
IMAGE_SIZE = {"basic": 64, "fine": 128}


def _pargo(budget: int, partial: int, **extra) -> dict:
    """ParGo with ``partial`` partial queries (grid windows, cascaded) and the rest of ``budget`` global."""
    return (
        dict(name="pargo", num_partial=partial, num_global=budget - partial, layout="grid", cpp="cascaded")
        | extra
    )


def _tiling(most: int, patches: int) -> int:
    """The most partial queries <= ``most`` whose windows tile the square patch grid (a power of 2)."""
    return max(
        p for p in (2**k for k in range(patches.bit_length())) if p <= max(most, 1) and patches % p == 0
    )


def _square(name: str, **extra) -> Callable[[int], dict | None]:
    return lambda t, n: dict(name=name, num_queries=t, **extra) if math.isqrt(t) ** 2 == t else None


# variant -> (budget -> projector options, or None when the budget cannot be met exactly). ParGo keeps
# 4 global queries and gives the rest to partial ones, as far as windows tile the grid.
VARIANTS: dict[str, Callable[[int, int], dict | None]] = {
    "pargo": lambda t, n: _pargo(t, _tiling(t - 4, n)),
    "pargo_released": lambda t, n: _pargo(t, _tiling(t - 4, n), cpp="released"),
    "pargo_raster": lambda t, n: _pargo(t, _tiling(t - 4, n), layout="raster"),
    "pargo_half_global": lambda t, n: _pargo(t, _tiling(t // 2, n)),
    "qformer": lambda t, n: dict(name="qformer", num_global=t),
    "resampler": _square("resampler", heads=4, layers=2, mlp_dim=128),
    "c_abstractor": _square("c_abstractor", depth=2),
    "mlp": lambda t, n: dict(name="mlp", group=n // t) if n % t == 0 else None,
    "mg_llava": lambda t, n: _pargo(t - MG_LLAVA_BOXES, _tiling(t - MG_LLAVA_BOXES - 4, n)),
}
# MG-LLaVA (preset mg_llava_demo): ParGo over the demo tower fused by the Conv-Gate with a tiny ConvNeXt
# at 4x the image size, plus this many object tokens (the records' boxes); they count in the budget.
MG_LLAVA_BOXES = 4
WIDTHS = dict(pargo=dict(hidden=64, heads=4, layers=2, mlp_dim=128, max_positions=128, init="fan_in"),
              qformer=dict(hidden=64, heads=4, layers=2, mlp_dim=128, max_positions=128, init="fan_in"),
              resampler=dict(hidden=64), c_abstractor=dict(hidden=64))  # fmt: skip
FULL = dict(budgets=(16, 36, 64), seeds=(0, 1, 2), lrs=(1.0, 3.0), variants=tuple(VARIANTS))
QUICK = dict(budgets=(16,), seeds=(0,), lrs=(1.0,), variants=("pargo", "resampler"))
QUICK_DATA = dict(num_pretrain=128, num_sft=128, num_eval=16, num_val=16)
QUICK_TOWER = dict(steps=20, batch_size=16)


def num_patches(data: str) -> int:
    return (IMAGE_SIZE[data] // 8) ** 2


def projector_options(variant: str, budget: int, data: str = "fine") -> dict | None:
    """The projector of ``variant`` at ``budget`` visual tokens (demo widths) on ``data``, or None."""
    options = VARIANTS[variant](budget, num_patches(data))
    if options is None:
        return None
    return {**WIDTHS.get(options["name"], {}), **options}


def stage_configs(
    projector: dict,
    seed: int,
    lr_scale: float,
    out: str,
    steps: int | None,
    quick: bool,
    data: str = "fine",
    mg_llava: bool = False,
):
    """(pretrain, sft) configs of one run: the demo preset (``mg_llava``: mg_llava_demo) on the ``data``
    variant of the shapes set (the demo tower pretrained on it) with this projector, seed and LR scale."""
    from experiments import base, pretrain, sft

    configs = []
    for stage in (pretrain, sft):
        c = stage.get_config("mg_llava_demo" if mg_llava else "demo")
        c.seed = seed
        c.model.projector = dict(projector)
        c.optim.lr *= lr_scale
        c.input.data_dir = os.path.join(out, data, "data")
        c.model.vision.path = os.path.join(out, data, "demo_tower")
        c.sample_at_end = ""
        c.checkpoint.every_steps = 10**9  # only the final step
        size = IMAGE_SIZE[data]
        c.shapes.update(variant=data, image_size=size)
        c.demo_tower.update(variant=data, image_size=size)
        c.input.image_size = size
        c.input.max_len = 128 if data == "basic" else 256  # 5-8 objects + a number per caption
        if mg_llava:  # the ConvNeXt sees 4x the pixels; RoIAlign over a grid of the low-res size
            c.model.high_res.update(image_size=4 * size, roi_grid=size, max_boxes=MG_LLAVA_BOXES)
            c.input.image_size = 4 * size
            c.input.max_len += MG_LLAVA_BOXES
        if quick:
            c.shapes.update(QUICK_DATA)
            c.demo_tower.update(QUICK_TOWER)
        if steps:
            base.set_steps(c, total=steps, warmup=min(c.optim.warmup_steps, steps // 4))
            c.log_every_steps = max(1, steps // 4)
        for ev in c.evals.values():
            ev.log_steps = 0  # only when the stage ends
        configs.append(c)
    return configs


def run_name(variant: str, budget: int, seed: int, lr_scale: float) -> str:
    return f"{variant}-t{budget}-s{seed}-lr{lr_scale:g}"


def train_one(
    variant, budget, seed, lr_scale, out, *, steps=None, quick=False, data="fine", log=print
) -> dict:
    """Trains one run (both stages) unless its ``result.json`` exists; returns the result."""
    from pargo_jax import train

    root = os.path.join(out, data, "runs", run_name(variant, budget, seed, lr_scale))
    path = os.path.join(root, "result.json")
    if os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
        log(f"{run_name(variant, budget, seed, lr_scale)}: done before, not retrained")
        return result
    projector = projector_options(variant, budget, data)
    pt, ft = stage_configs(projector, seed, lr_scale, out, steps, quick, data, mg_llava=variant == "mg_llava")
    ft.checkpoint.init_from = os.path.join(root, "pretrain")
    t0 = time.perf_counter()
    train.run(pt, os.path.join(root, "pretrain"))
    summary = train.run(ft, os.path.join(root, "sft"))
    seconds = time.perf_counter() - t0
    result = dict(
        variant=variant, budget=budget, seed=seed, lr_scale=lr_scale, projector=projector,
        train_seconds=seconds, sft_loss=float(summary["loss"]),
        **_projector_size(os.path.join(root, "sft")),
        **{k: float(summary[f"eval/shapes/{k}"]) for k in KINDS if f"eval/shapes/{k}" in summary},
    )  # fmt: skip
    os.makedirs(root, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
    name = run_name(variant, budget, seed, lr_scale)
    log(f"{name}: {seconds:.0f} s, accuracy {result.get('accuracy', 0):.3f}")
    return result


def _projector_size(workdir: str) -> dict[str, Any]:
    """Tokens, parameter count and forward FLOPs per image of the run's projector (from model.json;
    MG-LLaVA: its ParGo's, the ConvNeXt path and the box projector not counted)."""
    import jax

    from pargo_jax.models import factory
    from pargo_jax.models.projectors import projector_module

    mcfg = factory.read_model_config(workdir)
    n = mcfg.vision.num_tokens
    x = jax.ShapeDtypeStruct((1, n, mcfg.projector.vision_width), np.float32)
    shapes = jax.eval_shape(projector_module(mcfg.projector).init, jax.random.key(0), x)
    params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(shapes))
    return dict(tokens=mcfg.num_image_tokens, params=params, gflops=mcfg.projector.flops(n) / 1e9)


def summarize(results: list[dict]) -> list[dict]:
    """One row per (variant, budget): the LR with the lowest mean SFT loss, its mean / std per kind."""
    groups: dict[tuple, dict[float, list[dict]]] = {}
    for r in results:
        groups.setdefault((r["variant"], r["budget"]), {}).setdefault(r["lr_scale"], []).append(r)
    rows = []
    for (variant, budget), by_lr in groups.items():
        lr, runs = min(by_lr.items(), key=lambda kv: np.mean([r["sft_loss"] for r in kv[1]]))
        first = runs[0]
        p = first["projector"]
        row = dict(
            variant=variant, budget=budget, lr_scale=lr, seeds=len(runs), tokens=first["tokens"],
            split=f"{p['num_partial']}+{p['num_global']}" if p["name"] == "pargo" else "",
            params=first["params"], gflops=first["gflops"],
            train_seconds=float(np.mean([r["train_seconds"] for r in runs])),
        )  # fmt: skip
        for k in KINDS:
            values = [r[k] for r in runs if k in r]
            if values:
                row[k], row[f"{k}_std"] = float(np.mean(values)), float(np.std(values))
        rows.append(row)
    return sorted(rows, key=lambda r: (r["budget"], r["variant"]))


def markdown(rows: list[dict]) -> str:
    kinds = [k for k in KINDS if any(k in r for r in rows)]
    head = ["projector", "tokens", *kinds, "params", "MFLOPs", "lr x", "seeds", "s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r[k]:.3f} ± {r[k + '_std']:.3f}" if k in r else "-" for k in kinds]
        name = f"{r['variant']} ({r['split']})" if r["split"] else r["variant"]
        lines.append("| " + " | ".join([name, str(r["tokens"]), *cells, f"{r['params']:,}",
                     f"{r['gflops'] * 1e3:.2f}", f"{r['lr_scale']:g}", str(r["seeds"]),
                     f"{r['train_seconds']:.0f}"]) + " |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str | None:
    """accuracy (mean +- std over seeds) against visual tokens, one line per variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in sorted({r["variant"] for r in rows}):
        pts = sorted((r["tokens"], r["accuracy"], r["accuracy_std"]) for r in rows if r["variant"] == variant)
        if pts:
            t, a, s = zip(*pts)
            ax.errorbar(t, a, yerr=s, marker="o", capsize=3, label=variant)
    ax.set(xlabel="visual tokens", ylabel="shapes accuracy (all kinds)", title="projectors at equal budgets")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_results/projectors")
    p.add_argument("--quick", action="store_true", help="tiny data, 4 steps a stage: a smoke run")
    p.add_argument("--budgets", help="comma list of visual-token budgets")
    p.add_argument("--seeds", help="comma list of seeds")
    p.add_argument("--lrs", help="comma list of LR multipliers of the demo's stage LRs")
    p.add_argument("--variants", help=f"comma list of {sorted(VARIANTS)}")
    p.add_argument("--steps", type=int, help="steps per stage (default: the demo's)")
    p.add_argument("--data", default="fine", choices=tuple(IMAGE_SIZE), help="shapes variant (fine: 128 px)")
    a = p.parse_args(argv)
    grid = dict(QUICK if a.quick else FULL)
    for key, cast in (("budgets", int), ("seeds", int), ("lrs", float), ("variants", str)):
        if getattr(a, key):
            grid[key] = tuple(cast(v) for v in getattr(a, key).split(","))
    unknown = set(grid["variants"]) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"Unknown variants {sorted(unknown)}; choose from {sorted(VARIANTS)}.")
    steps = a.steps or (4 if a.quick else None)
    cells = []
    for t in grid["budgets"]:
        seen: dict[str, str] = {}
        for v in grid["variants"]:
            options = projector_options(v, t, a.data)
            key = json.dumps([options, v == "mg_llava"], sort_keys=True)
            if options is None:
                print(f"{v} cannot make exactly {t} tokens from {num_patches(a.data)} patches: not run")
            elif key in seen:
                print(f"{v} at {t} tokens is the same projector as {seen[key]}: not run twice")
            else:
                seen[key] = v
                cells.append((v, t))
    plan = [(v, t, s, lr) for v, t in cells for s in grid["seeds"] for lr in grid["lrs"]]
    t0 = time.perf_counter()
    results = []
    for i, (v, t, s, lr) in enumerate(plan):
        print(f"[{i + 1}/{len(plan)}] {run_name(v, t, s, lr)}", flush=True)
        results.append(train_one(v, t, s, lr, a.out, steps=steps, quick=a.quick, data=a.data))
    rows = summarize(results)
    table = markdown(rows)
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"projectors_{a.data}")
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    with open(stem + ".json", "w") as f:
        json.dump(
            dict(data=a.data, rows=rows, runs=results, wall_seconds=time.perf_counter() - t0), f, indent=1
        )
    png = plot(rows, stem + ".png")
    print(table)
    print(
        f"{len(plan)} runs in {time.perf_counter() - t0:.0f} s; wrote {stem}.md, .json"
        + (", .png" if png else "")
    )
    return dict(rows=rows, runs=results)


if __name__ == "__main__":
    from pargo_jax.host_memory import keep_freed_memory

    keep_freed_memory()  # before jax starts its threads
    main()
