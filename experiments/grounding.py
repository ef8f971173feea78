"""TinyGroundingGPT's three stages of multi-scale alignment (arXiv 2411.09691): object texts, boxes and
object crops aligned at three scales, each stage starting from the last (``checkpoint.init_from``).

  G=experiments/grounding.py
  python -m pargo_jax.main --config=$G:tinygroundinggpt_demo:1 --workdir=workdir/ground_1
  python -m pargo_jax.main --config=$G:tinygroundinggpt_demo:2 --workdir=workdir/ground_2
  python -m pargo_jax.main --config=$G:tinygroundinggpt_demo:3 --workdir=workdir/ground_3
  python -m pargo_jax.main --config=$G:tinygroundinggpt:1 --workdir=gs://bucket/tg_1   # then :2, :3

Stages (``STAGES``; data from ``python -m data_pipelines.build --dataset multiscale``):
  1. object and relation perception: referring expression <-> box, box -> name, grounded captions,
     relations between boxed objects (``perception`` records), beside image captions;
  2. multi-scale local alignment: object crops as extra images <-> their names and boxes (``local``), with
     the perception records;
  3. detailed global alignment: descriptions naming every object with its box (``global``), beside the
     instruction data.

``tinygroundinggpt``: CLIP-L/14-336, LLaVA-1.5's MLP, Qwen2.5-3B-Instruct (``base.tinygroundinggpt_model``);
sources are multi-scale builds of RefCOCO and COCO (+ LLaVA data for stages 1 and 3), RefCOCO REC is
evaluated with the grounding evaluator. The paper states the stages, what trains in each (stage 1: the
projector, then projector + LLM) and their data kinds; it gives no batch sizes, learning rates, step
counts or mixture weights here, so those are GroundingGPT / LLaVA-1.5's values or guesses, each marked.
``tinygroundinggpt_demo``: the demo's model (``base.demo_model``) on the shapes set's multi-scale records
(built on first run), 1500 + 1000 + 2000 steps: the demo's 4500 (pretrain 2000 + SFT 2500), so
``python -m pargo_jax.benchmarks.grounding`` can compare the two recipes at equal steps.
"""

import ml_collections

from experiments import base, evals
from pargo_jax.configs import ConfigError

PRESETS = ("tinygroundinggpt", "tinygroundinggpt_demo")
# Per stage: sources as (dataset name, split, weight), steps, lr, max_len, images per sample.
P, L, G = ("multiscale_shapes/" + c for c in ("perception", "local", "global"))
RP, RL, CP, CL, CG = (
    "multiscale_refcoco/perception",
    "multiscale_refcoco/local",
    "multiscale_coco/perception",
    "multiscale_coco/local",
    "multiscale_coco/global",
)
DEMO_STAGES = {
    1: dict(steps=1500, lr=1e-3, max_len=128, max_images=1,
            sources=[(P, "train", 1.0), ("shapes", "pretrain", 1.0)]),
    2: dict(steps=1000, lr=6e-4, max_len=192, max_images=4,
            sources=[(L, "train", 1.0), (P, "train", 1.0)]),
    3: dict(steps=2000, lr=6e-4, max_len=128, max_images=1,
            sources=[(G, "train", 0.5), ("shapes", "sft", 1.0)]),
}  # fmt: skip
REAL_STAGES = {
    # stage 1: LLaVA-1.5's pretraining optimizer (lr 1e-3, batch 256, one epoch) - a guess for this paper
    1: dict(steps=5000, lr=1e-3, batch=256, max_images=1, trainable={"projector/.*": 1.0},
            sources=[(RP, "train", 1.0), (CP, "train", 1.0), ("llava/pretrain", "train", 1.0)]),
    # stages 2 and 3: projector + LLM at LLaVA-1.5's SFT lr 2e-5, batch 128 - guesses. Stage 2's local
    # records hold 1 + max_crops + 3 choices images of 576 tokens: build them with --max_crops 1 (5 images)
    2: dict(steps=5000, lr=2e-5, batch=128, max_images=5, max_len=4096,
            trainable={"projector/.*": 1.0, "llm/.*": 1.0},
            sources=[(RL, "train", 1.0), (CL, "train", 1.0), (RP, "train", 0.5)]),
    3: dict(steps=5200, lr=2e-5, batch=128, max_images=1, trainable={"projector/.*": 1.0, "llm/.*": 1.0},
            sources=[(CG, "train", 0.5), ("llava/instruct", "train", 1.0)]),
}  # fmt: skip
DEMO_MULTISCALE = dict(
    num=4000, num_eval=200, image_size=64, seed=0, max_objects=4, max_crops=1, num_choices=2
)


def parse(arg: str | None) -> tuple[str, int]:
    """``"PRESET:STAGE"`` (stage 1, 2 or 3; default the demo's stage 1)."""
    name, _, stage = (arg or "tinygroundinggpt_demo:1").partition(":")
    if name not in PRESETS or stage not in ("", "1", "2", "3"):
        raise ConfigError(f"unknown grounding preset {arg!r}; use PRESET:STAGE with PRESET one of {PRESETS}, "
                          "STAGE 1, 2 or 3")  # fmt: skip
    return name, int(stage or 1)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name, stage = parse(arg)
    c = base.base()
    demo = name == "tinygroundinggpt_demo"
    (base.demo_model if demo else base.tinygroundinggpt_model)(c)
    s = (DEMO_STAGES if demo else REAL_STAGES)[stage]
    base.set_steps(c, total=s["steps"], warmup=50 if demo else 150)
    c.optim.lr = s["lr"]
    c.input.sources = [dict(name=n, split=split, weight=w) for n, split, w in s["sources"]]
    c.input.max_images = s["max_images"]
    if stage > 1:
        c.checkpoint.init_from = f"workdir/ground_{stage - 1}"
    if demo:
        c.multiscale = dict(DEMO_MULTISCALE)
        c.log_every_steps = 100
        c.input.max_len = s["max_len"]
        c.trainable = base.regex_dict({"vision_tower/.*": 0.3, "projector/.*": 1.0, "llm/.*": 1.0})
        c.checkpoint.init_from_parts = ("vision_tower", "projector", "llm")
        c.evals = evals.get_config("shapes") if stage == 3 else ml_collections.ConfigDict()
        if stage == 3:
            c.evals.shapes.log_steps = 1000
    else:
        c.input.update(batch_size=s["batch"], data_dir="data", max_len=s.get("max_len", c.input.max_len))
        c.trainable = base.regex_dict(s["trainable"])
        c.checkpoint.init_from_parts = ("projector",) if stage == 2 else ("projector", "llm")
        c.evals = evals.get_config("refcoco") if stage == 3 else ml_collections.ConfigDict()
    return c
