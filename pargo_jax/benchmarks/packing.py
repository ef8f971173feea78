"""What packing buys: non-pad tokens per second, padding and steps per epoch, packed vs unpacked rows at
equal ``max_len``, on a length mix shaped like LLaVA-Instruct-665K.

  python -m pargo_jax.benchmarks.packing                          # demo + mid shapes
  python -m pargo_jax.benchmarks.packing --quick --out /tmp/p.json  # smoke: demo shape, a few steps

Per shape, ``--records`` samples are drawn from :data:`LLAVA_665K` (``--seed``), written as records
(tiny PNGs; words of the shapes vocabulary, one token each) and read through the real input pipeline
(``make_iterator``) twice: unpacked (one sample per row) and packed (``input.packing``, at most
``--images_per_row`` images a row). The train step (``train.make_train_step``, jitted; the projector
and the LLM train, the tower is frozen, as in the SFT) runs on those batches, the two kinds' steps
interleaved. Reported per kind: the median step, non-pad tokens per second (the batch's
``attention_mask`` summed over the step's seconds), the padding fraction, samples per step and the
steps one pass over the records takes; for the packed kind also what packing costs the host per batch
(the plan: text stage + first fit, and the whole batch with its images), beside the step.

Shapes: those of :mod:`pargo_jax.benchmarks.train_step` (demo: ParGo 20 image tokens, batch 16, and
the SFT demo's ``max_len`` 128; mid: ParGo 57 image tokens on a ViT-B/16-sized tower, a
SmolLM2-135M-sized LLM with ``--mid_layers`` layers, ``max_len`` 256, batch 8).

The mix: LLaVA-1.5's SFT data by source, with its sample counts (the LLaVA-1.5 paper, Table 7: 665K
in all). Turn counts and tokens per turn are this module's estimates of each source's shape (no data
is downloaded here), in LLaMA tokens at LLaVA's 2048-token context with 576 image tokens; a shape
scales a sample's text by its text room, ``(max_len - image tokens) / (2048 - 576)``, merging turns
where the chat template's own tokens would not fit (see :func:`draw`). LLaVA-1.5 merges every question
about an image into one conversation, which is why the VQA sources are multi-turn. The text-only
ShareGPT conversations are the long tail.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from pargo_jax import launcher
from pargo_jax.benchmarks import report


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    samples: int  # in LLaVA-1.5's 665K mix
    images: int  # 0: text-only
    turns: tuple[int, int]  # uniform, inclusive
    tokens_per_turn: float  # median of a lognormal, LLaMA tokens (question + answer)
    sigma: float


LLAVA_665K = (
    Source("llava_158k", 158_000, 1, (1, 6), 110.0, 0.6),  # conversations, descriptions, reasoning
    Source("sharegpt", 40_000, 0, (1, 6), 250.0, 0.9),  # text-only, long
    Source("vqav2", 83_000, 1, (1, 10), 14.0, 0.3),  # short answers, an image's questions merged
    Source("gqa", 72_000, 1, (1, 12), 14.0, 0.3),
    Source("okvqa", 9_000, 1, (1, 2), 14.0, 0.3),
    Source("ocrvqa", 80_000, 1, (1, 8), 16.0, 0.3),
    Source("aokvqa", 66_000, 1, (1, 2), 45.0, 0.3),  # multiple choice, options in the question
    Source("textcaps", 22_000, 1, (1, 1), 30.0, 0.4),
    Source("refcoco", 48_000, 1, (1, 10), 22.0, 0.3),  # boxes as text
    Source("vg", 86_000, 1, (1, 10), 22.0, 0.3),
)
LLAVA_CONTEXT, LLAVA_IMAGE_TOKENS = 2048, 576
TEMPLATE_TOKENS = 10  # the shapes chat template's own tokens per turn (user + assistant message)


def draw(n: int, scale: float, seed: int = 0) -> list[tuple[str, int, list[int]]]:
    """``n`` samples of the mix: (source, images, words per turn), a pure function of ``seed``. A sample's
    text keeps its share of the context (its LLaVA tokens x ``scale``); where the chat template's own
    tokens would exceed that share, its turns are merged into fewer."""
    rng = np.random.default_rng(seed)
    weights = np.array([s.samples for s in LLAVA_665K], np.float64)
    out = []
    for i in rng.choice(len(LLAVA_665K), size=n, p=weights / weights.sum()):
        s = LLAVA_665K[i]
        turns = int(rng.integers(s.turns[0], s.turns[1] + 1))
        text = float(np.sum(s.tokens_per_turn * np.exp(s.sigma * rng.standard_normal(turns)))) * scale
        kept = int(np.clip(text // (TEMPLATE_TOKENS + 2), 1, turns))
        words = max(2, int(round(text / kept)) - TEMPLATE_TOKENS)
        out.append((s.name, s.images, [words] * kept))
    return out


def write_mix(data_dir: str, samples, image_size: int) -> None:
    """The samples as records: each turn's words split between question and answer (2 : 1)."""
    from PIL import Image

    from data_pipelines import shapes
    from data_pipelines.builders import write_records
    from data_pipelines.schema import IMAGE_PLACEHOLDER, Record, Turn

    words = [w for w in shapes.vocabulary() if w.isalpha()]
    buf = io.BytesIO()
    Image.new("RGB", (image_size, image_size), (120, 30, 200)).save(buf, format="PNG")
    png = buf.getvalue()
    rng = np.random.default_rng(1)
    records = []
    for i, (_, images, turns) in enumerate(samples):
        conv = []
        for k, count in enumerate(turns):
            ask = max(1, (2 * count) // 3)
            text = lambda m: " ".join(rng.choice(words, m))  # noqa: E731
            question = (IMAGE_PLACEHOLDER + "\n" if k == 0 and images else "") + text(ask)
            conv += [Turn("user", question), Turn("assistant", text(max(1, count - ask)))]
        records.append(Record(f"s{i}", png if images else b"", conversation=conv))
    write_records(data_dir, "mix", {"train": records}, progress=False)


def _args(argv=None):
    p = launcher.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=None, help="comma list of: demo, mid (default both; --quick: demo)")
    p.add_argument("--records", type=int, default=2000, help="samples drawn from the mix per shape")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per kind")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--images_per_row", default="demo=4,mid=3", help="input.max_images_per_row per shape")
    p.add_argument("--max_len", default="demo=128,mid=256", help="input.max_len per shape")
    p.add_argument("--mid_layers", type=int, default=30, help="LLM layers of the mid shape")
    p.add_argument("--quick", action="store_true", help="smoke run: demo shape, 300 records, 2 steps each")
    p.add_argument("--out", default="bench_results/packing.json")
    a = p.parse_args(argv)
    if a.quick:
        a.records, a.repeats, a.warmup = min(a.records, 300), 2, 1
    a.shapes = a.shapes or ("demo" if a.quick else "demo,mid")
    return a


def _shape(name: str, a, data_dir: str, tokenizer: str):
    """(config, model config) of a train-step benchmark shape reading the mix."""
    import types

    from data_pipelines.text import load_tokenizer
    from pargo_jax import runs
    from pargo_jax.benchmarks import train_step

    shape_args = argparse.Namespace(quick=False, mid_batch=8, mid_seq=256, mid_layers=a.mid_layers,
                                    scan_layers=False, remat="none")  # fmt: skip
    config, *_ = train_step.shape_config(name, "pargo", "full", shape_args)
    tok = load_tokenizer(tokenizer)
    vocab = config.model.llm.get("config", {}).get("vocab_size") if name == "mid" else None
    fake = types.SimpleNamespace(vocab_size=vocab or tok.vocab_size, image_token_id=tok.image_token_id)
    mcfg = runs.model_config(config, fake)
    per_row = dict(x.split("=") for x in a.images_per_row.split(","))
    max_len = dict(x.split("=") for x in a.max_len.split(","))
    config.input.update(
        sources=[dict(name="mix", data_dir=data_dir, split="train")], tokenizer=tokenizer, data_dir=data_dir,
        image_size=mcfg.image_size, shuffle=True, overlong="truncate", max_len=int(max_len[name]),
        max_images_per_row=int(per_row[name]),
    )  # fmt: skip
    return config, mcfg, fake


def _batches(config, mcfg, packing: bool, count: int, seed: int):
    """``count`` host batches of the real pipeline, and host seconds per batch (packed: also the plan's)."""
    from data_pipelines.pipeline import make_dataset

    cfg = dict(config.input.to_dict(), packing=packing)
    ds = make_dataset(cfg, num_image_tokens=mcfg.num_image_tokens, seed=seed)
    plan_seconds = []
    if packing:
        for k in range(count):
            t0 = time.perf_counter()
            ds.plan(k)
            plan_seconds.append(time.perf_counter() - t0)
        ds = make_dataset(cfg, num_image_tokens=mcfg.num_image_tokens, seed=seed)
    out, seconds = [], []
    for k in range(count):
        t0 = time.perf_counter()
        out.append(ds[k])
        seconds.append(time.perf_counter() - t0)
    return out, statistics.median(seconds), (statistics.median(plan_seconds) if plan_seconds else None)


def _epoch_steps(config, mcfg, packing: bool, records: int, seed: int) -> float:
    """Steps one pass over the records takes (packed: plans until the cursor passes them)."""
    from data_pipelines.pipeline import make_dataset

    if not packing:
        return records / config.input.batch_size
    cfg = dict(config.input.to_dict(), packing=True, shuffle=False)
    ds = make_dataset(cfg, num_image_tokens=mcfg.num_image_tokens, seed=seed)
    k, cursor = 0, 0
    while cursor < records:
        cursor = ds.plan(k)[2]
        k += 1
    return k - (cursor - records) / max(1, cursor / k)  # the last batch counted by its share


def run_shape(name: str, a, root: str) -> list[dict]:
    import jax

    from data_pipelines import shapes
    from pargo_jax import sharding
    from pargo_jax.benchmarks.train_step import JaxSide

    data_dir = os.path.join(root, name)
    tokenizer = shapes.build(data_dir, image_size=16, num_pretrain=2, num_sft=2, num_eval=2, seed=0)[
        "tokenizer"
    ]
    config, mcfg, tok = _shape(name, a, data_dir, tokenizer)
    scale = (config.input.max_len - mcfg.num_image_tokens) / (LLAVA_CONTEXT - LLAVA_IMAGE_TOKENS)
    samples = draw(a.records, scale, a.seed)
    write_mix(data_dir, samples, 16)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    steps = a.warmup + a.repeats
    kinds = {}
    for packing in (False, True):
        batches, host, plan = _batches(config, mcfg, packing, steps, a.seed)
        keys = ["image", "input_ids", "targets", "loss_mask", "attention_mask"] + (
            ["segment_ids"] if packing else []
        )
        device = [{k: b[k] for k in keys} for b in batches]
        print(f"[{name}] {'packed' if packing else 'unpacked'}: compiling ...", file=sys.stderr, flush=True)
        side = JaxSide(config, tok, mesh, device[0])
        kinds[packing] = dict(batches=batches, device=device, side=side, host=host, plan=plan, times=[])
    for r in range(steps):  # interleaved: the VM's speed drifts
        for k in kinds.values():
            k["side"].batch = sharding.shard_batch(k["device"][r], mesh)
            seconds, _ = k["side"].step()
            if r >= a.warmup:
                k["times"].append(seconds)
        print(f"[{name}] step {r}: " + ", ".join(f"{'packed' if p else 'unpacked'} {k['times'][-1]:.3f}s"
              for p, k in kinds.items() if k["times"]), file=sys.stderr, flush=True)  # fmt: skip
    rows = []
    for packing, k in kinds.items():
        timed = k["batches"][a.warmup :]
        real = np.mean([b["attention_mask"].sum() for b in timed])
        cells = np.mean([b["attention_mask"].size for b in timed])
        per_step = np.mean([sum(len(str(r).split(",")) for r in b["record_id"]) for b in timed])
        sec = statistics.median(k["times"])
        per_row = config.input.max_images_per_row if packing else 1
        epoch = _epoch_steps(config, mcfg, packing, a.records, a.seed)
        rows.append(
            dict(
                shape=name,
                packed=packing,
                batch=config.input.batch_size,
                max_len=config.input.max_len,
                image_tokens=mcfg.num_image_tokens,
                images_per_row=per_row,
                step_seconds=sec,
                step_seconds_all=k["times"],
                tokens_per_second=real / sec,
                padding=1 - real / cells,
                samples_per_step=float(per_step),
                epoch_steps=epoch,
                host_seconds_per_batch=k["host"],
                plan_seconds_per_batch=k["plan"],
            )  # fmt: skip
        )
    lengths = [b["attention_mask"].sum(1) for b in kinds[False]["batches"]]
    rows[0]["sample_tokens_percentiles"] = np.percentile(np.concatenate(lengths), [10, 50, 90, 99]).tolist()
    rows[1]["tokens_per_second_ratio"] = rows[1]["tokens_per_second"] / rows[0]["tokens_per_second"]
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| shape | rows | batch x max_len | images/row | step s | non-pad tokens/s | padding "
        "| samples/step | steps/epoch | host s/batch (plan) | ratio |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        plan = f" ({r['plan_seconds_per_batch']:.4f})" if r["plan_seconds_per_batch"] is not None else ""
        ratio = f"**{r['tokens_per_second_ratio']:.2f}x**" if "tokens_per_second_ratio" in r else "1"
        lines.append(
            f"| {r['shape']} | {'packed' if r['packed'] else 'one sample'} | {r['batch']} x {r['max_len']} "
            f"| {r['images_per_row']} | {r['step_seconds']:.3f} | {r['tokens_per_second']:.0f} "
            f"| {r['padding']:.1%} | {r['samples_per_step']:.1f} | {r['epoch_steps']:.0f} "
            f"| {r['host_seconds_per_batch']:.4f}{plan} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    a = _args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name in a.shapes.split(","):
            rows += run_shape(name, a, root)
    return report.finish(rows, table(rows), a, a.out)


if __name__ == "__main__":
    launcher.run_argparse(main)
