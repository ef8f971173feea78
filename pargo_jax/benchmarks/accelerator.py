"""Ready for accelerators: what this device can do, and how much of it our code gets, in one run.

  python -m pargo_jax.benchmarks.accelerator --out bench_results/acc          # real shapes (one GPU/TPU)
  python -m pargo_jax.benchmarks.accelerator --tiny --out /tmp/acc            # same path, tiny (CPU, CI)

On whatever backend jax finds (one device), in order, each part rewriting ``DIR/accelerator.json``
when it ends (a timeout keeps what was done; a part that fails or lacks a module records why and the
others still run), then ``DIR/accelerator.md`` and the table on stdout:

  ceilings   the device's own limits, measured here: a bf16 N^3 matmul (random inputs, median of timed
             calls after warm-up; 2 N^3 FLOPs) and memory bandwidth (an elementwise copy of a large
             float32 array, bytes read + written). Every fraction below is against these.
  attention  which kernel the attention core picks for the LLM's shape; on GPU cuDNN vs XLA outputs
             and query gradients on random bf16 inputs (relative error ||a - b|| / ||b||).
  projector  ParGo as released (288 partial + 16 global queries, BERT-small width) on EVA02-L/14-336
             features (576 x 1024), bf16, forward + backward, one row per attention kernel (xla; auto
             on GPU only: cuDNN where a call allows it, checked against the XLA row): images/s,
             TFLOP/s (analytic, ``ParGoConfig.flops`` x 3), fraction of the matmul peak, cuDNN calls.
  train      one jitted training step (``train.make_train_step`` through ``benchmarks.train_step``):
             frozen EVA02-L/14-336 tower + ParGo 288+16 + a TinyLlama-1.1B-shaped Llama (hidden 2048,
             22 layers, 32 / 4 heads, vocab 32000), random weights, bf16 compute, the ``paper``
             preset's scan + full remat, projector and LLM trained (stage-2 SFT), one row per LLM
             attention kernel (xla, the tower and projector too; cudnn on GPU only, the tower and
             projector auto): step s, tokens/s, MFU against the measured
             peak (``flops.mllm_training_flops``), compiled peak memory and the allocator's peak.
  decode     greedy KV-cache ``generate`` of that LLM (bf16 weights) at batch 1 and 32, its layers
             scanned and one buffer per layer, the latter also checking for the end every 16 tokens
             (``generate(check_every=16)``): tokens/s and the fraction of the measured bandwidth that
             reading all weights + the whole KV cache once per new token would take.
  input      the real input pipeline (``benchmarks.input``: ArrayRecord, decode, resize, tokenize,
             batch) with 0 and N workers, beside the train step's demand (global batch / step time).

Needs only jax, flax, optax, numpy and ml_collections for the ceilings, attention, projector and decode
parts; the train step also needs clu and orbax (``pargo_jax.train``), the input part grain, array_record
and tensorflow_datasets. See docs/guide/accelerators.md.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import itertools
import json
import math
import os
import platform
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

from pargo_jax import launcher

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Every size the run uses (``full`` for an accelerator, ``tiny`` for a CPU smoke run)."""

    matmul: int
    copy_mb: int
    vision: dict  # config.model.vision
    projector: dict  # ParGo options (vision_width / llm_width / dtype set from the rest)
    llm: dict  # LLMConfig fields of the LLM (vocab_size included)
    projector_batch: int
    train_batch: int
    seq: int
    decode_batches: tuple[int, ...]
    decode_check_every: int  # a second unrolled row checks for the end every this many tokens
    prompt_len: int
    new_tokens: int
    input_images: int
    input_size: int
    input_source: tuple[int, int]
    input_batch: int
    input_workers: tuple[int, ...]
    input_max_len: int
    repeats: int


EVA02_L_336 = dict(
    path=None, format="eva02", preset="eva02-L/14-336", overrides=dict(drop_cls=True, final_norm=False)
)
TINYLLAMA_1B = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
    num_kv_heads=4, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=4096,
)  # fmt: skip


def full_shapes(backend: str) -> Shapes:
    """Real shapes; the ceilings' sizes shrink on CPU (well under a second per call)."""
    from pargo_jax.benchmarks.projector import OFFICIAL

    cpu = backend == "cpu"
    return Shapes(
        matmul=1024 if cpu else 8192, copy_mb=256 if cpu else 2048, vision=EVA02_L_336,
        projector={k: v for k, v in OFFICIAL.items() if k not in ("vision_width", "llm_width")},
        llm=TINYLLAMA_1B, projector_batch=256, train_batch=16, seq=2048, decode_batches=(1, 32),
        decode_check_every=16, prompt_len=128, new_tokens=128, input_images=512, input_size=336,
        input_source=(640, 480), input_batch=32, input_workers=(0, min(8, os.cpu_count() or 1)),
        input_max_len=2048, repeats=3,
    )  # fmt: skip


def tiny_shapes() -> Shapes:
    """The same code path at sizes that run in seconds on a CPU."""
    from pargo_jax.benchmarks.projector import QUICK

    return Shapes(
        matmul=256, copy_mb=16,
        vision=dict(path=None, format="eva02", preset="tiny",
                    overrides=dict(kind="eva02", drop_cls=True, final_norm=False)),
        projector={k: v for k, v in QUICK.items() if k not in ("vision_width", "llm_width")},
        llm=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, max_position_embeddings=128),
        projector_batch=4, train_batch=2, seq=32, decode_batches=(1, 4), decode_check_every=3, prompt_len=16,
        new_tokens=8, input_images=8, input_size=32, input_source=(48, 40), input_batch=4, input_workers=(0,),
        input_max_len=96, repeats=2,
    )  # fmt: skip


# --- helpers -----------------------------------------------------------------------------------------
_T0 = time.perf_counter()


def log(msg: str) -> None:
    """A progress line with the seconds since start (flushed: the run may be cut by a timeout)."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` (its outputs blocked on) over ``repeats`` calls after ``warmup``."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory_bytes() -> int | None:
    """The allocator's peak bytes in use on device 0 so far in this process (None where unknown)."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001  (not every backend has memory stats)
        return None
    return stats.get("peak_bytes_in_use")


def free_device_memory() -> None:
    import jax

    gc.collect()
    jax.clear_caches()


def rel_error(a, b) -> float:
    """||a - b|| / ||b|| in float32."""
    import numpy as np

    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# --- parts -------------------------------------------------------------------------------------------
def measure_ceilings(s: Shapes) -> dict:
    """bf16 matmul FLOP/s and copy bandwidth of device 0."""
    import jax
    import jax.numpy as jnp

    n = s.matmul
    ka, kb, kc = jax.random.split(jax.random.key(0), 3)
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    matmul = jax.jit(jnp.matmul)
    mm_s = median_seconds(lambda: matmul(a, b), repeats=max(10, 5 * s.repeats), warmup=2)
    x = jax.random.uniform(kc, (s.copy_mb * 2**20 // 4,), jnp.float32)
    copy = jax.jit(lambda v: v + 1.0)  # reads and writes every element once
    cp_s = median_seconds(lambda: copy(x), repeats=max(10, 5 * s.repeats), warmup=2)
    moved = 2 * x.nbytes
    return dict(
        matmul=dict(n=n, dtype="bfloat16", flops=2 * n**3, seconds=mm_s, tflops_per_s=2 * n**3 / mm_s / 1e12),
        copy=dict(bytes_moved=moved, seconds=cp_s, gb_per_s=moved / cp_s / GB),
    )


def check_attention(s: Shapes, backend: str) -> dict:
    """The kernel auto picks for the train step's LLM attention; on GPU cuDNN vs XLA numbers."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pargo_jax.models.attention import attention, choose_implementation, cudnn_unsupported

    c = s.llm
    b, t, h, kv, d = s.train_batch, s.seq, c["num_heads"], c["num_kv_heads"], c["head_dim"]
    q_shape, k_shape, mask_shape = (b, t, h, d), (b, t, kv, d), (b, 1, 1, t)
    out: dict[str, Any] = dict(
        llm_shape=dict(q=q_shape, k=k_shape, mask=mask_shape, dtype="bfloat16"),
        auto_selects=choose_implementation(None, q_shape, k_shape, jnp.bfloat16, mask_shape, backend=backend),
    )
    why = cudnn_unsupported(q_shape, k_shape, jnp.bfloat16, mask_shape, backend=backend)
    if why:
        out["cudnn"] = f"skipped: {why}"
        return out
    keys = jax.random.split(jax.random.key(1), 4)
    shape = (4, min(t, 1024), h, d)  # a few sequences are enough for the values
    q = jax.random.normal(keys[0], shape, jnp.bfloat16)
    k, v = (jax.random.normal(kk, (*shape[:2], kv, d), jnp.bfloat16) for kk in keys[1:3])
    lengths = np.array([shape[1], shape[1] - 6, shape[1] // 2, 10])
    mask = jnp.asarray(np.arange(shape[1])[None, :] < lengths[:, None])[:, None, None, :]
    cot = jax.random.normal(keys[3], shape, jnp.bfloat16)
    for name, m in (("causal", None), ("causal_padding", mask)):

        def f(q, k, v, impl, m=m):
            y, vjp = jax.vjp(lambda q: attention(q, k, v, m, causal=True, implementation=impl), q)
            return y, vjp(cot)[0]

        (yc, gc_), (yx, gx) = (jax.jit(f, static_argnums=3)(q, k, v, impl) for impl in ("cudnn", "xla"))
        valid = np.ones(shape[:2], bool) if m is None else np.arange(shape[1])[None] < lengths[:, None]
        pick = lambda a, valid=valid: np.asarray(a, np.float32)[valid]  # padded query rows are never read
        out[name] = dict(
            output_rel_error=rel_error(pick(yc), pick(yx)), grad_rel_error=rel_error(pick(gc_), pick(gx))
        )
    return out


def measure_projector(s: Shapes, peak_flops: float | None, attention_impl: str | None, reference=None):
    """ParGo forward + backward (gradients of every projector parameter; features constant) in bf16,
    its attention by ``attention_impl`` ("xla", or None: cuDNN where a call allows it): (its row, its
    outputs on the first 8 images and its gradients). The row counts the compiled program's cuDNN
    attention calls and, given the XLA row's outputs as ``reference``, their relative errors."""
    import jax
    import jax.numpy as jnp

    from pargo_jax.models.projectors import projector_config, projector_module
    from pargo_jax.models.vision import vision_preset

    v = vision_preset(s.vision["preset"], **s.vision["overrides"])
    options = dict(s.projector, vision_width=v.width, llm_width=s.llm["hidden_size"], dtype="bfloat16")
    module = projector_module(projector_config("pargo", options | dict(attention_impl=attention_impl)))
    cfg, n, b = module.config, v.num_tokens, s.projector_batch
    kx, kg = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (b, n, v.width), jnp.bfloat16)
    g = jax.random.normal(kg, (b, cfg.num_queries, cfg.llm_width), jnp.bfloat16)
    params = jax.jit(module.init)(jax.random.key(0), x[:1])["params"]

    def fwd_bwd(p, x, g):
        y, vjp = jax.vjp(lambda p: module.apply({"params": p}, x), p)
        return y, vjp(g)[0]

    label = attention_impl or "auto"
    log(f"projector {label}: compiling (batch {b}) ...")
    t0 = time.perf_counter()
    step = jax.jit(fwd_bwd).lower(params, x, g).compile()
    compile_s = time.perf_counter() - t0
    sec = median_seconds(lambda: step(params, x, g), repeats=max(5, s.repeats), warmup=1)
    flops = 3 * cfg.flops(n) * b
    row = dict(
        attention_impl=label, batch=b, patches=n, vision_width=v.width,
        queries=f"{cfg.num_partial}+{cfg.num_global}", hidden=cfg.hidden, layers=cfg.layers,
        llm_width=cfg.llm_width, dtype="bfloat16", impl=cfg.impl, cpp=cfg.cpp,
        cudnn_calls=step.as_text().count('custom_call_target="__cudnn$fmha'), compile_seconds=compile_s,
        seconds=sec, images_per_second=b / sec, flops=flops, tflops_per_s=flops / sec / 1e12,
        fraction_of_peak=peak_flops and flops / sec / peak_flops,
    )  # fmt: skip
    y, grads = step(params, x, g)  # the same inputs and weights in every row
    outputs = (y[:8], jnp.concatenate([a.astype(jnp.float32).ravel() for a in jax.tree.leaves(grads)]))
    if reference is not None:
        row.update(output_rel_error=rel_error(outputs[0], reference[0]),
                   grad_rel_error=rel_error(outputs[1], reference[1]))  # fmt: skip
    log(f"projector {label}: {row['images_per_second']:.0f} images/s, {row['cudnn_calls']} cuDNN calls")
    return row, outputs


def train_config(s: Shapes, attention_impl: str | None):
    """The ``paper`` preset with a random EVA02-L tower, the shapes' ParGo and LLM, projector + LLM
    trained; the preset's LLM overrides kept (scan, remat) except InternLM2's fused q/k/v."""
    import ml_collections

    from experiments import base
    from pargo_jax.benchmarks.train_step import TRAINABLE

    _, c = base.preset("paper")
    overrides = dict(c.model.llm.overrides, fused_qkv=False, attention_impl=attention_impl)
    # the tower's and the projector's attention: XLA in the XLA row, else cuDNN where their calls allow it
    others = "xla" if attention_impl == "xla" else None
    c.model.vision = ml_collections.ConfigDict(s.vision)
    c.model.vision.overrides = dict(s.vision["overrides"], attention_impl=others)
    c.model.projector = dict(name="pargo", **s.projector, attention_impl=others)
    c.model.llm = dict(path=None, config=dict(s.llm), overrides=overrides)
    c.trainable = base.regex_dict(TRAINABLE["full"])
    c.input.batch_size, c.input.max_len = s.train_batch, s.seq
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    return c


def measure_train(s: Shapes, attention_impl: str, peak_flops: float | None) -> dict:
    """Builds, compiles and times one training step (1 untimed, ``repeats`` timed)."""
    import types

    import jax

    from pargo_jax import flops, runs, sharding
    from pargo_jax.benchmarks.train_step import JaxSide, make_batch

    config = train_config(s, attention_impl)
    vocab, image_id = s.llm["vocab_size"], 3
    tok = types.SimpleNamespace(vocab_size=vocab, image_token_id=image_id)
    mcfg = runs.model_config(config, tok)
    host = make_batch(s.train_batch, s.seq, mcfg.image_size, mcfg.num_image_tokens, vocab, image_id)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    log(f"train {attention_impl}: building + compiling (batch {s.train_batch} x seq {s.seq}) ...")
    side = JaxSide(config, tok, mesh, host)
    log(f"train {attention_impl}: init {side.init_seconds:.1f}s, compile {side.compile_seconds:.1f}s")
    times, losses = [], []
    for i in range(1 + s.repeats):
        dt, loss = side.step()
        losses.append(loss)
        if i:
            times.append(dt)
        log(f"train {attention_impl}: step {i} {dt:.3f}s loss {loss:.4f}{'' if i else ' (untimed)'}")
    sec = statistics.median(times)
    step_flops = s.train_batch * flops.mllm_training_flops(
        mcfg.vision, mcfg.projector, mcfg.llm, s.seq, train_projector=True, train_llm=True
    )
    kind = jax.devices()[0].device_kind
    params = sum(x.size for x in jax.tree.leaves(side.state.params["llm"]))
    row = dict(
        attention_impl=attention_impl, batch=s.train_batch, seq=s.seq, image_tokens=mcfg.num_image_tokens,
        llm_params=int(params), scan_layers=mcfg.llm.scan_layers, remat=mcfg.llm.remat_policy,
        init_seconds=side.init_seconds, compile_seconds=side.compile_seconds, step_seconds=sec,
        step_seconds_all=times, losses=losses, tokens_per_second=s.train_batch * s.seq / sec,
        images_per_second=s.train_batch / sec, model_flops_per_step=step_flops,
        tflops_per_s=step_flops / sec / 1e12, mfu_measured_peak=peak_flops and step_flops / sec / peak_flops,
        mfu_spec_peak=flops.mfu(step_flops, sec, 1, kind), **side.memory(),
        allocator_peak_bytes=peak_memory_bytes(),
    )  # fmt: skip
    del side
    free_device_memory()
    return row


def measure_decode(s: Shapes, bandwidth: float | None, layouts=("scan", "unrolled")) -> dict:
    """Greedy decoding of the shapes' LLM (bf16 weights, random init) at each decode batch, with the
    layers' weights as one scanned stack and as one buffer per layer (:func:`llm.unscanned`); the
    latter also checking for the end every ``s.decode_check_every`` tokens instead of every token."""
    import dataclasses as dc

    import jax
    import jax.numpy as jnp

    from pargo_jax.benchmarks.decode import left_padded_prompts, time_greedy
    from pargo_jax.models.llm import CausalLM, LLMConfig, unscanned

    cfg = LLMConfig(**s.llm, scan_layers=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    init_ids = jnp.ones((1, 8), jnp.int32)
    params = jax.jit(CausalLM(cfg).init)(jax.random.key(0), init_ids)["params"]
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    rows: dict[str, Any] = {}
    tokens = {}
    for layout in layouts:
        lcfg, lparams = (cfg, params) if layout == "scan" else unscanned(cfg, params)
        checks = (1,) if layout == "scan" else sorted({1, s.decode_check_every})
        for every, b in itertools.product(checks, s.decode_batches):
            ids, mask = left_padded_prompts(b, s.prompt_len, cfg.vocab_size)
            cache_len = s.prompt_len + s.new_tokens
            kv_bytes = 2 * cfg.num_layers * b * cache_len * cfg.num_kv_heads * cfg.head_dim * 2  # k, v bf16
            row: dict[str, Any] = dict(batch=b, layers=layout, check_every=every, prompt_len=s.prompt_len)
            row["new_tokens"] = s.new_tokens
            impl = None
            variables = {"params": lparams}
            run = functools.partial(time_greedy, ids=ids, mask=mask, new_tokens=s.new_tokens,
                                    repeats=s.repeats, check_every=every)  # fmt: skip
            try:
                timing = run(CausalLM(lcfg), variables)
            except Exception as e:  # noqa: BLE001  (auto picked a kernel that failed here: retry on XLA)
                row["auto_error"] = f"{type(e).__name__}: {e}"[:500]
                impl = "xla"
                timing = run(CausalLM(dc.replace(lcfg, attention_impl=impl)), variables)
            sec = timing["seconds"]
            per_token = (weight_bytes + kv_bytes) * s.new_tokens / sec
            row.update(
                attention_impl=impl or "auto", first_call_seconds=timing["first_call_seconds"], seconds=sec,
                tokens_per_second=b * s.new_tokens / sec, weight_bytes=weight_bytes, kv_cache_bytes=kv_bytes,
                bytes_per_second=per_token, fraction_of_bandwidth=bandwidth and per_token / bandwidth,
            )  # fmt: skip
            tokens[layout, every, b] = timing["tokens"]
            if every > 1:  # the same program, checked less often: the same tokens
                row["same_tokens_as_every_1"] = bool((timing["tokens"] == tokens[layout, 1, b]).all())
            elif ("scan", 1, b) in tokens and layout != "scan":  # same weights: the same greedy tokens
                row["same_tokens_as_scan"] = bool((timing["tokens"] == tokens["scan", 1, b]).all())
            name = f"{layout}_batch_{b}" if every == 1 else f"{layout}_every_{every}_batch_{b}"
            rows[name] = row
            log(f"decode {name}: {row['tokens_per_second']:.1f} tokens/s ({sec:.3f}s)")
        del lparams
    del params
    free_device_memory()
    return rows


def measure_input(s: Shapes, demand: float | None) -> dict:
    """Images/s of the real pipeline at each worker count, beside the train step's demand."""
    import grain  # noqa: F401  (the pipeline's modules: a missing one skips the part by name)
    import tensorflow_datasets  # noqa: F401

    from pargo_jax.benchmarks.input import bench_input_config, pipeline_rate, write_bench_records

    rows: dict[str, Any] = dict(image_size=s.input_size, batch=s.input_batch, source=list(s.input_source),
                                cpus=os.cpu_count(), demand_images_per_second=demand)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="pargo_acc_input_") as d:
        write_bench_records(d, s.input_images, s.input_batch, 2 * s.input_images, *s.input_source)
        for w in s.input_workers:
            cfg = bench_input_config(d, s.input_batch, s.input_size, "letterbox", s.input_max_len, w)
            tokens = s.projector["num_partial"] + s.projector["num_global"]  # ParGo's image tokens
            rate = pipeline_rate(cfg, s.input_images, num_image_tokens=tokens)
            rows[f"workers_{w}"] = dict(
                workers=w, images_per_second=rate, supply_over_demand=demand and rate / demand
            )
            log(f"input {w} workers: {rate:.1f} images/s")
    return rows


# --- the run -----------------------------------------------------------------------------------------
def run_part(results: dict, name: str, fn: Callable[[], Any], out_dir: str, root: dict | None = None) -> Any:
    """``results[name] = fn()``; a missing module or an error is recorded instead. Then writes ``root``
    (default ``results``: the whole JSON) to ``out_dir``."""
    t0 = time.perf_counter()
    log(f"{name} ...")
    try:
        results[name] = fn()
    except ModuleNotFoundError as e:
        results[name] = {"skipped": f"{e.name} not installed"}
    except Exception as e:  # noqa: BLE001  (one failing part must not lose the others)
        traceback.print_exc()
        results[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    log(f"{name} done in {time.perf_counter() - t0:.1f}s")
    write_json(results if root is None else root, out_dir)
    return results[name]


def write_json(results: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "accelerator.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def table(r: dict) -> str:
    """Markdown table of the results (a part that failed or was skipped shows why)."""
    head = "| part | setting | seconds | rate | TFLOP/s | of measured peak | memory GB | note |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def add(part, setting="", sec=None, rate="", tflops=None, frac=None, mem="", note=""):
        cells = [part, setting, _fmt(sec, ".4f"), rate, _fmt(tflops, ".1f"), _fmt(frac, ".1%"), mem, note]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")

    def why(d: Any) -> str | None:
        return d if isinstance(d, str) else d.get("skipped") or d.get("error")

    c = r.get("ceilings", {})
    if why(c):
        add("ceilings", note=why(c))
    elif c:
        m, cp = c["matmul"], c["copy"]
        add("matmul peak", f"bf16 {m['n']}^3", m["seconds"], tflops=m["tflops_per_s"], note="reference")
        setting = f"f32 copy, {cp['bytes_moved'] / GB:.2f} GB read + written"
        add("memory bandwidth", setting, cp["seconds"], f"{cp['gb_per_s']:.1f} GB/s", note="reference")
    a = r.get("attention", {})
    if why(a):
        add("attention", note=why(a))
    elif a:
        errors = [
            f"{k}: out {a[k]['output_rel_error']:.1e}, grad {a[k]['grad_rel_error']:.1e}"
            for k in ("causal", "causal_padding")
            if isinstance(a.get(k), dict)
        ]
        note = "cuDNN vs XLA rel. error " + "; ".join(errors) if errors else a.get("cudnn", "")
        add("attention", f"LLM q {tuple(a['llm_shape']['q'])}: auto picks {a['auto_selects']}", note=note)
    for impl, p in r.get("projector", {}).items():
        if why(p):
            add(f"ParGo fwd+bwd ({impl})", note=why(p))
            continue
        setting = f"{p['queries']} on {p['patches']}x{p['vision_width']}, B {p['batch']}, bf16"
        note = f"{p['cudnn_calls']} cuDNN calls; compile {p['compile_seconds']:.1f}s"
        if "output_rel_error" in p:
            note += f"; vs XLA rel. error out {p['output_rel_error']:.1e}, grad {p['grad_rel_error']:.1e}"
        rate = f"{p['images_per_second']:.0f} img/s"
        add(f"ParGo fwd+bwd ({impl})", setting, p["seconds"], rate, p["tflops_per_s"], p["fraction_of_peak"],
            note=note)  # fmt: skip
    for impl, t in r.get("train", {}).items():
        if why(t):
            add(f"train step ({impl})", note=why(t))
            continue
        compiled, allocator = t.get("peak_bytes"), t.get("allocator_peak_bytes")
        mem = f"{_fmt(compiled and compiled / GB, '.2f')} / {_fmt(allocator and allocator / GB, '.2f')}"
        setting = f"B {t['batch']} x {t['seq']}, LLM {t['llm_params'] / 1e9:.2f}B, remat {t['remat']}"
        rate = f"{t['tokens_per_second']:.0f} tok/s"
        note = f"MFU; compile {t['compile_seconds']:.1f}s; memory compiled / allocator peak"
        add(f"train step ({impl})", setting, t["step_seconds"], rate, t["tflops_per_s"],
            t["mfu_measured_peak"], mem, note)  # fmt: skip
    d = r.get("decode", {})
    if why(d):
        add("greedy decode", note=why(d))
    else:
        for row in d.values():
            setting = (
                f"{row['layers']} layers, prompt {row['prompt_len']} + {row['new_tokens']} new, "
                f"attention {row['attention_impl']}"
            )
            if row.get("check_every", 1) > 1:
                setting += f", end checked every {row['check_every']} tokens"
            rate = f"{row['tokens_per_second']:.0f} tok/s"
            note = "of bandwidth: (weights + KV cache) per token"
            add(f"greedy decode (batch {row['batch']})", setting, row["seconds"], rate,
                frac=row["fraction_of_bandwidth"], note=note)  # fmt: skip
    i = r.get("input", {})
    if why(i):
        add("input pipeline", note=why(i))
    else:
        for k, row in i.items():
            if k.startswith("workers_"):
                demand = _fmt(i["demand_images_per_second"], ".0f")
                note = f"train step demand {demand} img/s (supply x{_fmt(row['supply_over_demand'], '.2f')})"
                add(f"input pipeline ({row['workers']} workers)", f"{i['image_size']} px, batch {i['batch']}",
                    rate=f"{row['images_per_second']:.0f} img/s", note=note)  # fmt: skip
    return "\n".join(lines)


def _args(argv: list[str] | None):
    p = launcher.ArgumentParser(
        prog="python -m pargo_jax.benchmarks.accelerator", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", default="bench_results/accelerator", help="directory for accelerator.json / .md")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke run of the same code)")
    p.add_argument("--parts", default="ceilings,attention,projector,train,decode,input", help="comma list")
    p.add_argument("--projector_batch", type=int, default=None, help="override the projector part's batch")
    p.add_argument("--train_batch", type=int, default=None, help="override the train step's batch")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (train: after 1 untimed)")
    p.add_argument("--decode_batches", default=None, help="comma list overriding the decode batches")
    p.add_argument("--decode_check_every", type=int, default=None, help="tokens between end checks (2nd row)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = _args(argv)
    import flax
    import jax

    backend, dev = jax.default_backend(), jax.devices()[0]
    s = tiny_shapes() if a.tiny else full_shapes(backend)
    for name in ("projector_batch", "train_batch", "decode_check_every", "repeats"):
        if getattr(a, name):
            s = dataclasses.replace(s, **{name: getattr(a, name)})
    if a.decode_batches:
        s = dataclasses.replace(s, decode_batches=tuple(int(b) for b in a.decode_batches.split(",")))
    parts = [x for x in a.parts.split(",") if x]
    results: dict[str, Any] = dict(
        meta=dict(
            jax=jax.__version__,
            jaxlib=_version("jaxlib"),
            flax=flax.__version__,
            optax=_version("optax"),
            numpy=_version("numpy"),
            backend=backend,
            device_kind=dev.device_kind,
            device_count=jax.device_count(),
            python=platform.python_version(),
            cpus=os.cpu_count(),
            tiny=a.tiny,
            shapes=dataclasses.asdict(s),
            xla_flags=os.environ.get("XLA_FLAGS", ""),
        )  # fmt: skip
    )
    try:  # private, and GPU builds only
        from jax._src.lib import cuda_versions

        results["meta"]["cudnn"] = cuda_versions.cudnn_get_version() if cuda_versions else None
    except Exception:  # noqa: BLE001
        pass
    log(f"jax {jax.__version__}, flax {flax.__version__}, backend {backend}, device {dev.device_kind} "
        f"(x{jax.device_count()}), {'tiny' if a.tiny else 'full'} shapes")  # fmt: skip
    if "ceilings" in parts:
        c = run_part(results, "ceilings", lambda: measure_ceilings(s), a.out)
        if "matmul" in c:
            log(f"matmul {c['matmul']['tflops_per_s']:.1f} TFLOP/s, copy {c['copy']['gb_per_s']:.1f} GB/s")
    ceil = results.get("ceilings", {})
    peak = ceil["matmul"]["tflops_per_s"] * 1e12 if "matmul" in ceil else None
    bandwidth = ceil["copy"]["gb_per_s"] * GB if "copy" in ceil else None
    # XLA-only parts first, so that a cuDNN failure which takes the process down leaves their numbers
    projector = results.setdefault("projector", {}) if "projector" in parts else None
    xla_outputs: dict[str, Any] = {}  # the XLA projector row's, which the auto row is checked against
    no_cudnn = f"cuDNN attention needs a CUDA GPU (backend is {backend})"

    def projector_row(impl: str | None) -> dict:
        row, outputs = measure_projector(s, peak, impl, xla_outputs.get("outputs"))
        if impl == "xla":
            xla_outputs["outputs"] = outputs
        return row

    if projector is not None:
        run_part(projector, "xla", lambda: projector_row("xla"), a.out, results)
    train = results.setdefault("train", {}) if "train" in parts else None
    if train is not None:
        run_part(train, "xla", lambda: measure_train(s, "xla", peak), a.out, results)
    if "attention" in parts:
        run_part(results, "attention", lambda: check_attention(s, backend), a.out)
    if projector is not None:
        if backend != "gpu":
            projector["auto"] = {"skipped": no_cudnn}
        else:
            run_part(projector, "auto", lambda: projector_row(None), a.out, results)
        xla_outputs.clear()
    if train is not None:
        if backend != "gpu":
            train["cudnn"] = {"skipped": no_cudnn}
        else:
            run_part(train, "cudnn", lambda: measure_train(s, "cudnn", peak), a.out, results)
        xla, cud = train["xla"], train["cudnn"]
        if "losses" in xla and "losses" in cud:  # same weights and batch: the first losses should agree
            cud["first_loss_rel_diff_vs_xla"] = abs(cud["losses"][0] / xla["losses"][0] - 1)
        write_json(results, a.out)
    if "decode" in parts:
        run_part(results, "decode", lambda: measure_decode(s, bandwidth), a.out)
    if "input" in parts:
        steps = [t["step_seconds"] for t in results.get("train", {}).values() if "step_seconds" in t]
        demand = s.train_batch / min(steps) if steps else None
        run_part(results, "input", lambda: measure_input(s, demand), a.out)
    text = table(results)
    results["table"] = text
    write_json(results, a.out)
    with open(os.path.join(a.out, "accelerator.md"), "w") as f:
        f.write(f"jax {jax.__version__}, flax {flax.__version__}, {backend}: {dev.device_kind}\n\n{text}\n")
    log(f"wrote {os.path.join(a.out, 'accelerator.json')} and accelerator.md")
    print(text, flush=True)
    return results


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    launcher.run_argparse(main)
