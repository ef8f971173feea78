"""Per-device memory of a real preset's training (both stages) at 1 / 8 / 64 / 256 devices.

  python -m pargo_jax.benchmarks.memory --out /tmp/memory.json            # paper: a few minutes on a CPU
  python -m pargo_jax.benchmarks.memory --devices 1,8 --activations=false  # state only, seconds
  python -m pargo_jax.benchmarks.memory --presets siglip_qwen2 --activations=false

Nothing is allocated and no checkpoint is read: the model is built from the preset's shapes (``paper``:
EVA02-CLIP-L/14-336, ParGo 288 + 16, InternLM2-7B as released; ``siglip_qwen2``: SigLIP-so400m/14-384,
ParGo 243 + 16, Qwen2.5-7B), on virtual CPU devices, with its ``model.frozen_dtype`` (``params``) and
with float32 storage (``params_float32``).

  params, optimizer state  exact: every array's shard on the busiest device of a data x fsdp mesh
                           (``jax.eval_shape`` + the shardings training uses);
  activations              XLA's temp bytes of the compiled train step on one device, compiled with
                           2 and 4 LLM layers x microbatches of 1 and 2 examples and extrapolated
                           linearly to the LLM's depth and the per-device microbatch (the global
                           batch over the data x fsdp devices, split into ``grad_accum_steps`` of
                           at most ``--microbatch``), per ``--variants`` (LLM remat policy :
                           ``loss_chunk``).
                           A CPU compile: TPU / GPU fuse differently, and FSDP adds one gathered
                           layer (~0.9 GB in bfloat16) to the working set.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
from collections.abc import Callable

from pargo_jax import launcher

INTERNLM2_7B = dict(  # internlm/internlm2-7b config.json
    vocab_size=92544, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1_000_000.0, max_position_embeddings=32768,
    tie_word_embeddings=False,
)  # fmt: skip
QWEN2_5_7B = dict(  # Qwen/Qwen2.5-7B-Instruct config.json
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
    num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=32768,
    tie_word_embeddings=False, qkv_bias=True, family="qwen2",
)  # fmt: skip
LLMS = {"paper": INTERNLM2_7B, "siglip_qwen2": QWEN2_5_7B}
GB = 1e9


@dataclasses.dataclass(frozen=True)
class _Tokenizer:
    """What ``runs.model_config`` reads from a tokenizer: the LLM's vocabulary, its last id the image's."""

    vocab_size: int
    image_token_id: int


def _tokenizer(preset: str) -> _Tokenizer:
    vocab = LLMS[preset]["vocab_size"]
    return _Tokenizer(vocab, vocab - 1)


def _args(argv=None):
    p = launcher.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="paper", help=f"comma list of {sorted(LLMS)}")
    p.add_argument("--devices", default="1,8,64,256", help="device counts (virtual CPU devices)")
    p.add_argument("--microbatch", type=int, default=2, help="largest per-device microbatch")
    p.add_argument("--variants", default="none:0,full:0,full:128", help="remat_policy:loss_chunk, ...")
    p.add_argument("--activations", default="true", choices=("true", "false"))
    p.add_argument("--out", default="memory_benchmark.json")
    return p.parse_args(argv)


def preset_config(preset: str, stage: str, *, layers: int | None = None, remat: str = "none"):
    """``preset`` of ``stage`` ("pretrain" | "sft") with its released shapes and no files."""
    from experiments import pretrain, sft

    c = (pretrain if stage == "pretrain" else sft).get_config(preset)
    c.model.vision.path = None  # the preset's tower shape, random: nothing to read
    llm = dict(LLMS[preset], num_layers=layers or LLMS[preset]["num_layers"])
    c.model.llm = dict(path=None, config=llm, overrides=dict(c.model.llm.overrides, remat_policy=remat))
    c.model.projector.init_from_bert = None
    return c


def _bytes(tree, shardings) -> int:
    """Bytes of ``tree``'s (ShapeDtypeStruct) leaves on one device under ``shardings``."""
    import jax
    import numpy as np

    leaves, specs = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    return sum(
        int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize for x, s in zip(leaves, specs, strict=True)
    )


def _stored(setup, config):
    """The abstract params as training stores them (``model.frozen_dtype``)."""
    import jax

    from pargo_jax import optim

    store = lambda p: optim.store_frozen(p, setup.labels, config.model.frozen_dtype)
    return jax.eval_shape(store, setup.parts.abstract)


def state_bytes(preset: str, stage: str, mesh) -> dict[str, int]:
    """Params and optimizer-state bytes per device of ``stage`` on ``mesh``, and the global counts."""
    import jax

    from pargo_jax import sharding, train

    config = preset_config(preset, stage)
    with sharding.mesh_context(mesh):
        setup = train.build_model(config, _tokenizer(preset), mesh)
        abstract, shardings = setup.parts.abstract, setup.parts.shardings
        trainable, _ = train.split_params(abstract, setup.labels)
        train_shardings, _ = train.split_params(shardings, setup.labels)
        opt = jax.eval_shape(setup.tx.init, trainable)
        opt_shardings = train.optimizer_shardings(setup.tx, trainable, train_shardings,
                                                  jax.NamedSharding(mesh, jax.P()))  # fmt: skip
        stored = _stored(setup, config)
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    return dict(
        params=_bytes(stored, shardings), params_float32=_bytes(abstract, shardings),
        optimizer=_bytes(opt, opt_shardings), num_params=count(abstract), num_trainable=count(trainable),
        frozen_dtype=config.model.frozen_dtype,
    )  # fmt: skip


def activation_bytes(preset: str, stage: str, remat: str, loss_chunk: int) -> Callable[[int], float]:
    """``microbatch -> XLA temp bytes`` of the train step on one device at the LLM's depth: a fit
    ``(a + b m) + layers (c + d m)`` to compiles at 2 / 4 layers and 1 / 2 examples."""
    import jax
    import jax.numpy as jnp

    from pargo_jax import sharding, train

    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    temps = {}
    for layers, micro in itertools.product((2, 4), (1, 2)):  # (a 1-layer scan compiles differently)
        config = preset_config(preset, stage, layers=layers, remat=remat)
        with sharding.mesh_context(mesh):
            setup = train.build_model(config, _tokenizer(preset), mesh)
            # float32 storage here: with bfloat16-stored frozen weights XLA:CPU's temps grew from 4.0
            # to 31.9 GB (paper, full remat), about a float32 copy of the LLM (it has no bfloat16
            # matmul): a CPU artefact that says nothing of a GPU or TPU.
            params = setup.parts.abstract
            trainable, _ = train.split_params(params, setup.labels)
            scalar = jax.ShapeDtypeStruct((), jnp.int32)
            opt = jax.eval_shape(setup.tx.init, trainable)
            state = train.TrainState(step=scalar, params=params, opt_state=opt, nonfinite=scalar)
            size, seq = setup.mcfg.vision.image_size, int(config.input.max_len)
            batch = {"image": jax.ShapeDtypeStruct((micro, size, size, 3), jnp.float32)}
            batch |= {k: jax.ShapeDtypeStruct((micro, seq), jnp.int32) for k in train.TEXT_KEYS}
            batch["loss_mask"] = jax.ShapeDtypeStruct((micro, seq), jnp.float32)
            step = train.make_train_step(
                setup.model, setup.tx, setup.labels, setup.schedule, loss_chunk=loss_chunk
            )
            what = f"{preset} {stage}: {layers} LLM layers, microbatch {micro}, remat={remat}"
            what += f", loss_chunk={loss_chunk}"
            print(f"  compiling {what} ...", file=sys.stderr, flush=True)
            compiled = jax.jit(step).lower(state, batch).compile()
            temps[layers, micro] = float(compiled.memory_analysis().temp_size_in_bytes)
    depth = LLMS[preset]["num_layers"]
    at_depth = {m: temps[2, m] + (depth - 2) * (temps[4, m] - temps[2, m]) / 2 for m in (1, 2)}
    return lambda m: at_depth[1] + (m - 1) * (at_depth[2] - at_depth[1])


def mesh_choices(n: int) -> list[dict[str, int]]:
    """FSDP over every device, and for pods data-parallel groups of 8- / 64-way FSDP."""
    out = [{"data": 1, "fsdp": n}]
    out += [{"data": n // f, "fsdp": f} for f in (64, 8) if n > f and n % f == 0]
    return out


def main(argv=None) -> dict:
    from pargo_jax.process_setup import set_host_device_count

    a = _args(argv)
    counts = [int(x) for x in a.devices.split(",")]
    set_host_device_count(max(counts))
    import jax

    from experiments import pretrain, sft
    from pargo_jax import sharding

    presets = a.presets.split(",")
    unknown = set(presets) - set(LLMS)
    if unknown:
        raise SystemExit(f"Unknown presets {sorted(unknown)}; choose from {sorted(LLMS)}.")
    variants = a.variants.split(",") if a.activations == "true" else []
    rows = []
    for preset in presets:
        stages = {"pretrain": pretrain.get_config(preset), "sft": sft.get_config(preset)}
        acts = {}
        for stage in stages:
            for v in variants:
                remat, chunk = v.split(":")
                acts[stage, v] = activation_bytes(preset, stage, remat, int(chunk))
        for stage, config in stages.items():
            global_batch = int(config.input.batch_size)
            for n in counts:
                for spec in mesh_choices(n):
                    ways = spec["data"] * spec["fsdp"]
                    if global_batch % ways:
                        continue
                    state = state_bytes(preset, stage, sharding.make_mesh(spec, jax.devices()[:n]))
                    per_device = global_batch // ways
                    micro = math.gcd(per_device, a.microbatch)
                    row = dict(preset=preset, stage=stage, devices=n, mesh=f"data {spec['data']} x fsdp "
                               f"{spec['fsdp']}", global_batch=global_batch, per_device_batch=per_device,
                               microbatch=micro, grad_accum_steps=per_device // micro, **state)  # fmt: skip
                    for v in variants:
                        row[f"activations_{v}"] = acts[stage, v](micro)
                    rows.append(row)
    report = dict(presets=presets, llms={p: LLMS[p] for p in presets}, rows=rows)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)
    print(table(rows, variants))
    return report


def table(rows: list[dict], variants: list[str]) -> str:
    """Markdown; ``total`` = params + optimizer + the smallest activations."""
    head = "| preset | stage | devices | mesh | batch / device (micro x accum) | params (frozen float32) |"
    head += " params | optimizer |"
    for v in variants:
        remat, chunk = v.split(":")
        head += (
            f" activations (remat {remat}, {'CE in chunks of ' + chunk if int(chunk) else 'full logits'}) |"
        )
    head += " total |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        acts = [r[f"activations_{v}"] for v in variants]
        total = r["params"] + r["optimizer"] + (min(acts) if acts else 0)
        cells = [r["preset"], r["stage"], r["devices"], r["mesh"],
                 f"{r['per_device_batch']} ({r['microbatch']} x {r['grad_accum_steps']})",
                 f"{r['params_float32'] / GB:.1f} GB",
                 f"{r['params'] / GB:.1f} GB ({r['frozen_dtype']})", f"{r['optimizer'] / GB:.2f} GB",
                 *(f"{x / GB:.1f} GB" for x in acts), f"{total / GB:.1f} GB"]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    launcher.run_argparse(main)
