"""The training loop: build -> init or restore -> jit-sharded steps -> log, evaluate, checkpoint.

One step: global batch on the mesh -> (grad-accumulated) masked next-token loss of the
VisionLanguageModel -> grads of the trainable params only -> clipped AdamW update (skipped, and
counted, when the loss or grad norm is not finite) -> metrics, accumulated on device until the next
log. The configured evaluators run every ``log_steps`` and when training ends.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct

from data_pipelines.boxes import BoxCodec
from pargo_jax import checkpoints, configs, flops, metrics, optim, runs, sharding
from pargo_jax.models import factory, projectors
from pargo_jax.models.mllm import MLLMConfig, VisionLanguageModel, chunked_next_token_loss, next_token_loss
from pargo_jax.param_tree import flatten, unflatten

SECTIONS = {
    "seed", "total_steps", "log_every_steps", "sample_at_end", "max_nonfinite_steps", "loss_chunk",
    "model", "input", "shapes", "demo_tower", "demo_mae", "optim", "trainable", "mesh", "checkpoint",
    "evals", "objective", "box_codec", "multiscale",
}  # fmt: skip
# config.objective: "lm" (next-token loss of the LLM) or "qformer" (BLIP-2 / X-Former stage 1: the
# Q-Former's ITC + ITM + ITG, + the MAE reconstruction with a detail tower), each part weighted
OBJECTIVES = ("lm", "qformer")
STAGE1_PARTS = ("itc", "itm", "itg", "recon")
CHECKPOINT_KEYS = {"every_steps", "keep", "init_from", "init_from_parts"}
TEXT_KEYS = ("input_ids", "targets", "loss_mask", "attention_mask")
CONSOLE = ("loss", "grad_norm", "lr", "tokens_per_second", "images_per_second", "mfu", "skipped/total")


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # full tree: {"vision_tower", "projector", "llm"}
    opt_state: Any  # optimizer state of the trainable params only
    nonfinite: jax.Array  # consecutive steps skipped for a non-finite loss / grad norm


# --- building ---------------------------------------------------------------------------------------
def check_config(config: ml_collections.ConfigDict) -> None:
    """Unknown keys fail loudly (typos would otherwise be silently ignored)."""
    configs.check_keys(config.keys(), SECTIONS, "the config")
    configs.check_keys(config.checkpoint.keys(), CHECKPOINT_KEYS, "config.checkpoint")
    BoxCodec.of_run(config)
    if "total_steps" in config.optim:
        raise ValueError(
            "config.optim.total_steps is not a setting: the schedule ends at config.total_steps; set that."
        )


def check_box_codecs(config: ml_collections.ConfigDict) -> None:
    """Every input source whose dataset declares a box codec (``box_codec.json``) uses the run's
    (``config.box_codec``): else one ConfigError naming each such source, its codec and the run's."""
    from data_pipelines.builders import read_box_codec
    from data_pipelines.pipeline import InputConfig

    run = BoxCodec.of_run(config)
    wrong = {}
    for i, s in enumerate(InputConfig.from_config(config.input).sources):
        declared = read_box_codec(s.data_dir, s.name)
        if declared is not None and declared != run:
            wrong[f"input.sources[{i}] ({s.name} in {s.data_dir})"] = declared
    if wrong:
        named = "; ".join(f"{source} writes its boxes as {codec}" for source, codec in wrong.items())
        fix = next(iter(wrong.values()))
        raise configs.ConfigError(
            f"{named}, but the run's config.box_codec is {run}: a model reads and writes boxes in one codec. "
            f"Set config.box_codec=dict(format={fix.fmt!r}, frame={fix.frame!r}) or rebuild the data with "
            f"--box_format={run.fmt} --box_frame={run.frame}."
        )


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """The model (``factory.ModelParts``) with what training adds: trainable labels, optimizer, schedule."""

    parts: factory.ModelParts
    labels: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule

    @property
    def mcfg(self) -> MLLMConfig:
        return self.parts.mcfg

    @property
    def model(self) -> VisionLanguageModel:
        return self.parts.model


@dataclasses.dataclass(frozen=True)
class Stage1:
    """What the ``qformer`` objective needs: each loss part's weight and the ``[DEC]`` id."""

    weights: Mapping[str, float]
    bos_id: int


def objective(config: ml_collections.ConfigDict, mcfg: MLLMConfig) -> Stage1 | None:
    """``config.objective`` (``dict(name="lm")`` when absent): None for the LM loss, else the
    :class:`Stage1` of ``name="qformer"`` with weights ``itc``, ``itm``, ``itg``, ``recon`` (default 1)."""
    o = dict(config.get("objective") or {"name": "lm"})
    name = o.pop("name", "lm")
    if name not in OBJECTIVES:
        raise ValueError(f"config.objective.name={name!r}; choose one of {OBJECTIVES}.")
    if name == "lm":
        configs.check_keys(o, set(), "config.objective (lm)")
        return None
    configs.check_keys(o, set(STAGE1_PARTS), "config.objective (qformer)")
    if not isinstance(mcfg.projector, projectors.QFormerConfig):
        raise ValueError("config.objective.name='qformer' trains a Q-Former: use projector blip2 or xformer.")
    if not config.input.get("qformer_tokenizer"):
        raise ValueError("config.objective.name='qformer' reads captions: set input.qformer_tokenizer.")
    from data_pipelines.text import load_qformer_tokenizer

    mcfg.projector.check_text_length(int(config.input.get("qformer_max_len", 32)))
    parts = STAGE1_PARTS if mcfg.detail else STAGE1_PARTS[:3]
    weights = {k: float(o.get(k, 1.0)) for k in parts}
    return Stage1(weights, load_qformer_tokenizer(config.input.qformer_tokenizer).dec_id)


def optimizer_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``config.optim`` for :mod:`pargo_jax.optim`: the schedule ends at ``config.total_steps`` (the one
    source of that value); gradient accumulation is the step's business."""
    optim_cfg = {k: v for k, v in config.optim.items() if k != "grad_accum_steps"}
    return dict(optim_cfg, total_steps=config.total_steps)


def build_model(config: ml_collections.ConfigDict, tokenizer, mesh: jax.sharding.Mesh) -> TrainSetup:
    """Model, abstract params and their shardings, trainable labels, optimizer and schedule (no data,
    no weights)."""
    parts = factory.build(runs.model_config(config, tokenizer), mesh)
    labels = optim.trainable_labels(parts.abstract, dict(config.trainable))
    train_abstract, _ = split_params(parts.abstract, labels)
    # The optimizer sees only the trainable params (flat "a/b/c" keys): frozen ones get no state.
    tx, _ = optim.make_optimizer(optimizer_config(config), train_abstract, dict(config.trainable))
    return TrainSetup(parts, labels, tx, optim.learning_rate_schedule(optimizer_config(config)))


def split_params(params, labels) -> tuple[dict, dict]:
    """(trainable, frozen) flat dicts keyed by "a/b/c"."""
    flat, flat_labels = flatten(params), flatten(labels)
    train = {k: v for k, v in flat.items() if flat_labels[k] != optim.FROZEN}
    frozen = {k: v for k, v in flat.items() if flat_labels[k] == optim.FROZEN}
    return train, frozen


def join_params(train: Mapping, frozen: Mapping) -> dict:
    return unflatten({**train, **frozen})


def optimizer_shardings(tx, train: Mapping, train_shardings: Mapping, replicated):
    """Optimizer-state shardings: each moment like its param (optax keeps the params' "a/b/c" keys),
    scalars (counts) replicated. Without this the moments would not be FSDP-sharded."""

    def like_param(path, leaf):
        for key in path:
            name = getattr(key, "key", None)
            if name in train_shardings and leaf.shape == train[name].shape:
                return train_shardings[name]
        return replicated

    return jax.tree_util.tree_map_with_path(like_param, jax.eval_shape(tx.init, train))


def init_state(setup: TrainSetup, config, mesh) -> tuple[TrainState, Any]:
    """The first train state (params from ``runs.init_params``, fresh optimizer state) and its
    shardings."""
    params = runs.init_params(setup.parts, config)
    params = optim.store_frozen(params, setup.labels, config.model.get("frozen_dtype", "float32"))
    train, _ = split_params(params, setup.labels)
    replicated = jax.NamedSharding(mesh, jax.P())
    train_shardings = split_params(setup.parts.shardings, setup.labels)[0]
    opt_shardings = optimizer_shardings(setup.tx, train, train_shardings, replicated)
    opt_state = jax.jit(setup.tx.init, out_shardings=opt_shardings)(train)
    zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), replicated)  # two buffers: both are donated
    state = TrainState(step=zero(), params=params, opt_state=opt_state, nonfinite=zero())
    shardings = TrainState(replicated, setup.parts.shardings, opt_shardings, replicated)
    return state, shardings


# --- the step --------------------------------------------------------------------------------------
def make_train_step(
    model: VisionLanguageModel,
    tx,
    labels,
    schedule,
    *,
    grad_accum: int = 1,
    seed: int = 0,
    loss_chunk: int = 0,
    stage1: Stage1 | None = None,
):
    """``train_step(state, batch) -> (state, metrics.TrainMetrics)``; pure, to be jitted with shardings.
    ``loss_chunk`` > 0: the cross-entropy takes that many positions at a time (never the whole logits).
    ``stage1``: the Q-Former's stage-1 losses instead, weighted and summed; each part is logged."""

    def loss_fn(train, frozen, batch, rng):
        """(loss sum, (count, {part: loss})): the total is divided by the summed count."""
        variables = {"params": join_params(train, frozen)}
        if stage1 is not None:
            rngs = {
                "dropout": rng,
                "masking": jax.random.fold_in(rng, 1),
                "negatives": jax.random.fold_in(rng, 2),
            }
            losses = model.apply(
                variables, batch["image"], batch["qformer_ids"], batch["qformer_mask"], bos_id=stage1.bos_id,
                deterministic=False, rngs=rngs, method=model.stage1_losses,
            )  # fmt: skip
            total = sum(stage1.weights[k] * losses[k] for k in stage1.weights)
            return total, (jnp.ones(()), {k: losses[k] for k in stage1.weights})
        inputs = (batch["image"], batch["input_ids"], batch["attention_mask"])
        options = dict(deterministic=False, rngs={"dropout": rng})
        if "boxes" in batch:  # MG-LLaVA's object tokens
            options["boxes"] = batch["boxes"]
        if "segment_ids" in batch:  # packed rows
            options["segment_ids"] = batch["segment_ids"]
        if loss_chunk:
            hidden = model.apply(variables, *inputs, hidden_only=True, **options)
            kernel = model.apply(variables, method=model.output_kernel)
            total, count = chunked_next_token_loss(
                hidden, kernel, batch["targets"], batch["loss_mask"], loss_chunk
            )
        else:
            logits = model.apply(variables, *inputs, **options)
            total, count = next_token_loss(logits, batch["targets"], batch["loss_mask"])
        return total, (count, {})

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    collection = metrics.train_metrics(tuple(stage1.weights) if stage1 else ())

    def train_step(state: TrainState, batch):
        train, frozen = split_params(state.params, labels)
        rng = jax.random.fold_in(jax.random.key(seed), state.step)  # dropout: a function of (seed, step)
        if grad_accum == 1:
            (total, (count, parts)), grads = grad_fn(train, frozen, batch, rng)
        else:
            micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

            def accumulate(carry, xs):
                i, mb = xs
                out = grad_fn(train, frozen, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, out), None

            shapes = jax.eval_shape(grad_fn, train, frozen, jax.tree.map(lambda x: x[0], micro), rng)
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
            ((total, (count, parts)), grads), _ = jax.lax.scan(
                accumulate, zeros, (jnp.arange(grad_accum), micro)
            )
        count = jnp.maximum(count, 1.0)
        loss = total / count
        grads = jax.tree.map(lambda g: g / count, grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state.opt_state, train)
        new_train = optax.apply_updates(train, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = state.replace(
            step=state.step + 1,
            params=join_params(keep(new_train, train), frozen),
            opt_state=keep(new_opt, state.opt_state),
            nonfinite=jnp.where(finite, 0, state.nonfinite + 1),
        )
        out = collection.single_from_model_output(
            loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
            skipped_nonfinite=1 - finite.astype(jnp.int32), nonfinite_streak=new_state.nonfinite,
            **{f"loss_{k}": v / count for k, v in parts.items()},
        )  # fmt: skip
        return new_state, out

    return train_step


# --- run -------------------------------------------------------------------------------------------
def check_batch(batch, mcfg: MLLMConfig) -> None:
    """Every row carries ``num_image_tokens`` image tokens per image: ``image_mask.sum(1)`` images when
    the batch has it, else one per row (a text-only row: none)."""
    counts = (batch["input_ids"] == mcfg.image_token_id).sum(1)
    want = mcfg.num_image_tokens
    images = batch["image_mask"].sum(1) if "image_mask" in batch else (counts > 0)
    bad = counts != want * images
    if bad.any():
        ids = [str(r) for r, b in zip(batch["record_id"], bad) if b]
        raise ValueError(
            f"Records {ids[:5]} carry {sorted(set(counts[bad].tolist()))} image tokens but the model makes "
            f"{want} per image; the input pipeline must be given num_image_tokens of this model."
        )


def batch_images(batch) -> int:
    """Images of a host batch: ``image_mask``'s (several per row), else one per row (a text-only row's
    black image included: the tower reads it)."""
    return int(batch["image_mask"].sum()) if "image_mask" in batch else len(batch["input_ids"])


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns final metrics. A demo
    config's data and tower are made first by :func:`pargo_jax.prepare.prepare_run`."""
    check_config(config)
    mesh = runs.mesh_for(config)
    logging.info("Mesh %s over %d devices (%s).", dict(mesh.shape), mesh.size, jax.devices()[0].device_kind)
    with sharding.mesh_context(mesh):
        return _run(config, workdir, mesh)


def _run(config, workdir, mesh):
    from data_pipelines.pipeline import make_iterator
    from data_pipelines.text import load_tokenizer
    from pargo_jax import evaluators
    from pargo_jax.predictor import Predictor

    tokenizer = load_tokenizer(configs.require_path(config.input.get("tokenizer"), "input.tokenizer"))
    setup = build_model(config, tokenizer, mesh)
    mcfg = setup.mcfg
    stage1 = objective(config, mcfg)  # a config mistake fails here, before any weights are read
    runs.save_run(workdir, config, mcfg, tokenizer)
    batch_size = config.input.batch_size
    if batch_size % sharding.batch_divisor(mesh):
        raise ValueError(
            f"input.batch_size={batch_size} is not divisible by the data x fsdp mesh size "
            f"{sharding.batch_divisor(mesh)}."
        )
    grad_accum = int(config.optim.get("grad_accum_steps", 1))
    if batch_size % grad_accum:
        raise ValueError(f"input.batch_size={batch_size} is not divisible by grad_accum_steps={grad_accum}.")
    predictor = Predictor.from_config(setup.model, tokenizer, mesh, config)
    evals = evaluators.build(evaluators.evals_config(config), predictor, config)
    ckpt = checkpoints.Checkpointer(
        workdir, every_steps=config.checkpoint.every_steps, keep=config.checkpoint.get("keep", 3)
    )
    if config.input.image_size != mcfg.image_size:
        raise ValueError(
            f"input.image_size={config.input.image_size} but the model takes {mcfg.image_size} px images "
            f"(the {'high-res tower' if mcfg.high_res else 'vision tower'}'s size); set them equal."
        )
    check_box_codecs(config)  # the last config check: it reads the datasets' metadata, no weights
    data = make_iterator(
        config.input, num_image_tokens=mcfg.num_image_tokens, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_boxes=mcfg.high_res.max_boxes if mcfg.high_res else 0,
    )  # fmt: skip
    state, state_shardings = init_state(setup, config, mesh)
    latest = ckpt.latest_step()
    if latest is not None:
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings
        )
        state, data_state = ckpt.restore(latest, abstract)
        data.set_state(data_state["data"])
        logging.info("Resumed from step %d in %s.", latest, workdir)

    step_fn = make_train_step(
        setup.model, setup.tx, setup.labels, setup.schedule, grad_accum=grad_accum, seed=config.seed,
        loss_chunk=int(config.get("loss_chunk", 0)), stage1=stage1,
    )  # fmt: skip
    batch_sharding = sharding.batch_sharding(mesh)
    batch_keys = ("image", *TEXT_KEYS) + (("boxes",) if mcfg.high_res and mcfg.high_res.max_boxes else ())
    batch_keys += ("segment_ids",) if config.input.get("packing", False) else ()  # image_mask stays here
    if stage1:
        batch_keys = ("image", "qformer_ids", "qformer_mask")
    jit_step = jax.jit(
        step_fn,
        in_shardings=(state_shardings, {k: batch_sharding for k in batch_keys}),
        out_shardings=(state_shardings, jax.NamedSharding(mesh, jax.P())),
        donate_argnums=(0,),
    )
    trains = {
        part: any(v != optim.FROZEN for v in flatten(setup.labels[part]).values()) for part in setup.labels
    }
    batch_flops = functools.partial(
        flops.batch_training_flops,
        mcfg.vision,
        mcfg.projector,
        mcfg.llm,
        train_vision=trains["vision_tower"],
        train_projector=trains["projector"],
        train_llm=trains["llm"],
    )  # fmt: skip  (of this host's rows; the others' are taken to be alike)
    writer = metrics.MetricWriter(workdir) if jax.process_index() == 0 else None
    total = config.total_steps
    progress = metrics.Progress(total, config.log_every_steps)
    step = int(jax.device_get(state.step))
    progress.start(step)
    preempted = checkpoints.install_preemption_handler()
    acc, steps_acc, data_wait, flops_acc, images_acc = None, 0, 0.0, 0.0, 0
    truncated_before, warned_truncation, records_seen = data.stats()["truncated"], False, 0
    timer = time.perf_counter()
    last_ids: list[str] = []
    summary: dict[str, Any] = {}
    while step < total:
        t0 = time.perf_counter()
        host_batch = next(data)
        data_wait += time.perf_counter() - t0
        check_batch(host_batch, mcfg)
        last_ids = [str(r) for r in host_batch["record_id"]]
        records_seen += sum(len(r.split(",")) for r in last_ids if r)  # a packed row: "id,id,..."
        batch = sharding.shard_batch({k: host_batch[k] for k in batch_keys}, mesh)
        state, out = jit_step(state, batch)
        step += 1
        acc, steps_acc = (out if acc is None else acc.merge(out)), steps_acc + 1  # stays on device
        images = batch_images(host_batch)
        lengths = flops.sample_lengths(host_batch["attention_mask"], host_batch.get("segment_ids"))
        flops_acc += batch_flops(lengths, images) * jax.process_count()
        images_acc += images * jax.process_count()
        if step % config.log_every_steps == 0 or step == total:
            seconds = (time.perf_counter() - timer) / steps_acc
            tokens = float(np.sum(host_batch["attention_mask"])) * jax.process_count()
            summary = {
                **{metrics.metric_name(k): float(v) for k, v in jax.device_get(acc.compute()).items()},
                "step_seconds": seconds,
                "data_wait_seconds": data_wait / steps_acc,
                "tokens_per_second": tokens / seconds,
                "images_per_second": images_acc / steps_acc / seconds,
                **{k: float(v) for k, v in data.stats().items()},
            }
            mfu = flops.mfu(flops_acc / steps_acc, seconds, jax.device_count(), jax.devices()[0].device_kind)
            if mfu is not None and not stage1:  # the FLOP count is the LM step's
                summary["mfu"] = mfu
            if writer:
                writer.write(step, summary)
            parts = [f"loss/{k}" for k in stage1.weights] if stage1 else []
            progress.update(step, {k: summary[k] for k in (*CONSOLE, *parts) if k in summary})
            if summary["nonfinite_streak"] >= config.get("max_nonfinite_steps", 5):
                ckpt.close()
                raise FloatingPointError(
                    f"{int(summary['nonfinite_streak'])} consecutive non-finite steps by step {step}; "
                    f"records of the last batch: {last_ids[:8]}. Lower the learning rate or check them."
                )
            cut = data.stats()["truncated"] - truncated_before
            warned_truncation = warned_truncation or warn_truncation(cut, records_seen, config.input.max_len)
            acc, steps_acc, data_wait, flops_acc, images_acc = None, 0, 0.0, 0.0, 0
            timer = time.perf_counter()
        stop = preempted(step)
        if ckpt.should_save(step) or step == total or stop:
            ckpt.save(step, state, {"data": data.get_state()}, force=stop or step == total)
        if stop:
            logging.warning("Preemption signal received: saved step %d, exiting.", step)
            break
        due = [name for name, ev in evals.items() if ev.due(step, final=step == total)]
        if due:
            due = {n: evals[n] for n in due}
            summary.update(evaluators.run_all(due, state.params, step, workdir, writer, tables=step == total))
            timer = time.perf_counter()  # evaluation time is not training time
    ckpt.wait()
    ckpt.close()
    if writer:
        writer.close()
    if config.get("sample_at_end") and step >= total:
        summary["sample"] = sample_answer(predictor, config, state.params)
    data.close()
    summary["step"] = step
    return summary


def warn_truncation(cut: int, seen: int, max_len: int) -> bool:
    """Warns (and returns True) when over 5% of the ``seen`` records were ``cut`` at ``max_len``: the
    answers past it are never trained on."""
    if seen and cut / seen > 0.05:
        logging.warning(
            "%d of the %d records read so far (%.0f%%) were cut at input.max_len=%d: the answers past "
            "it are never trained on; raise input.max_len.", cut, seen, 100 * cut / seen, max_len,
        )  # fmt: skip
        return True
    return False


def sample_answer(predictor, config, params) -> dict[str, str]:
    """The trained model's answer to the first record of split ``sample_at_end``; printed and returned."""
    from data_pipelines import schema
    from data_pipelines.builders import open_source
    from pargo_jax.predictor import DecodeOptions, conversation

    source = dict(config.input.sources[0])
    data_dir = source.get("data_dir") or config.input.data_dir
    rec = schema.from_example(open_source(data_dir, source["name"], config.sample_at_end)[0])
    messages = rec.messages(config.input.get("caption_prompt", ""))
    options = DecodeOptions(max_new_tokens=min(32, int(config.input.max_len)))
    answer = predictor.answers(params, [conversation(rec.id, rec.images, messages[:-1])], options)[0]
    result = {
        "prompt": messages[-2]["content"],
        "answer": answer["answer"],
        "reference": messages[-1]["content"],
    }
    if jax.process_index() == 0:
        import json

        print(json.dumps(result, indent=2), flush=True)
    return result
