"""Projectors compared at equal visual-token budgets on the shapes set, in one command.

  python -m pargo_jax.benchmarks.projectors                    # the default grid (about an hour, 2 cores)
  python -m pargo_jax.benchmarks.projectors --quick            # smoke run (CI), under 2 minutes
  python -m pargo_jax.benchmarks.projectors --budgets 16,36,64 --variants pargo,qformer --lrs 1,3
  python -m pargo_jax.benchmarks.projectors --schedule demo    # both demo stages + QA accuracy (hours a run)

Every run trains one projector from the same tower, LLM shape, data and steps on the shapes set's
``--data`` variant (default ``fine``: 128 px, 5-8 small shapes and a 2-digit number; the demo tower
is pretrained on the same variant, once per ``--out``). Schedules:

- ``caption`` (default): the demo's stage 1 (``experiments/pretrain.py``, preset ``demo``) for
  ``--steps`` (default 300) with the tower frozen: projector and LLM learn to caption. Scored on the
  held-out captions (``val``), teacher-forced: the caption loss and the accuracy on the colour, shape,
  count, digit and position words, i.e. how much of each detail reaches the LLM.
- ``demo``: the demo's two stages (``experiments/pretrain.py`` then ``experiments/sft.py``), scored by
  answer accuracy per question kind on the held-out questions (needs the demo's 6000 steps to learn the
  lookups: about half an hour a run here).

Each (variant, budget, seed, lr) run writes ``OUT/<data>/<schedule>/<run>/result.json`` when it ends;
a run whose result exists is not retrained, so an interrupted benchmark resumes where it stopped.
``--jobs`` runs train side by side (2 on 2 cores: 1.5x the throughput of one). The learning rate of each
(variant, budget) is the one with the lowest mean final training loss over seeds (never chosen on the
held-out split).

Outputs: ``OUT/projectors_<data>_<schedule>.md`` (mean +- std over seeds per metric, tokens, projector
params and FLOPs, train time per run), ``.json`` (every run) and ``.png`` (the headline metric against
visual tokens; needs matplotlib).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from data_pipelines.shapes import CAPTION_FIELDS
from pargo_jax import launcher

# The metrics a schedule's table reports: the demo's QA accuracies, or the caption loss and the
# teacher-forced accuracy on each caption field; the headline one is plotted (lower is better if a loss).
QA_KINDS = ("colour", "shape", "count", "position", "refer", "ground", "digit", "kth", "relation", "accuracy")
CAPTION_METRICS = ("caption_loss", *CAPTION_FIELDS, "token_accuracy")
HEADLINE = {"caption": "caption_loss", "demo": "accuracy"}  # schedule -> its headline metric
METRICS = CAPTION_METRICS + tuple(k for k in QA_KINDS if k not in CAPTION_METRICS)  # a table's column order
DEFAULT_STEPS = {"caption": 300, "demo": None}  # None: the demo's own (2000 + 2500)
# The shapes variant -> its image size: the demo tower's 8 px patches give 8 x 8 or 16 x 16 of them.
IMAGE_SIZE = {"basic": 64, "fine": 128}
CAPTION_TEXT = {"basic": 64, "fine": 104}  # tokens: the longest caption + the chat template's, rounded up


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


def _square(name: str, **extra) -> Callable[[int, int], dict | None]:
    return lambda t, n: dict(name=name, num_queries=t, **extra) if math.isqrt(t) ** 2 == t else None


# variant -> (budget, patches -> projector options, or None when the budget cannot be met exactly). ParGo
# keeps 4 global queries and gives the rest to partial ones, as far as windows tile the grid.
VARIANTS: dict[str, Callable[[int, int], dict | None]] = {
    "pargo": lambda t, n: _pargo(t, _tiling(t - 4, n)),
    "pargo_released": lambda t, n: _pargo(t, _tiling(t - 4, n), cpp="released"),
    "pargo_raster": lambda t, n: _pargo(t, _tiling(t - 4, n), layout="raster"),
    "pargo_few_partial": lambda t, n: _pargo(t, _tiling(t // 4, n)),  # 1/4 partial, 3/4 global
    "qformer": lambda t, n: dict(name="qformer", num_global=t),
    "resampler": _square("resampler", heads=4, layers=2, mlp_dim=128),
    "c_abstractor": _square("c_abstractor", depth=2),
    "mlp": lambda t, n: dict(name="mlp", group=n // t) if n % t == 0 else None,
    "mg_llava": lambda t, n: _pargo(t - MG_LLAVA_BOXES, _tiling(t - MG_LLAVA_BOXES - 4, n)),
    "blip2": lambda t, n: dict(name="blip2", num_queries=t),
    "xformer": lambda t, n: dict(name="xformer", num_queries=t, fusion_layers=1),
    "xformer_norecon": lambda t, n: dict(name="xformer", num_queries=t, fusion_layers=1),
}
# The BLIP-2 Q-Former family first trains with its stage-1 objectives (``--qformer-steps`` on the
# captions: ITC, ITM, ITG, + X-Former's MAE reconstruction unless ``_norecon``), then runs the schedule
# from that projector (the demo's MAE, pretrained once per ``--out``, is X-Former's second tower).
QFORMER_VARIANTS = {"blip2": "blip2_demo", "xformer": "xformer_demo", "xformer_norecon": "xformer_demo"}
XFORMER_ABLATION = ("xformer", "xformer_norecon", "blip2")
FAMILIES = ("pargo", "qformer", "resampler", "c_abstractor", "mlp")
ABLATIONS = ("pargo_released", "pargo_raster", "pargo_few_partial")  # by default at the smallest budget
# MG-LLaVA (preset mg_llava_demo): ParGo over the demo tower fused by the Conv-Gate with a tiny ConvNeXt
# at 4x the image size, plus this many object tokens (the records' boxes); they count in the budget.
MG_LLAVA_BOXES = 4
QFORMER_WIDTHS = dict(hidden=64, heads=4, layers=2, mlp_dim=128, cross_attention_freq=1, max_positions=128,
                      embed_dim=32)  # fmt: skip
WIDTHS = dict(pargo=dict(hidden=64, heads=4, layers=2, mlp_dim=128, max_positions=128, init="fan_in"),
              qformer=dict(hidden=64, heads=4, layers=2, mlp_dim=128, max_positions=128, init="fan_in"),
              resampler=dict(hidden=64), c_abstractor=dict(hidden=64),
              blip2=QFORMER_WIDTHS, xformer=QFORMER_WIDTHS)  # fmt: skip
FULL = dict(budgets=(16, 64), seeds=(0, 1, 2), lrs=(1.0,), variants=FAMILIES + ABLATIONS)
QUICK = dict(budgets=(16,), seeds=(0,), lrs=(1.0,), variants=("pargo", "resampler"))
QUICK_DATA = dict(num_pretrain=128, num_sft=128, num_eval=16, num_val=16)
QUICK_TOWER = dict(steps=20, batch_size=16)
# The fine variant's tower pretrains 3x the demo's steps: its 6 x 10 px digits need them (an attention
# probe on 4000 scenes' frozen features reads the number at 0.60 after 6000 steps, 0.39 after 2000).
TOWER = {"basic": {}, "fine": dict(steps=6000)}
QUICK_MAE = dict(steps=10, batch_size=8)


def num_patches(data: str) -> int:
    return (IMAGE_SIZE[data] // 8) ** 2


def projector_options(variant: str, budget: int, data: str = "fine") -> dict | None:
    """The projector of ``variant`` at ``budget`` visual tokens (demo widths) on ``data``, or None."""
    options = VARIANTS[variant](budget, num_patches(data))
    if options is None:
        return None
    return {**WIDTHS.get(options["name"], {}), **options}


def _shared(c, out: str, data: str, quick: bool, mg_llava: bool) -> None:
    """The settings every run of ``data`` shares: its data, tower, image size and sequence length (and
    X-Former's MAE, the Q-Former's caption length)."""
    c.input.data_dir = os.path.join(out, data, "data")
    c.model.vision.path = os.path.join(out, data, "demo_tower")
    if c.model.projector.get("name") == "xformer":
        c.model.detail = dict(path=os.path.join(out, data, "demo_mae"), mask_ratio=0.5)
        c.demo_mae = dict(image_size=IMAGE_SIZE[data], **(QUICK_MAE if quick else {}))
    c.input.qformer_max_len = CAPTION_TEXT[data]  # whole captions (LAVIS cuts at 32: fine ones are longer)
    c.sample_at_end = ""
    c.checkpoint.every_steps = 10**9  # only the final step
    size = IMAGE_SIZE[data]
    c.shapes.update(variant=data, image_size=size)
    c.demo_tower.update(variant=data, image_size=size, **TOWER[data])
    c.input.image_size = size
    c.input.max_len = 128 if data == "basic" else 256  # 5-8 objects + a number per caption
    if mg_llava:  # the ConvNeXt sees 4x the pixels; RoIAlign over a grid of the low-res size
        c.model.high_res.update(image_size=4 * size, roi_grid=size, max_boxes=MG_LLAVA_BOXES)
        c.input.image_size = 4 * size
        c.input.max_len += MG_LLAVA_BOXES
    if quick:
        c.shapes.update(QUICK_DATA)
        c.demo_tower.update(QUICK_TOWER)


def stage_configs(
    projector: dict,
    seed: int,
    lr_scale: float,
    out: str,
    steps: int | None,
    quick: bool,
    data: str = "fine",
    mg_llava: bool = False,
    schedule: str = "caption",
    budget: int = 64,
    variant: str = "",
    qformer_steps: int | None = None,
) -> list:
    """The configs of one run, in order: ``caption``: the demo preset's stage 1 (``mg_llava``:
    mg_llava_demo's) with the tower frozen; ``demo``: its stages 1 and 2. On the ``data`` variant of the
    shapes set (the demo tower pretrained on it) with this projector, seed and LR scale. A Q-Former
    ``variant`` (:data:`QFORMER_VARIANTS`) runs its stage 1 first, ``qformer_steps`` long (default:
    its preset's)."""
    from experiments import base, evals, pretrain, sft

    stages = (pretrain,) if schedule == "caption" else (pretrain, sft)
    configs = []
    qformer = QFORMER_VARIANTS.get(variant)
    if qformer:  # its stage 1 first
        c = pretrain.get_config(qformer)
        c.seed = seed
        c.model.projector = dict(projector)
        c.optim.lr *= lr_scale
        _shared(c, out, data, quick, False)
        if variant.endswith("_norecon"):
            c.objective.recon = 0.0
        c.evals = {}
        steps_1 = qformer_steps or (4 if quick else c.total_steps)
        base.set_steps(c, total=steps_1, warmup=min(c.optim.warmup_steps, steps_1 // 4))
        c.log_every_steps = max(1, steps_1 // 4)
        configs.append(c)
    for stage in stages:
        c = stage.get_config("mg_llava_demo" if mg_llava else "demo")
        c.seed = seed
        c.model.projector = dict(projector)
        if qformer:  # the Q-Former's stage-1 projector continues
            c.checkpoint.init_from_parts = tuple(dict.fromkeys((*c.checkpoint.init_from_parts, "projector")))
        c.optim.lr *= lr_scale
        _shared(c, out, data, quick, mg_llava)
        if schedule == "caption":  # the tower is the same frozen one for every projector
            c.trainable = base.regex_dict({k: v for k, v in c.trainable.items() if "tower" not in k})
            c.input.max_len = CAPTION_TEXT[data] + budget  # the same room for text at every budget
            c.evals = evals.get_config("val")
        if steps:
            base.set_steps(c, total=steps, warmup=min(c.optim.warmup_steps, steps // 4))
            c.log_every_steps = max(1, steps // 4)
        for ev in c.evals.values():
            ev.log_steps = 0  # only when the stage ends
        configs.append(c)
    return configs


def run_name(variant: str, budget: int, seed: int, lr_scale: float) -> str:
    return f"{variant}-t{budget}-s{seed}-lr{lr_scale:g}"


def metrics_of(summary: dict[str, Any], schedule: str) -> dict[str, float]:
    """The table's metrics from a run's final summary (``eval/<name>/<metric>`` scalars)."""
    if schedule == "demo":
        return {k: float(summary[f"eval/shapes/{k}"]) for k in QA_KINDS if f"eval/shapes/{k}" in summary}
    fields = {k: f"eval/val/{k}_token_accuracy" for k in CAPTION_FIELDS}
    keys = dict(caption_loss="eval/val/loss", **fields, token_accuracy="eval/val/token_accuracy")
    return {k: float(summary[v]) for k, v in keys.items()}


def train_one(
    variant,
    budget,
    seed,
    lr_scale,
    out,
    *,
    steps=None,
    quick=False,
    data="fine",
    schedule="caption",
    qformer_steps=None,
    log=print,
) -> dict:
    """Trains one run (every stage of ``schedule``) unless its ``result.json`` exists; returns the result."""
    from pargo_jax import prepare, train

    name = run_name(variant, budget, seed, lr_scale)
    root = os.path.join(out, data, schedule, name)
    path = os.path.join(root, "result.json")
    if os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
        log(f"{name}: done before, not retrained")
        return result
    projector = projector_options(variant, budget, data)
    configs = stage_configs(
        projector, seed, lr_scale, out, steps, quick, data, variant == "mg_llava", schedule, budget, variant,
        qformer_steps,
    )  # fmt: skip
    t0 = time.perf_counter()
    workdir = None
    names = ("qformer",) * (len(configs) - (1 if schedule == "caption" else 2)) + ("pretrain", "sft")
    for stage, c in zip(names, configs):
        if workdir:
            c.checkpoint.init_from = workdir  # stage 2 starts from stage 1
        workdir = os.path.join(root, stage)
        prepare.prepare_run(c, workdir)
        summary = train.run(c, workdir)
    seconds = time.perf_counter() - t0
    result = dict(
        variant=variant, budget=budget, seed=seed, lr_scale=lr_scale, projector=projector, schedule=schedule,
        train_seconds=seconds, train_loss=float(summary["loss"]), **_projector_size(workdir),
        **metrics_of(summary, schedule),
    )  # fmt: skip
    os.makedirs(root, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
    headline = HEADLINE[schedule]
    log(f"{name}: {seconds:.0f} s, {headline} {result.get(headline, float('nan')):.3f}")
    return result


def _projector_size(workdir: str) -> dict[str, Any]:
    """Tokens, parameter count and forward FLOPs per image of the run's projector (from model.json;
    MG-LLaVA: its ParGo's, the ConvNeXt path and the box projector not counted)."""
    import jax

    from pargo_jax import runs
    from pargo_jax.models.projectors import projector_module

    mcfg = runs.read_model_config(workdir)
    n = mcfg.vision.num_tokens
    x = jax.ShapeDtypeStruct((1, n, mcfg.projector.vision_width), np.float32)
    extra = {}
    if mcfg.detail:  # X-Former: the MAE's tokens (its patches + CLS)
        extra["detail"] = jax.ShapeDtypeStruct(
            (1, mcfg.detail.mae.num_patches + 1, mcfg.detail.mae.width), np.float32
        )
    shapes = jax.eval_shape(projector_module(mcfg.projector).init, jax.random.key(0), x, **extra)
    params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(shapes))
    return dict(tokens=mcfg.num_image_tokens, params=params, gflops=mcfg.projector.flops(n) / 1e9)


def summarize(results: list[dict]) -> list[dict]:
    """One row per (variant, budget): the LR with the lowest mean final training loss, its mean / std
    over seeds per metric."""
    groups: dict[tuple, dict[float, list[dict]]] = {}
    for r in results:
        groups.setdefault((r["variant"], r["budget"]), {}).setdefault(r["lr_scale"], []).append(r)
    rows = []
    for (variant, budget), by_lr in groups.items():
        lr, runs = min(by_lr.items(), key=lambda kv: np.mean([r["train_loss"] for r in kv[1]]))
        first = runs[0]
        p = first["projector"]
        row = dict(
            variant=variant, budget=budget, lr_scale=lr, seeds=len(runs), tokens=first["tokens"],
            split=f"{p['num_partial']}+{p['num_global']}" if p["name"] == "pargo" else "",
            params=first["params"], gflops=first["gflops"],
            train_seconds=float(np.mean([r["train_seconds"] for r in runs])),
        )  # fmt: skip
        for k in METRICS:
            values = [r[k] for r in runs if k in r]
            if values:
                row[k], row[f"{k}_std"] = float(np.mean(values)), float(np.std(values))
        rows.append(row)
    return sorted(rows, key=lambda r: (r["budget"], r["variant"]))


def markdown(rows: list[dict]) -> str:
    kinds = [k for k in METRICS if any(k in r for r in rows)]
    head = ["projector", "tokens", *kinds, "params", "MFLOPs", "lr x", "seeds", "s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r[k]:.3f} ± {r[k + '_std']:.3f}" if k in r else "-" for k in kinds]
        name = f"{r['variant']} ({r['split']})" if r["split"] else r["variant"]
        lines.append("| " + " | ".join([name, str(r["tokens"]), *cells, f"{r['params']:,}",
                     f"{r['gflops'] * 1e3:.2f}", f"{r['lr_scale']:g}", str(r["seeds"]),
                     f"{r['train_seconds']:.0f}"]) + " |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: str, metric: str = "accuracy") -> str | None:
    """``metric`` (mean +- std over seeds) against visual tokens, one line per variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in sorted({r["variant"] for r in rows}):
        pts = sorted((r["tokens"], r[metric], r[f"{metric}_std"]) for r in rows if r["variant"] == variant)
        if pts:
            t, a, s = zip(*pts)
            ax.errorbar(t, a, yerr=s, marker="o", capsize=3, label=variant)
    label = "held-out caption loss (lower is better)" if metric == "caption_loss" else f"shapes {metric}"
    ax.set(xlabel="visual tokens", ylabel=label, title="projectors at equal budgets")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plan_cells(budgets, variants, data: str, ablations_everywhere: bool) -> list[tuple[str, int]]:
    """(variant, budget) cells in order: a budget a variant cannot meet exactly, or one that gives the
    same projector as an earlier variant, is reported and left out; ParGo's ablations run at the
    smallest budget only unless ``ablations_everywhere``."""
    cells = []
    for t in budgets:
        seen: dict[str, str] = {}
        for v in variants:
            options = projector_options(v, t, data)
            key = json.dumps([options, v == "mg_llava", v.endswith("_norecon")], sort_keys=True)
            if v in ABLATIONS and t != min(budgets) and not ablations_everywhere:
                continue
            if options is None:
                print(f"{v} cannot make exactly {t} tokens from {num_patches(data)} patches: not run")
            elif key in seen:
                print(f"{v} at {t} tokens is the same projector as {seen[key]}: not run twice")
            else:
                seen[key] = v
                cells.append((v, t))
    return cells


def prepare_shared(out: str, data: str, quick: bool, schedule: str, variants=()) -> None:
    """Builds the shared data, demo tower (and X-Former's MAE) once, before runs start side by side."""
    from pargo_jax import prepare

    c = stage_configs(
        projector_options("xformer", 16, data), 0, 1.0, out, None, quick, data, False, schedule
    )[0]
    prepare.prepare_data(c, os.path.join(out, data))  # also the Q-Former's tokenizer
    prepare.prepare_demo_tower(c)
    if any(v.startswith("xformer") for v in variants):
        prepare.prepare_demo_mae(c)


def _trained(run: tuple, out: str, data: str, schedule: str) -> bool:
    """Whether ``run`` (variant, budget, seed, lr_scale) has its ``result.json`` (no process needed)."""
    return os.path.exists(os.path.join(out, data, schedule, run_name(*run), "result.json"))


def _done(result: dict) -> concurrent.futures.Future:
    future = concurrent.futures.Future()
    future.set_result(result)
    return future


def main(argv=None) -> dict:
    p = launcher.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_results/projectors")
    p.add_argument("--quick", action="store_true", help="tiny data, 4 steps a stage: a smoke run")
    p.add_argument("--schedule", default="caption", choices=tuple(HEADLINE), help="see the module doc")
    p.add_argument("--budgets", help="comma list of visual-token budgets")
    p.add_argument("--seeds", help="comma list of seeds")
    p.add_argument("--lrs", help="comma list of LR multipliers of the demo's stage LRs")
    p.add_argument("--variants", help=f"comma list of {sorted(VARIANTS)}")
    p.add_argument("--steps", type=int, help="steps per stage (default: caption 300, demo the demo's)")
    p.add_argument("--data", default="fine", choices=tuple(IMAGE_SIZE), help="shapes variant (fine: 128 px)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained side by side (processes)")
    p.add_argument(
        "--qformer-steps", type=int, help="stage-1 steps of the Q-Former variants (default: preset's)"
    )
    a = p.parse_args(argv)
    grid = dict(QUICK if a.quick else FULL)
    for key, cast in (("budgets", int), ("seeds", int), ("lrs", float), ("variants", str)):
        if getattr(a, key):
            grid[key] = tuple(cast(v) for v in getattr(a, key).split(","))
    unknown = set(grid["variants"]) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"Unknown variants {sorted(unknown)}; choose from {sorted(VARIANTS)}.")
    steps = a.steps or (4 if a.quick else DEFAULT_STEPS[a.schedule])
    cells = plan_cells(grid["budgets"], grid["variants"], a.data, ablations_everywhere=bool(a.variants))
    plan = [(v, t, s, lr) for v, t in cells for s in grid["seeds"] for lr in grid["lrs"]]
    t0 = time.perf_counter()
    prepare_shared(a.out, a.data, a.quick, a.schedule, grid["variants"])
    kw = dict(steps=steps, quick=a.quick, data=a.data, schedule=a.schedule, qformer_steps=a.qformer_steps)
    spawn = multiprocessing.get_context("spawn")  # a fresh JAX per run: no fork of a started runtime
    with concurrent.futures.ProcessPoolExecutor(max(1, a.jobs), mp_context=spawn) as pool:
        futures = [_done(train_one(*run, a.out, **kw)) if _trained(run, a.out, a.data, a.schedule)
                   else pool.submit(train_one, *run, a.out, **kw) for run in plan]  # fmt: skip
        for i, (run, future) in enumerate(zip(plan, futures)):
            print(f"[{i + 1}/{len(plan)}] {run_name(*run)}", flush=True)
            future.result()  # in plan order; a failed run stops the benchmark with its error
    results = [f.result() for f in futures]
    wall = time.perf_counter() - t0
    rows = summarize(results)
    table = markdown(rows)
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"projectors_{a.data}_{a.schedule}")
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    with open(stem + ".json", "w") as f:
        json.dump(dict(data=a.data, schedule=a.schedule, steps=steps, jobs=a.jobs, rows=rows, runs=results,
                       wall_seconds=wall), f, indent=1)  # fmt: skip
    png = plot(rows, stem + ".png", HEADLINE[a.schedule])
    print(table)
    print(
        f"{len(plan)} runs in {wall:.0f} s ({a.jobs} at a time); wrote {stem}.md, .json"
        + (", .png" if png else "")
    )
    return dict(rows=rows, runs=results)


if __name__ == "__main__":
    launcher.run_argparse(main)
