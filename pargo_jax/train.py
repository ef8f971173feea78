"""The training loop: build -> init or restore -> jit-sharded steps -> log, checkpoint, sample.

One step: global batch on the mesh -> (grad-accumulated) masked next-token loss of the
VisionLanguageModel -> grads of the trainable params only -> clipped AdamW update (skipped, and
counted, when the loss or grad norm is not finite) -> metrics.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from flax import struct, traverse_util

from pargo_jax import checkpoints, flops, metrics, optim, sharding
from pargo_jax.models.llm import CausalLM, LLMConfig
from pargo_jax.models.mllm import MLLMConfig, VisionLanguageModel, next_token_loss
from pargo_jax.models.projectors import MLPConfig, ParGoConfig
from pargo_jax.models.vision import vision_preset

SECTIONS = {
    "seed", "total_steps", "log_every_steps", "sample_at_end", "max_nonfinite_steps",
    "model", "input", "shapes", "optim", "trainable", "mesh", "checkpoint", "evals",
}  # fmt: skip
BATCH_AXES = ("data", "fsdp")
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
    """Unknown top-level keys fail loudly (typos would otherwise be silently ignored)."""
    unknown = sorted(set(config.keys()) - SECTIONS)
    if unknown:
        raise ValueError(f"Unknown config keys {unknown}; valid top-level keys are {sorted(SECTIONS)}.")
    for section, allowed in {
        "model": {"vision", "projector", "llm", "dtype"},
        "checkpoint": {"every_steps", "keep", "init_from", "init_from_parts"},
    }.items():
        bad = sorted(set(config[section].keys()) - allowed)
        if bad:
            raise ValueError(f"Unknown keys {bad} in config.{section}; valid keys are {sorted(allowed)}.")


def _require_path(path: str | None, what: str) -> str:
    """Local paths must exist; remote ones (gs://, s3://) are left to their readers."""
    if not path or ("://" not in path and not os.path.exists(path)):
        raise FileNotFoundError(f"{what} path {path!r} does not exist; set it in the config (or --config.*).")
    return path


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> None:
    """The demo's shapes set is built into ``{workdir}/data`` on first run (seconds)."""
    if config.get("shapes") is None:
        return
    from data_pipelines import shapes

    data_dir = config.input.get("data_dir") or os.path.join(workdir, "data")
    built = shapes.ensure(data_dir, progress=jax.process_index() == 0, **config.shapes.to_dict())
    with config.unlocked():
        config.input.data_dir = data_dir
        if not config.input.get("tokenizer"):
            config.input.tokenizer = built["tokenizer"]
    if built["summary"] is not None:
        logging.info("Built the shapes dataset in %s (%.1f s).", data_dir, built["seconds"])


def model_config(config: ml_collections.ConfigDict, tokenizer) -> MLLMConfig:
    """MLLMConfig from the config's model section, the checkpoints it names, and the tokenizer."""
    m = config.model
    dtype = m.get("dtype", "float32")
    v = m.vision
    if v.get("path"):
        from pargo_jax.convert import hf_vision

        path = _require_path(v.path, "model.vision")
        base = hf_vision.hf_vision_config(path) if v.get("format", "hf") == "hf" else None
        if base is None:
            base = hf_vision.eva02_config(hf_vision._read_state(path))
    else:
        base = vision_preset(v.get("preset", "tiny"))
    vision = base.replace(**{**v.get("overrides", {}), "dtype": dtype})

    llm_cfg = m.llm
    if llm_cfg.get("path"):
        from pargo_jax.convert import hf

        path = _require_path(llm_cfg.path, "model.llm")
        llm = hf.config_from_hf(hf.read_hf_config(path), **llm_cfg.get("overrides", {}))
    else:
        fields = dict(llm_cfg.get("config", {}))
        fields.setdefault("vocab_size", tokenizer.vocab_size)
        llm = LLMConfig(**{**fields, **llm_cfg.get("overrides", {})})
    llm = dataclasses.replace(llm, dtype=jnp.dtype(dtype))
    if llm.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"The tokenizer has {tokenizer.vocab_size} tokens but the LLM only {llm.vocab_size} embeddings."
        )
    p = dict(m.projector.to_dict())
    name = p.pop("name", "pargo")
    p.update(vision_width=vision.width, llm_width=llm.hidden_size, dtype=dtype)
    if name == "mlp":
        projector = MLPConfig(**p)
    else:
        if name == "qformer":
            p["num_partial"] = 0
        elif name != "pargo":
            raise ValueError(f"Unknown projector {name!r}; choose 'pargo', 'qformer' or 'mlp'.")
        projector = ParGoConfig(**p)
    return MLLMConfig(
        vision=vision,
        projector=projector,
        llm=llm,
        image_token_id=tokenizer.image_token_id,
        pixel_mean=tuple(config.input.mean),
        pixel_std=tuple(config.input.std),
    )


def load_pretrained(config, mcfg: MLLMConfig, shardings) -> dict:
    """Params of the tower / LLM read from the checkpoints the config names (placed on the mesh)."""
    loaded = {}
    v, llm = config.model.vision, config.model.llm
    if v.get("path"):
        from pargo_jax.convert import hf_vision

        opts = {**v.get("overrides", {})}
        load = hf_vision.load_vision if v.get("format", "hf") == "hf" else hf_vision.load_eva02
        _, variables = load(v.path, shardings=shardings["vision_tower"], **opts)
        loaded["vision_tower"] = variables["params"]
    if llm.get("path"):
        from pargo_jax.convert import hf

        _, variables = hf.load_llm(llm.path, shardings=shardings["llm"], **llm.get("overrides", {}))
        loaded["llm"] = variables["params"]
    return loaded


def dummy_batch(mcfg: MLLMConfig, batch: int, seq: int) -> dict[str, jax.ShapeDtypeStruct]:
    size = mcfg.vision.image_size
    return {
        "image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
        "input_ids": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
        "attention_mask": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
    }


def flat_paths(tree) -> dict[str, Any]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def split_params(params, labels) -> tuple[dict, dict]:
    """(trainable, frozen) flat dicts keyed by "a/b/c"."""
    flat, flat_labels = flat_paths(params), flat_paths(labels)
    train = {k: v for k, v in flat.items() if flat_labels[k] != "frozen"}
    frozen = {k: v for k, v in flat.items() if flat_labels[k] == "frozen"}
    return train, frozen


def join_params(train: Mapping, frozen: Mapping) -> dict:
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in {**train, **frozen}.items()})


# --- the step --------------------------------------------------------------------------------------
def make_train_step(model: VisionLanguageModel, tx, labels, schedule, *, grad_accum: int = 1, seed: int = 0):
    """``train_step(state, batch) -> (state, metrics)``; pure, to be jitted with shardings."""

    def loss_fn(train, frozen, batch, rng):
        params = join_params(train, frozen)
        logits = model.apply(
            {"params": params},
            batch["image"],
            batch["input_ids"],
            batch["attention_mask"],
            deterministic=False,
            rngs={"dropout": rng},
        )
        total, count = next_token_loss(logits, batch["targets"], batch["loss_mask"])
        return total, count

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch):
        train, frozen = split_params(state.params, labels)
        rng = jax.random.fold_in(jax.random.key(seed), state.step)  # dropout: a function of (seed, step)
        if grad_accum == 1:
            (total, count), grads = grad_fn(train, frozen, batch, rng)
        else:
            micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

            def accumulate(carry, xs):
                i, mb = xs
                (t, c), g = grad_fn(train, frozen, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, ((t, c), g)), None

            zeros = ((jnp.zeros(()), jnp.zeros(())), jax.tree.map(jnp.zeros_like, train))
            ((total, count), grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))
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
        out = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "answer_tokens": count,
            "skipped_nonfinite": 1 - finite.astype(jnp.int32),
        }
        return new_state, out

    return train_step


# --- run -------------------------------------------------------------------------------------------
def build(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh):
    """Everything a run needs: tokenizer, model, optimizer, shardings, initial (or restored) state."""
    from data_pipelines.text import load_tokenizer

    prepare_data(config, workdir)
    tokenizer = load_tokenizer(_require_path(config.input.get("tokenizer"), "input.tokenizer"))
    return dict(build_model(config, tokenizer, mesh), tokenizer=tokenizer)


def build_model(config: ml_collections.ConfigDict, tokenizer, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """Model, abstract params and their shardings, trainable labels, optimizer and schedule (no data,
    no weights): what ``build`` returns besides the tokenizer."""
    mcfg = model_config(config, tokenizer)
    model = VisionLanguageModel(mcfg)
    seq = config.input.max_len
    shapes = dummy_batch(mcfg, 1, seq)

    def init_params(rng):
        return model.init(rng, *(jnp.zeros(s.shape, s.dtype) for s in shapes.values()))["params"]

    boxed = jax.eval_shape(init_params, jax.random.key(config.seed))
    with nn.logical_axis_rules(sharding.LOGICAL_RULES):
        param_shardings = sharding.logical_shardings(boxed, mesh)
    abstract_params = jax.eval_shape(lambda r: nn.unbox(init_params(r)), jax.random.key(config.seed))
    labels = optim.trainable_labels(abstract_params, dict(config.trainable))
    train_abstract, _ = split_params(abstract_params, labels)
    # The optimizer sees only the trainable params (flat "a/b/c" keys): frozen ones get no state.
    optim_cfg = {k: v for k, v in config.optim.items() if k != "grad_accum_steps"}  # the step does that
    tx, _ = optim.make_optimizer(optim_cfg, train_abstract, dict(config.trainable))
    schedule = optim.learning_rate_schedule(optim_cfg)
    return dict(
        mcfg=mcfg, model=model, labels=labels, tx=tx, schedule=schedule,
        param_shardings=param_shardings, abstract_params=abstract_params, init_params=init_params,
    )  # fmt: skip


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


def init_state(parts, config, mesh) -> tuple[TrainState, Any]:
    """Sharded random init (never materialized on one host), then pretrained tower/LLM weights and the
    ``init_from`` subtree on top. Returns the state and its shardings."""
    labels, tx = parts["labels"], parts["tx"]
    param_shardings = parts["param_shardings"]
    # Parts read from checkpoints are not initialized at all (XLA drops their unused init).
    loaded = load_pretrained(config, parts["mcfg"], param_shardings)
    fresh = [k for k in param_shardings if k not in loaded]
    init = lambda r: {k: v for k, v in nn.unbox(parts["init_params"](r)).items() if k in fresh}
    params = jax.jit(init, out_shardings={k: param_shardings[k] for k in fresh})(jax.random.key(config.seed))
    params.update(loaded)
    init_from = config.checkpoint.get("init_from")
    if init_from:
        _require_path(init_from, "checkpoint.init_from")
        for part in config.checkpoint.get("init_from_parts", ("projector",)):
            abstract = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                parts["abstract_params"][part], param_shardings[part],
            )  # fmt: skip
            params[part] = checkpoints.restore_subtree(init_from, abstract, f"params/{part}")
            logging.info("Initialized %s from %s.", part, init_from)
    train, _ = split_params(params, labels)
    replicated = jax.NamedSharding(mesh, jax.P())
    opt_shardings = optimizer_shardings(tx, train, split_params(param_shardings, labels)[0], replicated)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(train)
    state = TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
        params=params,
        opt_state=opt_state,
        nonfinite=jax.device_put(jnp.zeros((), jnp.int32), replicated),
    )
    state_shardings = TrainState(
        step=replicated, params=param_shardings, opt_state=opt_shardings, nonfinite=replicated
    )
    return state, state_shardings


def global_batch(batch: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This host's slice of the batch -> global jax.Arrays sharded over (data, fsdp)."""
    sharding_ = jax.NamedSharding(mesh, jax.P(BATCH_AXES))
    return {
        k: jax.make_array_from_process_local_data(sharding_, np.asarray(v))
        for k, v in batch.items()
        if k in ("image", *TEXT_KEYS)
    }


def check_batch(batch, mcfg: MLLMConfig) -> None:
    counts = (batch["input_ids"] == mcfg.image_token_id).sum(1)
    want = mcfg.num_image_tokens
    if (counts != want).any():
        bad = [str(r) for r, c in zip(batch["record_id"], counts) if c != want]
        raise ValueError(
            f"Records {bad[:5]} carry {sorted(set(counts.tolist()))} image tokens but the model makes {want} "
            "per image; the input pipeline must be given num_image_tokens of this model."
        )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns final metrics."""
    from data_pipelines.pipeline import make_iterator

    check_config(config)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    spec = dict(config.mesh)
    num_devices = spec.pop("num_devices", None)  # use the first N devices (tests, debugging)
    mesh = sharding.make_mesh(spec, jax.devices()[:num_devices] if num_devices else None)
    logging.info("Mesh %s over %d devices (%s).", dict(mesh.shape), mesh.size, jax.devices()[0].device_kind)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        return _run(config, workdir, mesh, make_iterator)


def _run(config, workdir, mesh, make_iterator):
    parts = build(config, workdir, mesh)
    mcfg = parts["mcfg"]
    batch_size = config.input.batch_size
    if batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ValueError(
            f"input.batch_size={batch_size} is not divisible by the data x fsdp mesh size "
            f"{mesh.shape['data'] * mesh.shape['fsdp']}."
        )
    grad_accum = int(config.optim.get("grad_accum_steps", 1))
    if batch_size % grad_accum:
        raise ValueError(f"input.batch_size={batch_size} is not divisible by grad_accum_steps={grad_accum}.")
    ckpt = checkpoints.Checkpointer(
        workdir, every_steps=config.checkpoint.every_steps, keep=config.checkpoint.get("keep", 3)
    )
    data = make_iterator(
        config.input,
        num_image_tokens=mcfg.num_image_tokens,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    state, state_shardings = init_state(parts, config, mesh)
    latest = ckpt.latest_step()
    if latest is not None:
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings
        )
        state, data_state = ckpt.restore(latest, abstract)
        data.set_state(data_state["data"])
        logging.info("Resumed from step %d in %s.", latest, workdir)

    step_fn = make_train_step(
        parts["model"], parts["tx"], parts["labels"], parts["schedule"],
        grad_accum=grad_accum, seed=config.seed,
    )  # fmt: skip
    batch_sharding = jax.NamedSharding(mesh, jax.P(BATCH_AXES))
    jit_step = jax.jit(
        step_fn,
        in_shardings=(state_shardings, {k: batch_sharding for k in ("image", *TEXT_KEYS)}),
        out_shardings=(state_shardings, jax.NamedSharding(mesh, jax.P())),
        donate_argnums=(0,),
    )
    trains = {
        part: any(v != "frozen" for v in flat_paths(parts["labels"][part]).values())
        for part in parts["labels"]
    }
    flops_per_step = batch_size * flops.mllm_training_flops(
        mcfg.vision, mcfg.projector, mcfg.llm, config.input.max_len,
        train_vision=trains["vision_tower"], train_projector=trains["projector"], train_llm=trains["llm"],
    )  # fmt: skip
    writer = metrics.MetricWriter(workdir) if jax.process_index() == 0 else None
    total = config.total_steps
    progress = metrics.Progress(total, config.log_every_steps)
    progress.start(int(jax.device_get(state.step)))
    preempted = checkpoints.install_preemption_handler()
    step = int(jax.device_get(state.step))
    acc: dict[str, list[float]] = {}
    timer = time.perf_counter()
    data_wait = 0.0
    last_ids: list[str] = []
    summary: dict[str, Any] = {}
    while step < total:
        t0 = time.perf_counter()
        host_batch = next(data)
        data_wait += time.perf_counter() - t0
        check_batch(host_batch, mcfg)
        last_ids = [str(r) for r in host_batch["record_id"]]
        state, out = jit_step(state, global_batch(host_batch, mesh))
        step += 1
        out = jax.device_get(out)
        for k, v in out.items():
            acc.setdefault(k, []).append(float(v))
        if int(jax.device_get(state.nonfinite)) >= config.get("max_nonfinite_steps", 5):
            ckpt.close()
            raise FloatingPointError(
                f"{int(state.nonfinite)} consecutive non-finite steps ending at step {step}; last records: "
                f"{last_ids[:8]}. Lower the learning rate or check these records."
            )
        if step % config.log_every_steps == 0 or step == total:
            seconds = (time.perf_counter() - timer) / len(acc["loss"])
            tokens = float(np.sum(host_batch["attention_mask"])) * jax.process_count()
            summary = {
                "loss": float(np.mean(acc["loss"])),
                "grad_norm": float(np.mean(acc["grad_norm"])),
                "lr": acc["lr"][-1],
                "skipped_nonfinite": float(np.sum(acc["skipped_nonfinite"])),
                "step_seconds": seconds,
                "data_wait_seconds": data_wait / len(acc["loss"]),
                "tokens_per_second": tokens / seconds,
                "images_per_second": batch_size / seconds,
                **{k: float(v) for k, v in data.stats().items()},
            }
            mfu = flops.mfu(flops_per_step, seconds, jax.device_count(), jax.devices()[0].device_kind)
            if mfu is not None:
                summary["mfu"] = mfu
            if writer:
                writer.write(step, summary)
            progress.update(step, {k: summary[k] for k in CONSOLE if k in summary})
            acc, data_wait, timer = {}, 0.0, time.perf_counter()
        stop = preempted(step)
        if ckpt.should_save(step) or step == total or stop:
            ckpt.save(step, state, {"data": data.get_state()}, force=stop or step == total)
        if stop:
            logging.warning("Preemption signal received: saved step %d, exiting.", step)
            break
    ckpt.wait()
    ckpt.close()
    if writer:
        writer.close()
    if config.get("sample_at_end") and jax.process_index() == 0 and step >= total:
        summary["sample"] = sample_answer(parts, config, state.params)
    data.close()
    summary["step"] = step
    return summary


def sample_answer(parts, config, params) -> dict[str, str]:
    """Greedy answer of the trained model to the first held-out example; printed and returned."""
    from data_pipelines.pipeline import make_iterator
    from pargo_jax.generate import generate

    eval_input = config.input.to_dict()
    split = config.sample_at_end
    eval_input.update(
        batch_size=1, shuffle=False, repeat=False, num_workers=0,
        sources=[dict(s, split=split) for s in eval_input["sources"][:1]],
    )  # fmt: skip
    mcfg, model, tok = parts["mcfg"], parts["model"], parts["tokenizer"]
    it = make_iterator(eval_input, num_image_tokens=mcfg.num_image_tokens, seed=config.seed)
    ex = next(it)
    it.close()
    first_answer = int(np.flatnonzero(ex["loss_mask"][0])[0])
    prompt_ids = ex["input_ids"][:, : first_answer + 1]
    reference = ex["targets"][0][ex["loss_mask"][0] > 0]
    embeds = model.apply({"params": params}, ex["image"], prompt_ids, method=model.embed_inputs)
    out = generate(
        CausalLM(mcfg.llm),
        {"params": params["llm"]},
        inputs_embeds=embeds,
        attention_mask=np.ones_like(prompt_ids),
        max_new_tokens=min(32, int(config.input.max_len)),
        method="greedy",
        eos_token_id=[i for i in (tok.eos_id, tok.token_to_id("<|im_end|>")) if i is not None],
        pad_token_id=tok.pad_id,
    )
    answer = tok.decode(np.asarray(out.tokens[0][: int(out.lengths[0])]))
    result = {
        "prompt": tok.decode(prompt_ids[0][prompt_ids[0] != mcfg.image_token_id], skip_special_tokens=False),
        "answer": answer,
        "reference": tok.decode(reference),
    }
    print(json.dumps(result, indent=2), flush=True)
    return result
