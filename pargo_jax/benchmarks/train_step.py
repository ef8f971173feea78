"""Training-step throughput, MFU and per-device memory of the jitted sharded step, beside a PyTorch
``transformers`` LLaVA of the same shapes doing the same forward + backward + clipped AdamW step.

  python -m pargo_jax.benchmarks.train_step                      # demo + mid, 1 and 8 devices, + torch
  python -m pargo_jax.benchmarks.train_step --quick --out /tmp/ts.json   # smoke: demo shape, 2 variants

Each device count runs in a subprocess of this script (``--devices N``), which sets
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before importing jax; the parent collects
their JSON, prints a markdown table and writes ``--out``. The 8-device run uses the mesh
``fsdp=8`` (parameters, gradients and Adam moments sharded over ``embed``, batch over ``fsdp``); on a
CPU host its 8 "devices" share the same cores, so its step time says nothing about scaling: it is
there for the per-device memory (``state/dev``: params + optimizer state bytes actually held by the
busiest device, summed over ``addressable_shards``; ``fsdp x``: that over the 1-device number).

Shapes (the model is built from an ``experiments.base`` ConfigDict through ``runs.model_config``):

  demo  ``experiments/pretrain.py`` demo: tiny SigLIP-style tower 64 px / patch 8 (64 patches),
        ParGo 16 + 4 tokens, tiny Llama (hidden 128, 4 layers, shapes vocabulary of 150), batch 16,
        max_len 64. The MLP (LLaVA) projector gives 64 image tokens, so its rows use seq 128.
  mid   SmolLM2-135M-sized Llama (hidden 576, intermediate 1536, 30 layers, 9 / 3 heads, head_dim 64,
        vocab 49152, tied embeddings), ViT-B/16-sized SigLIP tower (width 768, depth 12, heads 12,
        mlp 3072, 224 px -> 196 patches, last block without the post-LN, as HF LLaVA's
        ``hidden_states[-1]``). ParGo: 49 partial + 8 global queries (49 = 2 x 2 windows tiling the
        14 x 14 grid; 64 does not divide 196), hidden 768, heads 12, 2 layers, mlp 3072. seq 256
        (ParGo: 57 image + 199 text tokens; MLP: 196 image + 60 text), batch 8 (the smallest batch
        that the fsdp=8 mesh can split; about 2 TFLOP per full-train step, tens of seconds on 2 cores).

Variants ``projector:train[:loss_chunk]``: ``stage1`` trains the projector only (LLM and tower
frozen, as ``experiments/pretrain.py`` for real checkpoints), ``full`` trains projector + LLM (the
tower stays frozen); a ``loss_chunk`` > 0 takes the cross-entropy that many positions at a time
(``config.loss_chunk``; its row's ``train`` reads e.g. ``full, CE/64``), e.g.
``pargo:full,pargo:full:64`` for peak memory with and without it. Projector ``mg_llava`` (demo shape
only) is the ``mg_llava_demo`` preset: the demo's ParGo plus a random tiny ConvNeXt at 256 px, the
Conv-Gate and 4 object tokens from random boxes, its fusion and box projector trained too; its GFLOP/s
count the tower, ParGo and LLM only (no analytic count of the ConvNeXt path).

The torch baseline (1 device only) is ``LlavaForConditionalGeneration(LlavaConfig(
SiglipVisionConfig, LlamaConfig))`` with random weights, float32, ``torch.set_num_threads(2)``, the
same trainable set, ``clip_grad_norm_(1.0)`` and ``torch.optim.AdamW`` (weight decay 0, as ours),
timed in the same process, its repeats interleaved with ours; it exists only for ``mlp`` variants.

Numbers: step seconds are medians over ``--repeats`` timed steps (after ``--warmup`` untimed ones,
compile apart); tokens/s counts every token of the batch (no padding here); GFLOP/s and MFU use the
analytic model FLOPs of ``pargo_jax.flops.mllm_training_flops`` (the same for both sides) and its
peak table (no MFU on CPU: no known peak). ``peak/dev`` is XLA's compiled memory analysis of the
step: arguments + outputs - aliased (donated) + temporaries, per device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from pargo_jax import launcher

SHAPES = ("demo", "mid")
DEFAULT_VARIANTS = "pargo:stage1,pargo:full,mlp:stage1,mlp:full"
QUICK_VARIANTS = "pargo:stage1,mlp:full"
TRAINABLE = {
    "stage1": {"projector/.*": 1.0},
    "full": {"projector/.*": 1.0, "llm/.*": 1.0},
}
# mg_llava: the mg_llava_demo preset (demo ParGo + a random tiny ConvNeXt at 256 px, Conv-Gate, 4 boxes)
PROJECTORS = ("pargo", "mlp", "mg_llava")
MB = 2**20


def _args(argv=None):
    p = launcher.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=None, help="comma list of: demo, mid (default both; --quick: demo)")
    p.add_argument("--device_counts", default="1,8", help="one subprocess per count (mesh fsdp=N)")
    p.add_argument(
        "--variants",
        default=None,
        help=f"comma list of projector:train[:loss_chunk] (default {DEFAULT_VARIANTS})",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--mesh_repeats", type=int, default=None,
        help="timed repeats when devices > 1 (default --repeats; 0: compile + memory only, no steps)",
    )  # fmt: skip
    p.add_argument("--append", action="store_true", help="merge into the rows already in --out")
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument(
        "--quick", action="store_true",
        help="smoke run: demo shape at batch 8, 1 repeat, multi-device rows compile + memory only",
    )  # fmt: skip
    p.add_argument("--mid_batch", type=int, default=8)
    p.add_argument("--mid_seq", type=int, default=256)
    p.add_argument("--mid_layers", type=int, default=30, help="LLM layers of the mid shape")
    p.add_argument("--scan_layers", action="store_true", help="nn.scan over LLM layers (default unrolled)")
    p.add_argument("--remat", default="none", help="LLM remat_policy (none | full | jax policy name)")
    p.add_argument(
        "--torch_threads", default="2,1", help="comma list: torch rows timed at each intra-op thread count"
    )
    p.add_argument("--torch_warmup", type=int, default=3, help="untimed torch steps per thread count")
    p.add_argument(
        "--xla_flags", default="", help="extra XLA_FLAGS for the JAX subprocesses (use the = form), e.g. "
        "--xla_flags='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'",
    )  # fmt: skip
    p.add_argument("--out", default="bench_results/train_step.json")
    p.add_argument("--devices", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--child_out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.warmup, a.torch_warmup = 1, 1, 1
        if a.mesh_repeats is None:  # timing 8 virtual devices on a few cores means nothing, and their
            a.mesh_repeats = 0  # collectives can outlast XLA's 40 s rendezvous timeout on a busy machine
    a.shapes = a.shapes or ("demo" if a.quick else ",".join(SHAPES))
    a.variants = a.variants or (QUICK_VARIANTS if a.quick else DEFAULT_VARIANTS)
    return a


# --- shapes ------------------------------------------------------------------------------------------
def shape_config(name: str, projector: str, train: str, a):
    """(ConfigDict as the experiments build it, batch, seq, vocab_size, image_token_id)."""
    import ml_collections

    from experiments import base, pretrain
    from pargo_jax import demo_tower

    if name == "demo":
        from data_pipelines import shapes

        c = pretrain.get_config("mg_llava_demo" if projector == "mg_llava" else "demo")
        c.model.vision = demo_tower.random_config()  # its shape; its pretraining is not timed here
        vocab = len(dict.fromkeys([*shapes.SPECIAL_TOKENS, *shapes.vocabulary()]))
        image_token_id = shapes.SPECIAL_TOKENS.index("<image>")
        batch, seq = (8 if a.quick else c.input.batch_size), c.input.max_len
        if projector == "mlp":
            seq = 128  # 64 image tokens + 64 text tokens
    elif projector == "mg_llava":
        raise ValueError("The mg_llava variant has the demo shape only (--shapes demo).")
    elif name == "mid":
        c = base.base()
        c.model.vision.overrides = dict(
            kind="siglip", image_size=224, patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072,
            final_norm=False,
        )  # fmt: skip
        c.model.projector = dict(
            name="pargo", num_partial=49, num_global=8, hidden=768, heads=12, layers=2, mlp_dim=3072,
            layout="grid",
        )  # fmt: skip
        c.model.llm.config = dict(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=a.mid_layers,
            num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
            max_position_embeddings=2048, tie_word_embeddings=True,
        )  # fmt: skip
        vocab, image_token_id = 49152, 3
        batch, seq = a.mid_batch, a.mid_seq
    else:
        raise ValueError(f"Unknown shape {name!r}; choose from {SHAPES}.")
    if projector == "mlp":  # LLaVA-1.5; the tower's last block without its final norm, as HF LLaVA
        c.model.projector = dict(name="mlp")
        c.model.vision.overrides = dict(c.model.vision.overrides, final_norm=False)
    elif projector not in PROJECTORS:
        raise ValueError(f"Unknown projector {projector!r}; choose from {PROJECTORS}.")
    c.model.llm.overrides = dict(scan_layers=a.scan_layers, remat_policy=a.remat)
    trainable = TRAINABLE[train] | (base.MG_LLAVA_PARTS if projector == "mg_llava" else {})
    c.trainable = ml_collections.ConfigDict(trainable, allow_dotted_keys=True)
    c.input.max_len = seq
    c.input.batch_size = batch
    return c, batch, seq, vocab, image_token_id


def make_batch(
    batch: int,
    seq: int,
    image_size: int,
    num_image_tokens: int,
    vocab: int,
    image_id: int,
    num_boxes: int = 0,
):
    """Host batch: ``<s>`` + image tokens + random text; loss on the text tokens (targets = next id);
    ``num_boxes`` random boxes per image (MG-LLaVA's object tokens)."""
    import numpy as np

    if num_image_tokens + 2 > seq:
        raise ValueError(f"seq={seq} cannot hold {num_image_tokens} image tokens and some text.")
    rng = np.random.default_rng(0)
    ids = rng.integers(7, vocab, (batch, seq + 1)).astype(np.int32)
    ids[:, 0] = 2
    ids[:, 1 : 1 + num_image_tokens] = image_id
    loss_mask = np.zeros((batch, seq), np.int32)
    loss_mask[:, num_image_tokens:] = 1  # predicting the text tokens after the image
    out = {
        "image": rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32),
        "input_ids": ids[:, :seq],
        "targets": ids[:, 1:],
        "loss_mask": loss_mask,
        "attention_mask": np.ones((batch, seq), np.int32),
    }
    if num_boxes:
        corners = np.sort(rng.uniform(0, image_size, (batch, num_boxes, 2, 2)), axis=2)  # x1 <= x2, y1 <= y2
        out["boxes"] = corners.reshape(batch, num_boxes, 4).astype(np.float32)
    return out


# --- ours --------------------------------------------------------------------------------------------
def device_bytes(tree) -> dict:
    """Bytes each device holds of ``tree`` (from the arrays' addressable shards)."""
    import jax

    per: dict = {}
    for leaf in jax.tree.leaves(tree):
        for s in leaf.addressable_shards:
            per[s.device] = per.get(s.device, 0) + s.data.nbytes
    return per


class JaxSide:
    """Sharded state + compiled step for one config on ``mesh`` (train.init_state / make_train_step)."""

    def __init__(self, config, tok, mesh, host_batch):
        import jax

        from pargo_jax import sharding, train

        self.mesh = mesh
        with sharding.mesh_context(mesh):
            t0 = time.perf_counter()
            setup = train.build_model(config, tok, mesh)  # a tokenizer stand-in: no data, no files
            self.mcfg = setup.mcfg
            self.labels = setup.labels
            self.state, state_shardings = train.init_state(setup, config, mesh)
            jax.block_until_ready(self.state)
            self.init_seconds = time.perf_counter() - t0
            step_fn = train.make_train_step(
                setup.model,
                setup.tx,
                setup.labels,
                setup.schedule,
                loss_chunk=int(config.get("loss_chunk", 0)),
            )
            batch_sharding = sharding.batch_sharding(mesh)
            self.batch = sharding.shard_batch(host_batch, mesh)
            jitted = jax.jit(
                step_fn,
                in_shardings=(state_shardings, {k: batch_sharding for k in self.batch}),
                out_shardings=(state_shardings, jax.NamedSharding(mesh, jax.P())),
                donate_argnums=(0,),
            )
            t0 = time.perf_counter()
            self.compiled = jitted.lower(self.state, self.batch).compile()
            self.compile_seconds = time.perf_counter() - t0

    def memory(self) -> dict:
        from pargo_jax.flops import xla_flops

        m = self.compiled.memory_analysis()
        out = {}
        if m is not None:
            for k in ("argument", "output", "alias", "temp", "generated_code"):
                out[f"{k}_bytes"] = int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
            out["peak_bytes"] = (
                out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
            )
        params = device_bytes(self.state.params)
        opt = device_bytes(self.state.opt_state)
        busiest = max(params, key=lambda d: params[d] + opt.get(d, 0))
        out.update(
            params_bytes_per_device=params[busiest],
            opt_state_bytes_per_device=opt.get(busiest, 0),
            state_bytes_per_device=params[busiest] + opt.get(busiest, 0),
            params_bytes_total=sum(params.values()),
        )
        if (flops := xla_flops(self.compiled)) is not None:
            out["xla_flops_per_device"] = flops
        return out

    def step(self) -> tuple[float, float]:
        import jax

        t0 = time.perf_counter()
        self.state, out = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, out))
        return time.perf_counter() - t0, float(out.compute()["loss"])


# --- torch -------------------------------------------------------------------------------------------
class TorchSide:
    """transformers LLaVA of the same shapes (MLP projector), same trainable set, AdamW step."""

    def __init__(self, mcfg, train: str, host_batch, optim_cfg):
        import torch
        from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

        torch.manual_seed(0)
        v, llm = mcfg.vision, mcfg.llm
        if v.kind != "siglip" or v.apply_final_norm or v.num_blocks != v.depth:
            raise ValueError("The torch baseline mirrors a SigLIP tower's last block without final norm.")
        t0 = time.perf_counter()
        cfg = LlavaConfig(
            vision_config=SiglipVisionConfig(
                hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                layer_norm_eps=v.layer_norm_eps, vision_use_head=False,
            ),
            text_config=LlamaConfig(
                vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
                intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
                num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
                head_dim=llm.head_dim, rms_norm_eps=llm.rms_norm_eps, rope_theta=llm.rope_theta,
                max_position_embeddings=llm.max_position_embeddings,
                tie_word_embeddings=llm.tie_word_embeddings,
            ),
            image_token_index=mcfg.image_token_id, vision_feature_layer=-1,
            vision_feature_select_strategy="full", projector_hidden_act="gelu",
            tie_word_embeddings=llm.tie_word_embeddings,
        )  # fmt: skip
        model = LlavaForConditionalGeneration(cfg).float().train()
        model.model.vision_tower.requires_grad_(False)
        if train == "stage1":
            model.model.language_model.requires_grad_(False)
            model.lm_head.requires_grad_(False)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.num_trainable = sum(p.numel() for p in self.params)
        self.num_params = sum(p.numel() for p in model.parameters())
        self.opt = torch.optim.AdamW(
            self.params, lr=float(optim_cfg["lr"]), betas=(optim_cfg["b1"], optim_cfg["b2"]),
            eps=float(optim_cfg["eps"]), weight_decay=float(optim_cfg["weight_decay"]),
        )  # fmt: skip
        self.clip = optim_cfg.get("clip_norm")
        self.model = model
        ids = torch.from_numpy(host_batch["input_ids"]).long()
        labels = (
            torch.from_numpy(host_batch["input_ids"])
            .long()
            .masked_fill(torch.from_numpy(host_batch["loss_mask"]).roll(1, dims=1) == 0, -100)
        )  # label t is predicted from t-1: the text tokens after the image, as our loss_mask
        self.inputs = dict(
            input_ids=ids,
            pixel_values=torch.from_numpy(host_batch["image"]).permute(0, 3, 1, 2).contiguous(),
            attention_mask=torch.from_numpy(host_batch["attention_mask"]).long(),
            labels=labels,
        )
        self.init_seconds = time.perf_counter() - t0

    def step(self, threads: int) -> tuple[float, float]:
        import torch

        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        loss = self.model(**self.inputs).loss
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, float(self.clip))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, float(loss.detach())

    def state_bytes(self) -> int:
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        opt = sum(
            t.numel() * t.element_size()
            for s in self.opt.state.values()
            for t in s.values()
            if hasattr(t, "numel")
        )
        return params + opt


# --- child: one device count -------------------------------------------------------------------------
def run_devices(a) -> list[dict]:
    import types

    import jax
    import numpy as np

    from pargo_jax import flops, sharding

    n = a.devices
    mesh = sharding.make_mesh({"data": 1, "fsdp": n, "tensor": 1}, jax.devices()[:n])
    kind = jax.devices()[0].device_kind
    rows = []
    for shape in a.shapes.split(","):
        for variant in a.variants.split(","):
            projector, train_kind, *chunk = variant.split(":")
            config, batch, seq, vocab, image_id = shape_config(shape, projector, train_kind, a)
            config.loss_chunk = int(chunk[0]) if chunk else 0
            label = f"{train_kind}, CE/{config.loss_chunk}" if config.loss_chunk else train_kind
            tok = types.SimpleNamespace(vocab_size=vocab, image_token_id=image_id)
            from pargo_jax import runs

            mcfg = runs.model_config(config, tok)
            boxes = mcfg.high_res.max_boxes if mcfg.high_res else 0
            host = make_batch(batch, seq, mcfg.image_size, mcfg.num_image_tokens, vocab, image_id, boxes)
            print(f"[{n} dev] {shape} {variant}: building + compiling ...", file=sys.stderr, flush=True)
            ours = JaxSide(config, tok, mesh, host)
            # (name, step(), warmup steps): ours, then torch at each thread count, interleaved per repeat
            repeats = a.repeats if n == 1 or a.mesh_repeats is None else a.mesh_repeats
            sides = [("jax", ours.step, a.warmup if repeats else 0)]
            theirs = None
            if projector == "mlp" and n == 1 and not a.skip_torch:
                optim_cfg = {k: v for k, v in config.optim.items() if k != "grad_accum_steps"}
                theirs = TorchSide(mcfg, train_kind, host, optim_cfg)
                for i, th in enumerate(int(x) for x in a.torch_threads.split(",")):
                    name = "torch" if i == 0 else f"torch_{th}t"
                    sides.append((name, lambda th=th, t=theirs: t.step(th), max(a.warmup, a.torch_warmup)))
            times: dict[str, list[float]] = {name: [] for name, _, _ in sides}
            losses: dict[str, list[float]] = {name: [] for name, _, _ in sides}
            for r in range(max(w for _, _, w in sides) + repeats if repeats else 0):
                for name, step, warmup in sides:
                    if len(times[name]) >= repeats:
                        continue
                    dt, loss = step()
                    losses[name].append(loss)
                    if len(losses[name]) > warmup:
                        times[name].append(dt)
                print(
                    f"[{n} dev] {shape} {variant} step {r}: "
                    + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items() if v),
                    file=sys.stderr,
                    flush=True,
                )
            flops_step = batch * flops.mllm_training_flops(
                mcfg.vision, mcfg.projector, mcfg.llm, seq, train_vision=False, train_projector=True,
                train_llm=train_kind == "full",
            )  # fmt: skip
            common = dict(
                shape=shape, devices=n, mesh=dict(mesh.shape), projector=projector, train=label,
                batch=batch, seq=seq, image_size=mcfg.image_size,
                image_tokens=mcfg.num_image_tokens, model_flops_per_step=flops_step,
            )  # fmt: skip
            for name, _, _ in sides:
                sec = statistics.median(times[name]) if times[name] else None
                row = dict(
                    common, impl=name, step_seconds=sec, step_seconds_all=times[name],
                    tokens_per_second=sec and batch * seq / sec, images_per_second=sec and batch / sec,
                    gflops_per_second=sec and flops_step / sec / 1e9,
                    mfu=sec and flops.mfu(flops_step, sec, n, kind), losses=losses[name],
                )  # fmt: skip
                if name == "jax":
                    row.update(
                        init_seconds=ours.init_seconds, compile_seconds=ours.compile_seconds,
                        device_kind=kind, scan_layers=a.scan_layers, remat=a.remat,
                        xla_flags=os.environ.get("XLA_FLAGS", ""), **ours.memory(),
                    )  # fmt: skip
                else:
                    row.update(
                        init_seconds=theirs.init_seconds, torch_threads=int(name.split("_")[-1][:-1])
                        if "_" in name else int(a.torch_threads.split(",")[0]),
                        state_bytes_per_device=theirs.state_bytes(), num_params=theirs.num_params,
                        num_trainable=theirs.num_trainable,
                    )  # fmt: skip
                rows.append(row)
            del ours, theirs
            jax.clear_caches()
            np.random.seed(0)
    return rows


# --- parent ------------------------------------------------------------------------------------------
def _child(argv: list[str], n: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "rows.json")
        cmd = [sys.executable, "-m", "pargo_jax.benchmarks.train_step", *argv]
        cmd += ["--devices", str(n), "--child_out", path]
        subprocess.run(cmd, check=True)
        with open(path) as f:
            return json.load(f)


def add_ratios(rows: list[dict]) -> None:
    """``fsdp_state_ratio`` (state bytes per device over the 1-device run's) and ``speedup_vs_torch``."""
    key = lambda r: (r["shape"], r["projector"], r["train"], r["impl"])
    single = {key(r): r for r in rows if r["devices"] == 1}
    for r in rows:
        one = single.get(key(r))
        if one and r["impl"] == "jax":
            r["fsdp_state_ratio"] = r["state_bytes_per_device"] / one["state_bytes_per_device"]
            if "peak_bytes" in r and one.get("peak_bytes"):
                r["fsdp_peak_ratio"] = r["peak_bytes"] / one["peak_bytes"]
    jax_rows = {(r["shape"], r["projector"], r["train"], r["devices"]): r for r in rows if r["impl"] == "jax"}
    for r in rows:
        ours = jax_rows.get((r["shape"], r["projector"], r["train"], r["devices"]))
        if r["impl"].startswith("torch") and ours and ours["step_seconds"]:
            r["speedup_vs_torch"] = r["step_seconds"] / ours["step_seconds"]  # ours vs this torch row
            best = min(r["step_seconds"], ours.get("best_torch_seconds", float("inf")))
            ours["best_torch_seconds"] = best
            ours["speedup_vs_torch"] = best / ours["step_seconds"]


def table(rows: list[dict]) -> str:
    head = (
        "| shape | dev | projector | train | impl | batch x seq | step s | tokens/s | images/s | GFLOP/s "
        "| MFU | compile s | state/dev MB | fsdp x | peak/dev MB | JAX speedup |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['devices']} | {r['projector']} | {r['train']} | {r['impl']} "
            f"| {r['batch']} x {r['seq']} | {fmt(r['step_seconds'], '.3f')} "
            f"| {fmt(r['tokens_per_second'], '.0f')} | {fmt(r['images_per_second'], '.2f')} "
            f"| {fmt(r['gflops_per_second'], '.1f')} | {fmt(r.get('mfu'), '.1%')} "
            f"| {fmt(r.get('compile_seconds'), '.1f')} | {r['state_bytes_per_device'] / MB:.1f} "
            f"| {fmt(r.get('fsdp_state_ratio'), '.3f')} | {fmt(r.get('peak_bytes', 0) / MB or None, '.1f')} "
            f"| {fmt(r.get('speedup_vs_torch'), '.2f')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _args(argv)
    if a.devices is not None:  # child
        rows = run_devices(a)
        with open(a.child_out, "w") as f:
            json.dump(rows, f)
        return {"rows": rows}
    rows: list[dict] = []
    for n in (int(x) for x in a.device_counts.split(",")):
        rows += _child(argv, n)
    if a.append and os.path.exists(a.out):
        with open(a.out) as f:
            old = json.load(f)["rows"]
        key = lambda r: (r["shape"], r["devices"], r["projector"], r["train"], r["impl"])
        new = {key(r) for r in rows}
        rows = [r for r in old if key(r) not in new] + rows
        order = lambda r: (SHAPES.index(r["shape"]), r["devices"], r["projector"] != "pargo", r["train"])
        rows.sort(key=order)
    for r in rows:
        for k in ("fsdp_state_ratio", "fsdp_peak_ratio", "speedup_vs_torch", "best_torch_seconds"):
            r.pop(k, None)
    add_ratios(rows)
    result = dict(
        rows=rows,
        machine=dict(
            platform=platform.platform(),
            processor=platform.processor(),
            cpu_count=os.cpu_count(),
            load_average=os.getloadavg(),
        ),  # fmt: skip
        args=vars(a),
    )
    text = table(rows)
    print(text)
    print(f"load average (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(dict(result, table=text), f, indent=2, default=str)
    return result


def _child_env() -> None:
    """Sets the forced host device count before jax is imported (child mode only)."""
    if "--devices" not in sys.argv:
        return
    from pargo_jax.process_setup import set_host_device_count

    n = int(sys.argv[sys.argv.index("--devices") + 1])
    extra = _args([x for x in sys.argv[1:] if x != "--quick"]).xla_flags  # --xla_flags="..."
    set_host_device_count(n, extra)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


if __name__ == "__main__":
    launcher.run_argparse(main, setup=_child_env)
