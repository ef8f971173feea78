"""Does TinyGroundingGPT's three-stage multi-scale recipe make the demo ground? The three stages
(``experiments/grounding.py:tinygroundinggpt_demo:1..3``) against the plain demo recipe
(``experiments/pretrain.py`` then ``experiments/sft.py``) at the same 4500 steps, the same model and the
same tokenizer (the multi-scale one, a superset of the shapes words), for each seed; the shapes
evaluation at the end of each: grounding Acc@0.5 and mean IoU, position, refer and every other kind.

  python -m pargo_jax.benchmarks.grounding --seeds 0,1 --out bench_results/grounding.json
  python -m pargo_jax.benchmarks.grounding --quick --out /tmp/g.json   # smoke: 1 seed, a few steps

A seed sets the run's seed and its demo tower's (one tower per seed, shared by both recipes). Each run's
workdir stays under ``--root`` so a rerun resumes.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from pargo_jax import launcher
from pargo_jax.benchmarks import report

KINDS = ("ground", "ground_miou", "position", "refer", "colour", "shape", "count", "accuracy")
RECIPES = {"plain": ("pretrain", "sft"), "three_stage": ("ground_1", "ground_2", "ground_3")}


def _args(argv=None):
    p = launcher.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--recipes", default="plain,three_stage")
    p.add_argument("--root", default="bench_results/grounding", help="workdirs and the shared data")
    p.add_argument("--quick", action="store_true", help="smoke: seed 0, 4 steps a stage, tiny data")
    p.add_argument("--out", default="bench_results/grounding.json")
    return p.parse_args(argv)


def stage_configs(recipe: str, seed: int, root: str, quick: bool):
    """(workdir name, config) of each stage of ``recipe`` for ``seed``, chained by ``init_from``."""
    from experiments import grounding, pretrain, sft

    data = os.path.join(root, "data")
    tokenizer = os.path.join(data, "multiscale_shapes_tokenizer")
    runs = os.path.join(root, f"seed{seed}", recipe)
    if recipe == "plain":
        configs = [pretrain.get_config("demo"), sft.get_config("demo")]
    else:
        configs = [grounding.get_config(f"tinygroundinggpt_demo:{s}") for s in (1, 2, 3)]
    out = []
    for i, (name, c) in enumerate(zip(RECIPES[recipe], configs, strict=True)):
        c.seed = seed
        c.demo_tower.seed = seed
        c.model.vision.path = os.path.join(root, f"seed{seed}", "demo_tower")
        c.multiscale = dict(grounding.DEMO_MULTISCALE)  # the plain recipe builds it too: the same tokenizer
        c.input.update(data_dir=data, tokenizer=tokenizer)
        c.sample_at_end = ""
        if i:
            c.checkpoint.init_from = os.path.join(runs, RECIPES[recipe][i - 1])
        if quick:
            c.total_steps, c.optim.warmup_steps, c.log_every_steps = 4, 1, 2
            c.demo_tower.steps, c.shapes.num_pretrain, c.shapes.num_sft = 20, 64, 64
            c.shapes.num_eval, c.multiscale.num, c.multiscale.num_eval = 16, 32, 8
            for ev in c.evals.values():
                ev.log_steps = 0
        out.append((os.path.join(runs, name), c))
    return out


def run_recipe(recipe: str, seed: int, root: str, quick: bool) -> dict:
    from pargo_jax import prepare, train

    t0 = time.perf_counter()
    summary = {}
    for workdir, config in stage_configs(recipe, seed, root, quick):
        print(f"[{recipe} seed {seed}] {os.path.basename(workdir)} ...", file=sys.stderr, flush=True)
        prepare.prepare_run(config, workdir)
        summary = train.run(config, workdir)
    shapes = {k.split("/")[-1]: v for k, v in summary.items() if k.startswith("eval/shapes/")}
    return dict(
        recipe=recipe, seed=seed, seconds=time.perf_counter() - t0, **{k: shapes.get(k) for k in KINDS}
    )


def table(rows: list[dict]) -> str:
    head = "| recipe | seeds | " + " | ".join(KINDS) + " |"
    lines = [head, "|" + "---|" * (len(KINDS) + 2)]
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        cells = []
        for k in KINDS:
            values = [r[k] for r in mine if r[k] is not None]
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.3f}{spread}" if values else "-")
        lines.append(f"| {recipe} | {','.join(str(r['seed']) for r in mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    a = _args(argv)
    seeds = [0] if a.quick else [int(s) for s in a.seeds.split(",")]
    rows = [run_recipe(r, s, a.root, a.quick) for s in seeds for r in a.recipes.split(",")]
    return report.finish(rows, table(rows), a, a.out)


if __name__ == "__main__":
    launcher.run_argparse(main)
