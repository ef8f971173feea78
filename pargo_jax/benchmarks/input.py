"""Input pipeline throughput vs raw PIL decode + resize of the same images.

  python -m pargo_jax.benchmarks.input --num_images 256 --out bench_results/input.json

For each image size (336, 384) it measures (1) the raw rate: ``PIL decode + resize`` of the very same
encoded JPEGs in one process, in a loop, and (2) the full pipeline (ArrayRecord read, shuffle, decode,
resize, normalize, chat template, tokenize, mask, pad, batch) with 0, 1, 2 worker processes, in
steady state (the first batches, worker start-up included, are warm-up). Overhead is
``raw_rate / pipeline_rate(0 workers) - 1`` (goal <= 10%); scaling is ``rate(w) / rate(0 workers)``.
On a shared machine wall-clock rates swing with other load, so the CPU time per image of the raw loop
and of the in-process pipeline (0 workers: all its threads are in this process) is also reported;
its ratio is the contention-free overhead. ``u8`` is the pipeline with ``normalize=False`` (uint8
images, normalization left to the device).
Images are synthetic 640x480 photo-like JPEGs (smooth gradients, noise, shapes), built in a temp dir.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time

import numpy as np


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


def raw_rate(data: list[bytes], size: int, mode: str, repeats: int = 1) -> tuple[float, float]:
    """(images/s, CPU ms/image) of PIL decode + resize (the code the pipeline runs), one process."""
    from data_pipelines import images

    images.load(data[0], size, mode)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        for b in data:
            images.load(b, size, mode)
    n = repeats * len(data)
    return n / (time.perf_counter() - t0), 1e3 * (time.process_time() - c0) / n


def pipeline_rate(
    cfg: dict, num_images: int, num_image_tokens: int, warmup_batches: int = 2
) -> tuple[float, float]:
    """(images/s, CPU ms/image of this process) of ``make_iterator`` batches in steady state.

    The CPU figure covers all the work only with 0 workers (prefetch threads are in-process).
    """
    from data_pipelines.pipeline import make_iterator

    it = make_iterator(cfg, num_image_tokens=num_image_tokens, seed=0)
    try:
        for _ in range(warmup_batches):
            next(it)
        steps = max(1, num_images // cfg["batch_size"])
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            batch = next(it)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert batch["image"].shape[1] == cfg["image_size"]
    finally:
        it.close()
    n = steps * cfg["batch_size"]
    return n / dt, 1e3 * cpu / n


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m pargo_jax.benchmarks.input", description=__doc__.split("\n")[0]
    )
    p.add_argument("--num_images", type=int, default=256, help="images timed per measurement")
    p.add_argument("--sizes", type=int, nargs="+", default=[336, 384])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--resize", default="letterbox", choices=("letterbox", "squash", "pad"))
    p.add_argument("--source_size", default="640x480", help="synthetic JPEG size WxH")
    p.add_argument("--num_image_tokens", type=int, default=304)
    p.add_argument("--max_len", type=int, default=512)
    p.add_argument("--num_records", type=int, default=2048, help="dataset records (cycling the images)")
    p.add_argument("--data_dir", help="where to write the benchmark images (default: a temp dir)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)

    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)
    from data_pipelines import shapes
    from data_pipelines.builders import write_records
    from data_pipelines.schema import Record

    w, h = (int(v) for v in args.source_size.split("x"))
    n_data = max(args.batch_size * 4, min(args.num_images, 512))
    data = synthetic_jpegs(n_data, w, h)
    captions = [shapes.make_record("pretrain", i).caption for i in range(n_data)]
    tmp = None
    data_dir = args.data_dir
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="pargo_bench_input_")
        data_dir = tmp.name
    # more records than distinct images: grain's index shuffle is slow on tiny datasets (< ~1k)
    n_rec = max(args.num_records, n_data)
    recs = [Record(f"bench/{i}", data[i % n_data], caption=captions[i % n_data]) for i in range(n_rec)]
    write_records(data_dir, "bench_images", {"train": recs}, progress=False)

    rows = []
    raw_images = data[: min(len(data), args.num_images)]
    repeats = max(1, args.num_images // len(data))
    for size in args.sizes:

        def cfg(nw, normalize=True, size=size):
            return dict(
                sources=[dict(name="bench_images", data_dir=data_dir, split="train")],
                batch_size=args.batch_size,
                tokenizer=shapes.ASSET_TOKENIZER,
                image_size=size,
                resize=args.resize,
                max_len=args.max_len,
                num_workers=nw,
                prefetch=2,
                normalize=normalize,
            )

        # raw measured before and after the in-process pipeline run (averaged) to even out drift
        raw1, raw_cpu1 = raw_rate(raw_images, size, args.resize, repeats)
        pipe: dict[int, float] = {}
        cpu0 = None
        if 0 in args.workers:
            pipe[0], cpu0 = pipeline_rate(cfg(0), args.num_images, args.num_image_tokens)
        raw2, raw_cpu2 = raw_rate(raw_images, size, args.resize, repeats)
        raw, raw_cpu = (raw1 + raw2) / 2, (raw_cpu1 + raw_cpu2) / 2
        uint8, cpu_u8 = pipeline_rate(cfg(0, normalize=False), args.num_images, args.num_image_tokens)
        for nw in args.workers:
            if nw not in pipe:
                pipe[nw] = pipeline_rate(cfg(nw), args.num_images, args.num_image_tokens)[0]
        pipe = {k: pipe[k] for k in args.workers}
        base = pipe.get(0)
        rows.append(
            {
                "size": size,
                "raw_decode_resize": raw,
                "pipeline": pipe,
                "pipeline_uint8_0_workers": uint8,
                "overhead_vs_raw": raw / base - 1 if base else None,
                "overhead_uint8_vs_raw": raw / uint8 - 1,
                "cpu_ms_per_image": {"raw": raw_cpu, "pipeline_0_workers": cpu0, "pipeline_uint8": cpu_u8},
                "cpu_overhead_vs_raw": cpu0 / raw_cpu - 1 if cpu0 else None,
                "cpu_overhead_uint8_vs_raw": cpu_u8 / raw_cpu - 1,
                "scaling_vs_0_workers": {k: v / base for k, v in pipe.items()} if base else None,
            }
        )

    print(
        f"input pipeline, {args.resize}, {w}x{h} JPEG sources, batch {args.batch_size}, "
        f"{os.cpu_count()} CPUs (shared machine: wall-clock numbers are indicative)"
    )
    nan = float("nan")
    cols = ["size", "raw img/s"] + [f"{k}wk img/s" for k in args.workers] + ["overhead", "u8 img/s", "ovh u8"]
    cols += [f"x{k}wk" for k in args.workers] + ["cpu ms raw", "cpu ms 0wk", "cpu ovh", "cpu ovh u8"]
    print(" ".join(f"{c:>10}" for c in cols))
    for r in rows:
        c = r["cpu_ms_per_image"]
        ov, ovc = r["overhead_vs_raw"], r["cpu_overhead_vs_raw"]
        cells = [f"{r['size']}", f"{r['raw_decode_resize']:.1f}"]
        cells += [f"{r['pipeline'][k]:.1f}" for k in args.workers]
        cells += [f"{ov * 100:.1f}%" if ov is not None else "-", f"{r['pipeline_uint8_0_workers']:.1f}"]
        cells += [f"{r['overhead_uint8_vs_raw'] * 100:.1f}%"]
        cells += [f"{r['scaling_vs_0_workers'][k]:.2f}" if base else "-" for k in args.workers]
        cells += [f"{c['raw']:.2f}", f"{c['pipeline_0_workers'] or nan:.2f}"]
        cells += [
            f"{ovc * 100:.1f}%" if ovc is not None else "-",
            f"{r['cpu_overhead_uint8_vs_raw'] * 100:.1f}%",
        ]
        print(" ".join(f"{x:>10}" for x in cells))
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
    main()
