"""Input pipeline throughput vs raw PIL decode + resize of the same images.

  python -m pargo_jax.benchmarks.input --num_images 1024 --out bench_results/input.json

For each image size (336, 384) it measures (1) the raw rate: ``data_pipelines.images.load`` (PIL
decode + resize, the very code the pipeline runs) of the same encoded JPEGs in one process, in a
loop, and (2) the full pipeline (ArrayRecord read, record parse, shuffle, decode, resize, chat
template, tokenize, mask, pad, batch) with 0, 1, 2 worker processes, in steady state (the first
batches, worker start-up included, are warm-up). The pipeline runs as configured by default (uint8
images, normalized on device); ``f32`` is the same with ``normalize=True`` (float32 normalized on
the host). Overhead is ``raw_rate / pipeline_rate(0 workers) - 1`` (goal <= 10%); scaling is
``rate(w) / rate(0 workers)`` and ``rate(w) / rate(1 worker)`` (workers against workers, both paying
for inter-process transfer). With 0 workers the pipeline runs synchronously (no prefetch thread) and
alternates batch by batch with the raw loop over the same images, so drift and other load hit both
sides alike; the CPU time per image of each side gives the contention-free overhead beside the
wall-clock one, and the median per-batch overhead is reported too.
Images are synthetic 640x480 photo-like JPEGs (smooth gradients, noise, shapes), built in a temp dir.
JPEGs are decoded at full resolution as the references do (``input.jpeg_draft=False``); the raw loop
is also timed with the other setting, interleaved, and ``draft_speedup`` (``draft x`` in the table) is
the raw rate with PIL's reduced-scale decode over the full one: what full decoding costs (it only
differs when a source side is >= 2x the image size). ``--jpeg_draft`` runs the pipeline with it on.
"""

from __future__ import annotations

import io
import json
import os
import platform
import tempfile
import time

import numpy as np

from pargo_jax import launcher


def synthetic_jpegs(n: int, width: int, height: int, seed: int = 0) -> list[bytes]:
    """``n`` photo-like JPEGs (gradient + noise + a few shapes), quality 90."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for _ in range(n):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (xx / width * rng.uniform(0.3, 1) + yy / height * rng.uniform(0.3, 1))[..., None] / 2
        arr = c0 * (1 - t) + c1 * t + rng.normal(0, 12, (height, width, 1))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(6):
            s = int(rng.integers(1, max(2, min(width, height) // 4)))
            x, y = rng.integers(0, width - s), rng.integers(0, height - s)
            d.ellipse((x, y, x + s, y + s), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def paired_rates(
    iterators: dict, data: list[bytes], size: int, mode: str, batch_size: int, steps: int, draft: bool = False
) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
    """Alternates one batch from each in-process iterator with ``images.load`` (PIL decode + resize,
    the code the pipeline runs) of ``batch_size`` raw images, ``steps`` times: ``"raw"`` with the
    pipeline's ``jpeg_draft=draft``, ``"raw_other"`` with the other setting.

    Returns ``{name: (images/s, CPU ms/image)}`` for every iterator and both raw loops, and per
    iterator the median over steps of ``batch time / raw time - 1``. Interleaving at batch granularity,
    in an order rotating every step, makes drift and other load hit all sides alike.
    """
    from data_pipelines import images

    wall = dict.fromkeys([*iterators, "raw", "raw_other"], 0.0)
    cpu = dict(wall)
    ratios: dict[str, list[float]] = {k: [] for k in iterators}

    def raw(step: int, jpeg_draft: bool = draft) -> None:
        for j in range(batch_size):
            images.load(data[(step * batch_size + j) % len(data)], size, mode, jpeg_draft=jpeg_draft)

    sides = [(name, lambda step, it=it: next(it)) for name, it in iterators.items()]
    sides += [("raw", raw), ("raw_other", lambda step: raw(step, not draft))]
    for step in range(steps):
        t: dict[str, float] = {}
        rotated = sides[step % len(sides) :] + sides[: step % len(sides)]  # no side always runs first
        for name, fn in rotated:
            t0, c0 = time.perf_counter(), time.process_time()
            fn(step)
            t[name], cpu[name] = time.perf_counter() - t0, cpu[name] + time.process_time() - c0
        for k, v in t.items():
            wall[k] += v
        for k in iterators:
            ratios[k].append(t[k] / t["raw"] - 1)
    n = steps * batch_size
    rates = {k: (n / wall[k], 1e3 * cpu[k] / n) for k in wall}
    return rates, {k: float(np.median(v)) for k, v in ratios.items()}


def pipeline_rate(cfg: dict, num_images: int, num_image_tokens: int, warmup_batches: int = 2) -> float:
    """Images/s of ``make_iterator`` batches in steady state (worker start-up is in the warm-up)."""
    from data_pipelines.pipeline import make_iterator

    it = make_iterator(cfg, num_image_tokens=num_image_tokens, seed=0)
    try:
        for _ in range(warmup_batches):
            next(it)
        steps = max(1, num_images // cfg["batch_size"])
        t0 = time.perf_counter()
        for _ in range(steps):
            batch = next(it)
        dt = time.perf_counter() - t0
        assert batch["image"].shape[1] == cfg["image_size"]
    finally:
        it.close()
    return steps * cfg["batch_size"] / dt


def write_bench_records(
    data_dir: str, num_images: int, batch_size: int, num_records: int, width: int, height: int
) -> list[bytes]:
    """Writes the ``bench_images`` dataset (split ``train``: ``num_records`` records cycling through
    synthetic JPEGs with shapes-set captions) into ``data_dir``; returns the distinct JPEGs."""
    from data_pipelines import shapes
    from data_pipelines.builders import write_records
    from data_pipelines.schema import Record

    n_data = max(batch_size * 4, min(num_images, 512))
    data = synthetic_jpegs(n_data, width, height)
    captions = [shapes.make_record("pretrain", i).caption for i in range(n_data)]
    # more records than distinct images: grain's index shuffle is slow on tiny datasets (< ~1k)
    n_rec = max(num_records, n_data)
    recs = [Record(f"bench/{i}", data[i % n_data], caption=captions[i % n_data]) for i in range(n_rec)]
    write_records(data_dir, "bench_images", {"train": recs}, progress=False)
    return data


def bench_input_config(
    data_dir: str, batch_size: int, size: int, resize: str, max_len: int, num_workers: int,
    normalize: bool = False, prefetch: int = 2, jpeg_draft: bool = False,
) -> dict:  # fmt: skip
    """``config.input`` reading :func:`write_bench_records`' dataset with the shapes tokenizer."""
    from data_pipelines import shapes

    return dict(
        sources=[dict(name="bench_images", data_dir=data_dir, split="train")],
        batch_size=batch_size,
        tokenizer=shapes.ASSET_TOKENIZER,
        image_size=size,
        resize=resize,
        max_len=max_len,
        num_workers=num_workers,
        prefetch=prefetch,
        normalize=normalize,
        jpeg_draft=jpeg_draft,
    )


def main(argv: list[str] | None = None) -> dict:
    p = launcher.ArgumentParser(
        prog="python -m pargo_jax.benchmarks.input", description=__doc__.split("\n")[0]
    )
    p.add_argument("--num_images", type=int, default=512, help="images timed per measurement")
    p.add_argument("--sizes", type=int, nargs="+", default=[336, 384])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--resize", default="letterbox", choices=("letterbox", "squash", "pad"))
    p.add_argument("--jpeg_draft", action="store_true", help="pipeline decodes JPEGs at reduced scale")
    p.add_argument("--source_size", default="640x480", help="synthetic JPEG size WxH")
    p.add_argument("--num_image_tokens", type=int, default=304)
    p.add_argument("--max_len", type=int, default=512)
    p.add_argument("--num_records", type=int, default=2048, help="dataset records (cycling the images)")
    p.add_argument("--data_dir", help="where to write the benchmark images (default: a temp dir)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)

    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)
    w, h = (int(v) for v in args.source_size.split("x"))
    tmp = None
    data_dir = args.data_dir
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="pargo_bench_input_")
        data_dir = tmp.name
    data = write_bench_records(data_dir, args.num_images, args.batch_size, args.num_records, w, h)

    rows = []
    for size in args.sizes:

        def cfg(nw, normalize=False, prefetch=2, size=size):
            return bench_input_config(
                data_dir, args.batch_size, size, args.resize, args.max_len, nw, normalize, prefetch,
                args.jpeg_draft,
            )  # fmt: skip

        from data_pipelines.pipeline import make_iterator

        # 0 workers with prefetch=0: each batch is made synchronously in this thread, so its time and
        # CPU are exactly the pipeline's work, interleaved with the raw loop
        its = {
            "u8": make_iterator(cfg(0, prefetch=0), num_image_tokens=args.num_image_tokens, seed=0),
            "f32": make_iterator(cfg(0, True, 0), num_image_tokens=args.num_image_tokens, seed=0),
        }
        for it in its.values():
            for _ in range(2):  # warm-up: open files, tokenizer, first allocations
                next(it)
        steps = max(1, args.num_images // args.batch_size)
        rates, median_ratio = paired_rates(
            its, data, size, args.resize, args.batch_size, steps, args.jpeg_draft
        )
        (raw, raw_cpu), (u8, u8_cpu), (f32, f32_cpu) = rates["raw"], rates["u8"], rates["f32"]
        full, draft = (rates["raw_other"][0], raw) if args.jpeg_draft else (raw, rates["raw_other"][0])
        pipe = {
            nw: u8 if nw == 0 else pipeline_rate(cfg(nw), args.num_images, args.num_image_tokens)
            for nw in args.workers
        }
        rows.append(
            {
                "size": size,
                "raw_decode_resize": raw,
                "raw_full_decode": full,
                "raw_draft_decode": draft,
                "draft_speedup": draft / full,
                "pipeline": pipe,
                "pipeline_f32_0_workers": f32,
                "overhead_vs_raw": raw / u8 - 1,
                "overhead_f32_vs_raw": raw / f32 - 1,
                "median_step_overhead": median_ratio["u8"],
                "median_step_overhead_f32": median_ratio["f32"],
                "cpu_ms_per_image": {"raw": raw_cpu, "pipeline_0_workers": u8_cpu, "pipeline_f32": f32_cpu},
                "cpu_overhead_vs_raw": u8_cpu / raw_cpu - 1,
                "cpu_overhead_f32_vs_raw": f32_cpu / raw_cpu - 1,
                "scaling_vs_0_workers": {k: v / u8 for k, v in pipe.items()},
                "scaling_vs_1_worker": {k: v / pipe[1] for k, v in pipe.items()} if 1 in pipe else None,
            }
        )

    print(
        f"input pipeline, {args.resize}, {w}x{h} JPEG sources, batch {args.batch_size}, "
        f"{os.cpu_count()} CPUs; 0 workers interleaved with raw per batch; uint8 output unless f32; "
        f"JPEG draft decoding {'on' if args.jpeg_draft else 'off'}"
    )
    cols = ["size", "raw img/s"] + [f"{k}wk img/s" for k in args.workers] + ["overhead", "f32 img/s"]
    cols += ["ovh f32"] + [f"x{k}wk" for k in args.workers] + ["cpu ms raw", "cpu ms 0wk", "cpu ovh"]
    cols += ["cpu ovh f32", "draft x"]
    multi = [k for k in args.workers if k > 1 and 1 in args.workers]
    cols += [f"x{k}wk/1wk" for k in multi]
    print(" ".join(f"{c:>11}" for c in cols))
    for r in rows:
        c = r["cpu_ms_per_image"]
        cells = [f"{r['size']}", f"{r['raw_decode_resize']:.1f}"]
        cells += [f"{r['pipeline'][k]:.1f}" for k in args.workers]
        cells += [f"{r['overhead_vs_raw']:.1%}", f"{r['pipeline_f32_0_workers']:.1f}"]
        cells += [f"{r['overhead_f32_vs_raw']:.1%}"]
        cells += [f"{r['scaling_vs_0_workers'][k]:.2f}" for k in args.workers]
        cells += [f"{c['raw']:.2f}", f"{c['pipeline_0_workers']:.2f}", f"{r['cpu_overhead_vs_raw']:.1%}"]
        cells += [f"{r['cpu_overhead_f32_vs_raw']:.1%}", f"{r['draft_speedup']:.2f}"]
        cells += [f"{r['scaling_vs_1_worker'][k]:.2f}" for k in multi]
        print(" ".join(f"{x:>11}" for x in cells))
    result = {
        "benchmark": "input",
        "args": vars(args),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "rows": rows,
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    launcher.run_argparse(main)
