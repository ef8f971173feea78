"""ParGo's claim in a test that can tell: projectors at equal visual-token budgets answering direct
fine-detail questions, 5 seeds a cell; the 13-cell CPU grid, about 1 h 44 min on a slow 2-core VM.

  python -m pargo_jax.benchmarks.projector_grid --workers 2       # the grid, sized for a 2-core CPU
  python -m pargo_jax.benchmarks.projector_grid --device gpu      # aimed at 10 min on a GPU; never run
  python -m pargo_jax.benchmarks.projector_grid --quick           # smoke run (CI), seconds
  python -m pargo_jax.benchmarks.projector_grid --variants pargo,qformer --budgets 64 --seeds 0,1,2

The protocol, and why each part is there:

1. Tower features once. The frozen demo tower, pretrained once per ``--out`` on the shapes set's
   ``fine`` variant (128 px, 5-8 small shapes and a 2-digit number; shared with
   :mod:`pargo_jax.benchmarks.projectors`), encodes every image once. Runs read the cached
   (N, 256, 64) features instead of running the tower. X-Former's MAE (pretrained once per ``--out``
   too) gives its tokens the same way.
2. Direct questions on the fine kinds, as dialogues. Each scene is asked one question of each kind in
   :data:`ASKED`: read the number, the colour of the k-th shape from the left, a left-of relation, the
   count. A training example is a scene's four questions as one conversation, in an order drawn per
   scene (the image tokens run through the LLM once for four answers: 4x the answers per step at
   about 1.5x its cost); a held-out question is its own one-turn conversation. Rendered compactly
   (``--template compact``: a question, a newline, the answer, the end-of-turn token; the demo's
   ChatML puts 5 tokens around each message: a 64-token dialogue is 172 tokens in it, 132 compact,
   the step 0.76x, and ParGo's k-th colour at 1000 steps 0.43 against 0.36) by the training pipeline's own
   :func:`data_pipelines.text.pack_example`, with the loss on the answers. ``--order-turn N`` adds a
   training turn, never scored: the colours of the N leftmost shapes in order (what taught the k-th
   colour in the pilots; every size asks it for 3). It is drawn among the turns too: fixed last,
   first or before the k-th question, it taught the k-th colour worse. ``--caption-steps`` puts a
   caption stage first (the demo's stage 1 on the fine variant's ``pretrain`` split, one LR schedule
   over both); at equal time it read the number worse in the pilots, so no size uses it.
3. Seeds as one program. The seeds of a cell (projector + LLM, each seed with its own init and data
   order) train together: their params are stacked on a leading axis and the step is ``vmap``-ed, so
   the small matmuls of one run become larger ones. No dropout.
4. Held-out score. Exact match on held-out scenes by teacher forcing: an answer counts when each of its
   tokens, the end of turn included, is the argmax after the ones before it, which is what greedy
   decoding answers.
5. Statistics. Per cell and kind: the mean over seeds with its 95% t interval; per budget, ParGo minus
   Q-Former with a Welch 95% interval.

Outputs in ``--out``: ``projector_grid_<size>.md`` (the tables, the fine-detail goal, the training
FLOPs by XLA's count and the rate reached), ``.json`` (every seed's accuracies, each cell's FLOPs and
seconds, the settings, the wall time), ``.png`` (accuracy per kind, needs matplotlib),
and one JSON per finished cell under ``projector_grid_<size>/``: a rerun at the same size does not
retrain them. A size changed by a flag (``--steps``, ``--seeds``, ...) writes beside them, under a
suffix of its own (:func:`output_stem`); a ``--variants`` or ``--budgets`` subset shares the cells and
names its tables by its variants and budgets. ``--workers 2`` trains the cells in two processes, one
core each (:mod:`pargo_jax.benchmarks.workers`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pargo_jax import launcher
from pargo_jax.benchmarks import projectors, workers

ASKED = ("digit", "kth", "relation", "count")  # the fine kinds: one question of each per scene
KINDS = ("digit", "kth", "relation", "count", "colour", "shape", "position")  # as scored (a fallback
# question is scored as what it asks: an ambiguous colour question becomes a position question)
FINE_KINDS, GOAL = ("digit", "kth"), 0.6  # the goal: the best projector at 64 tokens reaches it on both
REFERENCE, BASELINE = "pargo", "qformer"  # the difference the table reports
DATA = "fine"
# Grid sizes: scenes (train, held-out), whether a training example is a scene's whole dialogue (else one
# question), how many shapes a dialogue's ordering turn lists (0: none), the rendering (TEMPLATES), steps,
# per-seed batch, seeds, budgets, and the MLP at its natural count (one token per patch) besides the budgets.
SIZES = {
    "cpu": dict(train=4000, eval=400, dialogue=True, order_turn=3, template="compact", caption_steps=0,
                qa_steps=1000, batch=16, seeds=(0, 1, 2, 3, 4), budgets=(16, 64), ablation_budgets=(64,),
                natural_mlp=False),
    "gpu": dict(train=20000, eval=1000, dialogue=True, order_turn=3, template="compact", caption_steps=0,
                qa_steps=4000, batch=32, seeds=tuple(range(8)), budgets=(16, 64), ablation_budgets=(16, 64),
                natural_mlp=True),
    "quick": dict(train=32, eval=8, dialogue=True, order_turn=3, template="compact", caption_steps=2,
                  qa_steps=2, batch=4, seeds=(0, 1), budgets=(16,), ablation_budgets=(16,),
                  natural_mlp=False),
}  # fmt: skip
GRID_KEYS = ("budgets", "ablation_budgets", "natural_mlp")  # which cells a grid plans, not how they train
MODULE = "pargo_jax.benchmarks.projector_grid"  # what --workers runs
QUICK_VARIANTS = ("pargo", "qformer", "xformer")
# BLIP-2's Q-Former and X-Former (the Q-Former + an MAE by dual cross-attention) as every projector here:
# one stage from random init (no ITC / ITM / ITG, no reconstruction); X-Former reads cached MAE tokens.
# Their pair tells what X-Former's MAE adds. MG-LLaVA: ParGo over the tower fused with a random frozen
# ConvNeXt at 4x the pixels, + 4 box tokens from the scene's own boxes (its ``mg_llava_demo`` shape; its
# inputs cached like the tower's). In the ``gpu`` grid by default; ``--variants`` elsewhere. X-Former
# without reconstruction is not in the grid (it has no stage 1 here).
QFORMER_PAIR = ("blip2", "xformer")
SECOND_PATHS = (*QFORMER_PAIR, "mg_llava")
SUPPORTED = tuple(v for v in projectors.VARIANTS if v != "xformer_norecon")
# what a cell reads per scene: the tower's features, X-Former's MAE tokens, MG-LLaVA's ConvNeXt map and boxes
VISUAL = ("features", "detail", "high_res", "box_features")
LR, WARMUP = 1e-3, 100  # the demo's stage-1 LR; warmup capped at a quarter of the steps
# How a conversation is rendered: "chat", the demo tokenizer's ChatML template (5 tokens around each
# message); "compact", a question then a newline, an answer then the end-of-turn token (1 each).
TEMPLATES = {
    "chat": None,
    "compact": "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ message['content'] + '\\n' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}",
}


# --- data ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Scenes:
    """Images (N, S, S, 3) uint8, each scene's object boxes (pixels, as its record lists them) and, per
    question, its scene, kind, text and answer."""

    images: np.ndarray
    scene: np.ndarray
    kinds: list[str]
    messages: list[list[dict[str, str]]]
    boxes: list[np.ndarray]


def make_scenes(split: str, num: int, image_size: int, dialogue: bool = False, order_turn: int = 0) -> Scenes:
    """``num`` scenes of the fine variant's ``split``, asked one question of each :data:`ASKED` kind:
    each its own one-turn conversation (scoring), or with ``dialogue`` all of a scene's questions as one
    conversation, its turns in an order drawn from the scene (training: the image is read once for
    four answers). ``order_turn``: a dialogue also asks the colours of that many leftmost shapes."""
    from PIL import Image

    from data_pipelines import shapes

    images, scene, kinds, messages, boxes = [], [], [], [], []
    for i in range(num):
        rng, objects, number, png = shapes.make_scene(split, i, image_size=image_size, variant=DATA)
        images.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
        boxes.append(np.array([o["box"] for o in objects], np.float32).reshape(-1, 4))
        asked = [shapes.question(kind, objects, rng, image_size, number) for kind in ASKED]
        if dialogue and order_turn:
            asked.append(shapes.order_question(objects, order_turn))
        if dialogue:
            rng.shuffle(asked)
            conversations = [[turn for q, a in asked for turn in _turn(q, a)]]
        else:
            conversations = [_turn(q, a) for q, a in asked]
        for conversation in conversations:
            question = conversation[0]["content"]
            conversation[0]["content"] = f"{shapes.IMAGE_PLACEHOLDER}\n{question}"
            scene.append(i)  # a fallback question is scored as what it asks
            kinds.append("dialogue" if dialogue else shapes.KINDS[shapes.question_kind(question)])
            messages.append(conversation)
    return Scenes(np.stack(images), np.asarray(scene, np.int32), kinds, messages, boxes)


def _turn(question: str, answer: str) -> list[dict[str, str]]:
    return [dict(role="user", content=question), dict(role="assistant", content=answer)]


def make_captions(num: int, image_size: int) -> Scenes:
    """``num`` captioned scenes of the fine variant's ``pretrain`` split, as the demo's stage 1 reads
    them (every object in order, then the number)."""
    from PIL import Image

    from data_pipelines import shapes

    records = [shapes.make_record("pretrain", i, image_size=image_size, variant=DATA) for i in range(num)]
    images = np.stack([np.asarray(Image.open(io.BytesIO(r.image)).convert("RGB")) for r in records])
    captions, boxes = [r.messages() for r in records], [r.boxes for r in records]
    return Scenes(images, np.arange(num, dtype=np.int32), ["caption"] * num, captions, boxes)


def tokenize(
    scenes: Scenes, tokenizer, num_image_tokens: int, template: str = "chat"
) -> dict[str, np.ndarray]:
    """Every question rendered by the :data:`TEMPLATES` entry ``template`` and the training pipeline's
    :func:`pack_example`, padded to the longest."""
    from data_pipelines.text import pack_example

    if TEMPLATES[template]:
        tokenizer = tokenizer.with_chat_template(TEMPLATES[template])
    arrays = [
        pack_example(tokenizer, m, num_image_tokens=num_image_tokens, max_len=4096) for m in scenes.messages
    ]
    length = max(int(a["length"]) for a in arrays)
    keys = ("input_ids", "targets", "loss_mask", "attention_mask")
    return {k: np.stack([a[k][:length] for a in arrays]) for k in keys} | {"scene": scenes.scene}


def tower_features(mcfg, tower_params, images: np.ndarray, batch: int = 128) -> np.ndarray:
    """The frozen tower's features (N, patches, width) of uint8 ``images``, normalized as the model
    does."""
    encode = lambda m, x: m.vision_tower(m.normalized(x))
    return _encoded(mcfg, {"vision_tower": tower_params}, encode, _batches(batch, images))


def detail_tokens(mcfg, mae_params, images: np.ndarray, batch: int = 128) -> np.ndarray:
    """X-Former's MAE tokens (N, L, width) of uint8 ``images``: every patch, the MAE's own pixels, as
    :class:`VisionLanguageModel` feeds its projector."""
    encode = lambda m, x: m.detail_tower.encode(m.detail_pixels(m.normalized(x)))[0]
    return _encoded(mcfg, {"detail_tower": mae_params}, encode, _batches(batch, images))


def random_convnext(mcfg) -> dict:
    """MG-LLaVA's ConvNeXt as the ``mg_llava_demo`` preset has it: random and frozen. One init (key 0)
    serves every seed of the grid."""
    import jax
    from flax import linen as nn

    from pargo_jax.models.mllm import VisionLanguageModel

    size = mcfg.high_res.tower.image_size
    convnext = lambda m, x: m.high_res_tower(m.normalized(x))
    blank = np.zeros((1, size, size, 3), np.uint8)
    return nn.unbox(VisionLanguageModel(mcfg).init(jax.random.key(0), blank, method=convnext))["params"][
        "high_res_tower"
    ]


def mg_llava_inputs(
    mcfg, params: dict, scenes: Scenes, resize: str, batch: int = 64
) -> dict[str, np.ndarray]:
    """MG-LLaVA's frozen inputs per scene (:meth:`VisionLanguageModel.high_res_inputs` with ``params``
    of its ``vision_tower`` and ``high_res_tower``), each image resized to the ConvNeXt's size by the
    ``resize`` mode and its boxes placed as the input pipeline does them, and how many of its box slots
    are real (``real_boxes``)."""
    from PIL import Image

    from data_pipelines import detections
    from data_pipelines import images as image_ops

    h = mcfg.high_res
    size = h.tower.image_size
    pixels = lambda x: np.asarray(image_ops.resize(Image.fromarray(x), size, resize))
    placed = [detections.prepare_boxes(b, x.shape[1], x.shape[0], size, resize, h.max_boxes)
              for b, x in zip(scenes.boxes, scenes.images)]  # fmt: skip
    batches = (
        (
            np.stack([pixels(x) for x in scenes.images[i : i + batch]]),
            np.stack([boxes for boxes, _ in placed[i : i + batch]]),
        )
        for i in range(0, len(scenes.images), batch)
    )
    inputs = _encoded(mcfg, params, lambda m, x, b: m.high_res_inputs(m.normalized(x), b), batches)
    return inputs | {"real_boxes": np.array([real for _, real in placed], np.int32)}


def _batches(batch: int, images: np.ndarray):
    return ((images[i : i + batch],) for i in range(0, len(images), batch))


def _encoded(mcfg, params: dict, method: Callable, batches) -> Any:
    """``method`` of :class:`VisionLanguageModel` with ``params``, jitted, over each tuple of arguments in
    ``batches``; its outputs (arrays or a dict of them) concatenated."""
    import jax

    from pargo_jax.models.mllm import VisionLanguageModel

    run = jax.jit(lambda p, *x: VisionLanguageModel(mcfg).apply({"params": p}, *x, method=method))
    parts = [jax.tree.map(np.asarray, run(params, *args)) for args in batches]
    return jax.tree.map(lambda *x: np.concatenate(x), *parts)


# --- seeds as one program ------------------------------------------------------------------------------
def forward(mcfg) -> Callable:
    """``logits(params, visual, input_ids, attention_mask)``: the projector's tokens spliced into the
    text and run through the LLM, as :class:`VisionLanguageModel` does after its tower. ``visual``: the
    tower's features, or a dict of them (``features``) and X-Former's MAE tokens (``detail``), or
    MG-LLaVA's :func:`mg_llava_inputs`."""
    from flax import linen as nn

    from pargo_jax.models.mllm import VisionLanguageModel, splice_image_tokens

    model = VisionLanguageModel(mcfg)

    def body(m, visual, input_ids, attention_mask):
        visual = dict(visual) if isinstance(visual, dict) else {"features": visual}
        if mcfg.high_res:
            tokens = m.high_res_tokens(**visual)
        else:
            tokens = m.projector(visual.pop("features"), deterministic=True, **visual)
        embeds = splice_image_tokens(m.llm.embed(input_ids), tokens, input_ids, mcfg.image_token_id)
        return m.llm(inputs_embeds=embeds, attention_mask=attention_mask)

    apply, init = nn.apply(body, model), nn.init(body, model)
    logits = lambda params, *x: apply({"params": params}, *x)
    logits.init = lambda key, *x: nn.unbox(init(key, *x))["params"]
    return logits


def _batch(data: dict, index):
    """Rows ``index`` of the question arrays with their scenes' :data:`VISUAL` inputs."""
    rows = {k: data[k][index] for k in ("input_ids", "targets", "loss_mask", "attention_mask")}
    scenes = data["scene"][index]
    return {k: data[k][scenes] for k in VISUAL if k in data}, rows


class SeedProgram:
    """One cell's seeds trained and scored as one vmapped program."""

    def __init__(self, mcfg, seeds: Sequence[int], steps: int, lr: float = LR):
        import jax
        import optax

        from pargo_jax import optim
        from pargo_jax.models.mllm import next_token_loss

        self.seeds, self.steps = tuple(seeds), steps
        self.train_flops: float | None = None  # XLA's count for every seed's steps, set by train
        self.logits = forward(mcfg)
        self.optim_cfg = dict(lr=lr, warmup_steps=min(WARMUP, steps // 4), total_steps=steps, clip_norm=1.0)
        self._tx = None

        def loss(params, visual, rows):
            logits = self.logits(params, visual, rows["input_ids"], rows["attention_mask"])
            total, count = next_token_loss(logits, rows["targets"], rows["loss_mask"])
            return total / count

        def one(params, opt_state, data, index):
            visual, rows = _batch(data, index)
            value, grads = jax.value_and_grad(loss)(params, visual, rows)
            updates, opt_state = self._tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, value

        def chunk(state, data, indices):  # indices (K, R, B): K steps of each seed's batch
            def step(state, index):
                params, opt_state, value = jax.vmap(one, in_axes=(0, 0, None, 0))(*state, data, index)
                return (params, opt_state), value

            return jax.lax.scan(step, state, indices)

        def correct(params, data, index):  # (R, E): every answer token the argmax
            visual, rows = _batch(data, index)

            def of(p):
                predicted = self.logits(p, visual, rows["input_ids"], rows["attention_mask"]).argmax(-1)
                return ((predicted == rows["targets"]) | (rows["loss_mask"] == 0)).all(-1)

            return jax.vmap(of)(params)

        self._make_tx = lambda params: optim.make_optimizer(self.optim_cfg, params, {".*": 1.0})[0]
        self._chunk = jax.jit(chunk, donate_argnums=0)
        self._correct = jax.jit(correct)

    def init(self, data: dict):
        """Stacked params and optimizer states, one per seed (each seed its own init)."""
        import jax

        visual, rows = _batch(data, np.arange(1))
        init = lambda key: self.logits.init(key, visual, rows["input_ids"], rows["attention_mask"])
        params = jax.jit(jax.vmap(init))(jax.vmap(jax.random.key)(np.asarray(self.seeds)))
        self._tx = self._make_tx(jax.tree.map(lambda x: x[0], params))
        return params, jax.jit(jax.vmap(self._tx.init))(params)

    def order(self, num: int, batch: int, steps: int, phase: int = 0) -> np.ndarray:
        """(steps, seeds, batch) example indices of a phase: each seed its own shuffled epochs."""
        out = np.empty((steps, len(self.seeds), batch), np.int32)
        for r, seed in enumerate(self.seeds):
            rng = np.random.default_rng((seed, phase))
            stream = np.concatenate([rng.permutation(num) for _ in range(-(-steps * batch // num))])
            out[:, r] = stream[: steps * batch].reshape(steps, batch)
        return out

    def train(
        self, phases: Sequence[tuple[str, dict, int]], batch: int, log: Callable[[str], Any] = print,
        chunk: int = 100,
    ):  # fmt: skip
        """Stacked params trained on ``phases``, (name, data, steps) in order under one LR schedule
        (their steps add up to ``steps``); logs each seed's mean loss every ``chunk`` steps."""
        if sum(n for _, _, n in phases) != self.steps:
            raise ValueError(f"The phases' steps {[n for _, _, n in phases]} do not add up to {self.steps}.")
        state = self.init(phases[0][1])
        counts = [(n, self.step_flops(state, data, batch)) for _, data, n in phases]
        self.train_flops = None if any(f is None for _, f in counts) else sum(n * f for n, f in counts)
        t0 = time.perf_counter()
        for phase, (name, data, steps) in enumerate(phases):
            order = self.order(len(data["scene"]), batch, steps, phase)
            for start in range(0, steps, chunk):
                state, losses = self._chunk(state, data, order[start : start + chunk])
                means = " ".join(f"{x:.3f}" for x in np.asarray(losses).mean(0))
                done = min(start + chunk, steps)
                log(f"  {name} {done}/{steps} | loss per seed {means} | {time.perf_counter() - t0:.0f} s")
        return state[0]

    def step_flops(self, state, data: dict, batch: int) -> float | None:
        """XLA's FLOP count of one training step of every seed on ``data`` (a one-step chunk, lowered, not
        compiled); None where the backend gives no count."""
        from pargo_jax.flops import xla_flops

        return xla_flops(self._chunk.lower(state, data, self.order(len(data["scene"]), batch, 1)))

    def correct(self, params, data: dict, batch: int = 256) -> np.ndarray:
        """(seeds, questions) booleans: whether each seed answers each question exactly."""
        n = len(data["scene"])
        return np.concatenate(
            [
                np.asarray(self._correct(params, data, np.arange(i, min(i + batch, n))))
                for i in range(0, n, batch)
            ],
            axis=1,
        )


# --- statistics -----------------------------------------------------------------------------------------
# Student's t 0.975 quantiles for 1..30 degrees of freedom (a printed table); beyond, the normal's.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)  # fmt: skip


def t975(df: float) -> float:
    """The t quantile at ``floor(df)`` degrees of freedom (rounding down widens the interval)."""
    k = int(math.floor(df))
    return math.inf if k < 1 else T975[k - 1] if k <= len(T975) else 1.960


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% t interval) over seeds."""
    x = np.asarray(values, np.float64)
    if len(x) < 2:
        return float(x.mean()), math.inf
    return float(x.mean()), t975(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))


def difference_interval(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(mean(a) - mean(b), half-width of Welch's 95% interval)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if min(len(a), len(b)) < 2:
        return float(a.mean() - b.mean()), math.inf
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return float(a.mean() - b.mean()), 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(a.mean() - b.mean()), t975(df) * se


# --- the grid -------------------------------------------------------------------------------------------
def cell_name(variant: str, budget: int) -> str:
    return f"{variant}-t{budget}"


def cell_model(variant: str, budget: int, out: str, quick: bool):
    """(config, MLLMConfig, tokenizer) of a cell: the demo preset with this projector on the fine data."""
    from data_pipelines.text import load_tokenizer
    from pargo_jax import prepare, runs

    projector = projectors.projector_options(variant, budget, DATA)
    if projector["name"] == "c_abstractor":  # vmapped over seeds, its native depthwise conv is 20x slower
        projector["depthwise"] = "views"
    mg_llava = variant == "mg_llava"
    c = projectors.stage_configs(projector, 0, 1.0, out, None, quick, DATA, mg_llava=mg_llava)[-1]
    if mg_llava:  # the Conv-Gate's 7x7 depthwise conv, the same: vmapped, its native form is that slow too
        c.model.high_res.fusion.depthwise = "views"
    prepare.prepare_data(c, os.path.join(out, DATA))  # built by projectors.prepare_shared: sets the tokenizer
    tokenizer = load_tokenizer(c.input.tokenizer)
    return c, runs.model_config(c, tokenizer), tokenizer


def accuracies(correct: np.ndarray, kinds: Sequence[str]) -> dict[str, list[float]]:
    """Per kind (and ``all``): each seed's share of exact answers, from (seeds, questions) booleans."""
    kinds = np.asarray(kinds)
    out = {k: correct[:, kinds == k].mean(1).tolist() for k in KINDS if (kinds == k).any()}
    return out | {"all": correct.mean(1).tolist()}


def run_cell(variant, budget, size, out, quick, scenes, visual, log=print) -> dict:
    """Trains and scores one cell's seeds on ``visual[split]`` (:data:`VISUAL` arrays, per scene); its row
    of accuracies per kind and seed."""
    import jax

    c, mcfg, tokenizer = cell_model(variant, budget, out, quick)
    sets = {}
    for split in scenes:
        arrays = tokenize(scenes[split], tokenizer, mcfg.num_image_tokens, size["template"])
        inputs = cell_inputs(mcfg, visual[split], arrays)
        sets[split] = jax.device_put(arrays | inputs)
    t0 = time.perf_counter()
    phases = [("caption", sets["caption"], size["caption_steps"])] if size["caption_steps"] else []
    phases.append(("qa", sets["train"], size["qa_steps"]))
    program = SeedProgram(mcfg, size["seeds"], size["caption_steps"] + size["qa_steps"])
    params = program.train(phases, size["batch"], log=log, chunk=log_every(size["qa_steps"]))
    correct = program.correct(params, sets["eval"])
    return dict(
        variant=variant, budget=budget, tokens=mcfg.num_image_tokens, seeds=list(size["seeds"]),
        seconds=time.perf_counter() - t0, train_flops=program.train_flops,
        sequence=int(sets["train"]["input_ids"].shape[1]),
        split=_split(c.model.projector), accuracy=accuracies(correct, scenes["eval"].kinds),
    )  # fmt: skip


def cell_inputs(mcfg, visual: dict, arrays: dict) -> dict[str, np.ndarray]:
    """What a cell's model reads of a split's cached ``visual`` inputs (MG-LLaVA's under ``mg_llava``);
    for MG-LLaVA, the slots of absent boxes masked out of ``arrays``' attention, as the pipeline does."""
    from data_pipelines import detections

    if not mcfg.high_res:
        return {k: visual[k] for k in (("features", "detail") if mcfg.detail else ("features",))}
    inputs, slots = visual["mg_llava"], mcfg.high_res.max_boxes
    for row, scene in enumerate(arrays["scene"]):
        real = int(inputs["real_boxes"][scene])
        detections.mask_box_slots(arrays["input_ids"][row], arrays["attention_mask"][row], real, slots,
                                  mcfg.image_token_id)  # fmt: skip
    return {k: inputs[k] for k in VISUAL if k in inputs}


def log_every(steps: int) -> int:
    """The most steps <= 100 that divide ``steps`` into at least 4 chunks (one compiled chunk size)."""
    return max(d for d in range(1, max(1, min(100, steps // 4)) + 1) if steps % d == 0)


def _split(p) -> str:
    return f"{p['num_partial']}+{p['num_global']}" if p.get("name") == "pargo" else ""


def _cell(mean: float, half: float) -> str:
    return f"{mean:.3f} ± {half:.3f}" if math.isfinite(half) else f"{mean:.3f}"


def table(rows: list[dict]) -> str:
    """Mean and 95% t interval over seeds per kind, one row per cell."""
    kinds = [k for k in (*KINDS, "all") if any(k in r["accuracy"] for r in rows)]
    head = ["projector", "tokens", *kinds, "seeds", "s / cell"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["tokens"], r["variant"])):
        name = f"{r['variant']} ({r['split']})" if r["split"] else r["variant"]
        cells = [_cell(*mean_interval(r["accuracy"][k])) if k in r["accuracy"] else "-" for k in kinds]
        lines.append("| " + " | ".join([name, str(r["tokens"]), *cells, str(len(r["seeds"])),
                                        f"{r['seconds']:.0f}"]) + " |")  # fmt: skip
    return "\n".join(lines)


def differences(rows: list[dict], a: str = REFERENCE, b: str = BASELINE) -> str:
    """``a`` minus ``b`` per budget and kind with Welch's 95% interval (bold: the interval excludes 0)."""
    by = {(r["variant"], r["budget"]): r for r in rows}
    budgets = sorted({t for v, t in by if v == a and (b, t) in by})
    if not budgets:
        return ""
    kinds = [k for k in (*KINDS, "all") if k in by[(a, budgets[0])]["accuracy"]]
    lines = [f"| {a} - {b} | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
    for t in budgets:
        cells = []
        for k in kinds:
            d, half = difference_interval(by[(a, t)]["accuracy"][k], by[(b, t)]["accuracy"][k])
            text = f"{d:+.3f} ± {half:.3f}" if math.isfinite(half) else f"{d:+.3f}"
            cells.append(f"**{text}**" if abs(d) > half else text)
        lines.append(f"| {t} tokens | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal(rows: list[dict], tokens: int = 64) -> str:
    """The best projector's mean at ``tokens`` on each of :data:`FINE_KINDS`, against :data:`GOAL`."""
    mine = [r for r in rows if r["tokens"] == tokens]
    mean = lambda r, k: float(np.mean(r["accuracy"][k])) if k in r["accuracy"] else 0.0
    best = {k: max(mine, key=lambda r: mean(r, k)) for k in FINE_KINDS} if mine else {}
    if not best:
        return f"Fine-detail goal: no cell at {tokens} tokens."
    met = all(mean(r, k) >= GOAL for k, r in best.items())
    parts = "; ".join(f"{k} {mean(r, k):.3f} ({r['variant']})" for k, r in best.items())
    head = f"Fine-detail goal (the best at {tokens} tokens >= {GOAL} on {' and '.join(FINE_KINDS)})"
    return f"{head}: {'met' if met else 'not met'}: {parts}."


def compute(rows: list[dict]) -> str:
    """The cells' training FLOPs (XLA's count) and the rate their time gives (scoring included), or ""
    when a cell cached by an older version lacks its count."""
    if not rows or any(r.get("train_flops") is None for r in rows):
        return ""
    flops, seconds = sum(r["train_flops"] for r in rows), sum(r["seconds"] for r in rows)
    return (f"Compute: {flops / 1e12:.1f} TFLOP of training (XLA's count) in the cells' {seconds:.0f} s, "
            f"{flops / seconds / 1e9:.1f} GFLOP/s.")  # fmt: skip


def plot(rows: list[dict], path: str) -> str | None:
    """Accuracy per kind with 95% intervals, one panel per budget, one bar per projector."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    budgets = sorted({r["tokens"] for r in rows})
    kinds = [k for k in (*KINDS, "all") if any(k in r["accuracy"] for r in rows)]
    colours = plt.get_cmap("tab20")  # one colour per variant in every panel
    fig, axes = plt.subplots(len(budgets), 1, figsize=(10, 3.2 * len(budgets)), squeeze=False)
    for ax, t in zip(axes[:, 0], budgets):
        mine = sorted((r for r in rows if r["tokens"] == t), key=lambda r: r["variant"])
        width = 0.8 / max(len(mine), 1)
        for i, r in enumerate(mine):
            stats = [mean_interval(r["accuracy"].get(k, [0.0])) for k in kinds]
            xs = np.arange(len(kinds)) + (i - (len(mine) - 1) / 2) * width
            ax.bar(xs, [m for m, _ in stats], width, yerr=[h if math.isfinite(h) else 0 for _, h in stats],
                   capsize=2, label=r["variant"], color=colours(colour_index(r["variant"])))  # fmt: skip
        ax.set(xticks=np.arange(len(kinds)), xticklabels=kinds, ylim=(0, 1), ylabel="held-out exact match",
               title=f"{t} visual tokens (95% intervals over seeds)")  # fmt: skip
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def colour_index(variant: str) -> int:
    """``variant``'s colour in matplotlib's tab20: its ten dark shades (tab10's colours) first, then the
    light ones, so every supported variant has its own."""
    i = SUPPORTED.index(variant)
    return (2 * i) % 20 + (2 * i) // 20


def plan(variants: Sequence[str], size: dict) -> list[tuple[str, int]]:
    """The cells: each variant at each budget it meets exactly (ParGo's ablations at
    ``ablation_budgets``), then, with ``natural_mlp``, the MLP at one token per patch."""
    ablations = [v for v in variants if v in projectors.ABLATIONS]
    others = [v for v in variants if v not in ablations]
    cells = projectors.plan_cells(size["budgets"], others, DATA, ablations_everywhere=True)
    cells += projectors.plan_cells(size["ablation_budgets"], ablations, DATA, ablations_everywhere=True)
    natural = projectors.num_patches(DATA)
    if size["natural_mlp"] and "mlp" in variants and ("mlp", natural) not in cells:
        cells.append(("mlp", natural))
    return cells


def cell_settings(size: dict) -> dict:
    """What of a grid ``size`` shapes each cell's training (not which cells the grid plans)."""
    return {k: v for k, v in size.items() if k not in GRID_KEYS}


def output_stem(out: str, name: str, size: dict) -> str:
    """``OUT/projector_grid_<name>``, the outputs' and cells' stem; a size that trains cells otherwise
    than ``SIZES[name]`` (``--steps``, ``--seeds``, ...) gets a suffix of its own, so it never replaces
    that grid's cells (``--budgets`` and ``--variants`` only pick cells: they share them)."""
    stem = os.path.join(out, f"projector_grid_{name}")
    cell = json.loads(json.dumps(cell_settings(size)))
    if cell == json.loads(json.dumps(cell_settings(SIZES[name]))):
        return stem
    return f"{stem}-{hashlib.sha1(json.dumps(cell, sort_keys=True).encode()).hexdigest()[:8]}"


def report_stem(
    stem: str, variants: Sequence[str], default: Sequence[str], budgets: Sequence[int] = ()
) -> str:
    """Where the tables go: ``stem`` for the default variants and budgets, else beside it, named by the
    variants and the ``--budgets`` run (their cells are still shared with the full grid's)."""
    name = "" if tuple(variants) == tuple(default) else "-" + "+".join(variants)
    return stem + name + ("-t" + "+".join(map(str, budgets)) if budgets else "")


def cached_row(path: str, settings: dict) -> dict | None:
    """The cell's row saved at ``path`` when it was trained with these ``settings`` (its row may record
    more), else None."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        row = json.load(f)
    stored = row.get("size", {})
    return row if all(k in stored and stored[k] == v for k, v in settings.items()) else None


def cached_cell(path: str, settings: dict, run: Callable[[], dict]) -> dict:
    """The cell's :func:`cached_row`, else ``run()`` saved at ``path``: an interrupted grid resumes at
    its first untrained cell."""
    row = cached_row(path, settings)
    if row is not None:
        print("  trained before with these settings: not retrained")
        return row
    row = run() | {"size": settings}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(row, f, indent=1)
    os.replace(path + ".tmp", path)
    return row


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = launcher.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_results/projectors")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"), help="grid size (see SIZES)")
    p.add_argument("--quick", action="store_true", help="tiny data, tower and steps: a smoke run")
    p.add_argument("--variants", help=f"comma list of {sorted(projectors.VARIANTS)}")
    p.add_argument("--budgets", help="comma list of visual-token budgets")
    p.add_argument("--seeds", help="comma list of seeds (one program per cell)")
    p.add_argument("--steps", type=_at_least(1), help="question steps per run (after the caption steps)")
    p.add_argument("--caption-steps", type=_at_least(0), help="caption steps per run before the questions")
    p.add_argument("--order-turn", type=_at_least(0), help="shapes a dialogue lists left to right (0: none)")
    p.add_argument("--template", choices=sorted(TEMPLATES),
                   help="compact: question, newline, answer, end of turn (default); chat: the tokenizer's "
                        "ChatML (5 tokens around each message)")  # fmt: skip
    p.add_argument("--train-scenes", type=_at_least(1), help="training scenes (held-out: the size's)")
    p.add_argument("--workers", type=_at_least(1), default=1,
                   help="processes training cells side by side, each pinned to its share of the cores "
                        "(2 on a 2-core CPU: 1.35x the cells an hour)")  # fmt: skip
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by --workers for its processes
    return p


def grid_size(a: argparse.Namespace) -> dict:
    """The size named by ``--quick`` / ``--device`` with the command line's overrides."""
    size = dict(SIZES["quick" if a.quick else a.device])
    if a.seeds:
        size["seeds"] = tuple(int(s) for s in a.seeds.split(","))
    if a.budgets:
        size["budgets"] = size["ablation_budgets"] = tuple(int(t) for t in a.budgets.split(","))
    if a.steps:
        size["qa_steps"] = a.steps
    if a.caption_steps is not None:
        size["caption_steps"] = a.caption_steps
    if a.order_turn is not None:
        size["order_turn"] = a.order_turn
    if a.template:
        size["template"] = a.template
    if a.train_scenes:
        size["train"] = a.train_scenes
    return size


def default_variants(quick: bool, device: str) -> tuple[str, ...]:
    """The variants a size runs unless ``--variants`` says: the five families and ParGo's ablations (on
    ``gpu``, + :data:`SECOND_PATHS`); ``--quick``: :data:`QUICK_VARIANTS`."""
    if quick:
        return QUICK_VARIANTS
    return projectors.FAMILIES + projectors.ABLATIONS + (SECOND_PATHS if device == "gpu" else ())


def second_path_builds(cells, out: str, quick: bool) -> dict[str, dict]:
    """Per variant with inputs of its own (X-Former's MAE, MG-LLaVA's ConvNeXt), the build its cells are
    reused with: a rebuilt MAE or another ConvNeXt retrains them."""
    builds = {}
    for variant, budget in dict(cells).items():
        if variant in ("xformer", "mg_llava"):
            c = cell_model(variant, budget, out, quick)[0]
            builds[variant] = (
                dict(mae=c.demo_mae.to_dict())
                if variant == "xformer"
                else dict(high_res=c.model.high_res.to_dict())
            )
    return builds


def second_paths(
    cells, scenes: dict[str, Scenes], visual: dict[str, dict], tower_params, out: str, quick: bool
) -> None:
    """X-Former's MAE tokens (``detail``) and MG-LLaVA's inputs (``mg_llava``, with the frozen
    ``tower_params``) added to each split's ``visual``, once, when their cells are planned."""
    from pargo_jax.convert import hf_mae

    for variant, budget in dict(cells).items():
        if variant not in ("xformer", "mg_llava"):
            continue
        c, mcfg, _ = cell_model(variant, budget, out, quick)
        if variant == "xformer":
            _, mae = hf_mae.load_mae(c.model.detail.path)
            for k, s in scenes.items():
                visual[k]["detail"] = detail_tokens(mcfg, mae["params"], s.images)
        else:
            params = {"vision_tower": tower_params, "high_res_tower": random_convnext(mcfg)}
            for k, s in scenes.items():
                visual[k]["mg_llava"] = mg_llava_inputs(mcfg, params, s, c.input.resize)


def main(argv=None) -> dict:
    a = parser().parse_args(argv)
    if a.worker is not None:  # its parent command holds the cells' folder
        print(f"worker {a.worker} on cores {workers.pin(a.worker, a.workers)}", flush=True)
        return run_grid(a, argv)
    with workers.exclusive(output_stem(a.out, "quick" if a.quick else a.device, grid_size(a))):
        return run_grid(a, argv)


def run_grid(a: argparse.Namespace, argv: Sequence[str] | None) -> dict:
    """The cells ``a`` plans, trained (or read from their cache) and, outside a worker, reported."""
    size = grid_size(a)
    default = default_variants(a.quick, a.device)
    variants = tuple(a.variants.split(",")) if a.variants else default
    unknown = set(variants) - set(SUPPORTED)
    if unknown:
        raise SystemExit(f"Unknown or unsupported variants {sorted(unknown)}; choose from {SUPPORTED}.")
    cells = plan(variants, size)
    stem = output_stem(a.out, "quick" if a.quick else a.device, size)
    t0 = time.perf_counter()
    projectors.prepare_shared(a.out, DATA, a.quick, "caption", variants)
    c = cell_model(*cells[0], a.out, a.quick)[0]
    # what a cached cell must match to be reused: its training settings, the questions, the tower's build
    settings = json.loads(json.dumps(cell_settings(size) | dict(asked=ASKED, tower=c.demo_tower.to_dict())))
    builds = second_path_builds(cells, a.out, a.quick)
    paths = [os.path.join(stem, cell_name(*cell) + ".json") for cell in cells]
    keys = [settings | builds.get(variant, {}) for variant, _ in cells]
    pending = sum(cached_row(p, k) is None for p, k in zip(paths, keys, strict=True))
    if a.worker is None and min(a.workers, pending) > 1:  # one cell left: this process, on every core
        n = min(a.workers, pending)
        workers.clear_claims(stem)
        workers.run(MODULE, [*(sys.argv[1:] if argv is None else argv), f"--workers={n}"], n)
        workers.clear_claims(stem)
    inputs = functools.cache(lambda: grid_inputs(cells, size, a.out, a.quick, t0))
    rows = []
    for i in training_order(cells) if a.worker is not None else range(len(cells)):
        variant, budget = cells[i]
        if a.worker is not None and not workers.claim(paths[i]):
            continue  # another worker's
        print(f"[{i + 1}/{len(cells)}] {cell_name(variant, budget)}", flush=True)
        run = lambda: run_cell(variant, budget, size, a.out, a.quick, *inputs())  # noqa: B023
        rows.append(cached_cell(paths[i], keys[i], run))
    wall = time.perf_counter() - t0
    if a.worker is not None:
        return dict(rows=rows, wall_seconds=wall)
    report = report_stem(stem, variants, default, size["budgets"] if a.budgets else ())
    text = "\n\n".join(part for part in (table(rows), differences(rows), goal(rows), compute(rows)) if part)
    os.makedirs(a.out, exist_ok=True)
    with open(report + ".md", "w") as f:
        f.write(text + "\n")
    with open(report + ".json", "w") as f:
        cells_seconds = sum(r["seconds"] for r in rows)  # as trained, resumed cells included
        json.dump(dict(size=size, cells=rows, wall_seconds=wall, cells_seconds=cells_seconds), f, indent=1)
    png = plot(rows, report + ".png")
    print(text)
    print(f"{len(cells)} cells in {wall:.0f} s; wrote {report}.md, .json" + (", .png" if png else ""))
    return dict(rows=rows, wall_seconds=wall)


def training_order(cells: Sequence[tuple[str, int]]) -> list[int]:
    """The order workers claim cells in: the most visual tokens first (a 64-token cell took 1.4-1.8x a
    16-token one in the CPU grid), so the last cells, the ones that can leave a core idle, are the
    short ones."""
    return sorted(range(len(cells)), key=lambda i: -cells[i][1])


def grid_inputs(cells, size: dict, out: str, quick: bool, t0: float) -> tuple[dict, dict]:
    """Each split's scenes and what the cells read of them (:data:`VISUAL`), computed once."""
    from pargo_jax.convert import hf_vision

    image_size = projectors.IMAGE_SIZE[DATA]
    scenes = {"train": make_scenes("sft", size["train"], image_size, size["dialogue"], size["order_turn"])}
    scenes["eval"] = make_scenes("eval", size["eval"], image_size)
    if size["caption_steps"]:
        scenes["caption"] = make_captions(size["train"], image_size)
    c, mcfg, _ = cell_model(*cells[0], out, quick)
    _, tower = hf_vision.load_vision(c.model.vision.path)
    visual = {k: {"features": tower_features(mcfg, tower["params"], s.images)} for k, s in scenes.items()}
    second_paths(cells, scenes, visual, tower["params"], out, quick)
    seconds = time.perf_counter() - t0
    print(f"{len(cells)} cells x {len(size['seeds'])} seeds; data and features {seconds:.0f} s", flush=True)
    return scenes, visual


if __name__ == "__main__":
    launcher.run_argparse(main)
