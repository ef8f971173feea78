"""One CLI for every source: ``python -m data_pipelines.build --dataset NAME --src ... --data_dir ...``.

Examples::

  python -m data_pipelines.build --dataset shapes --data_dir /data                    # synthetic demo set
  python -m data_pipelines.build --dataset llava --config pretrain \\
      --src LLaVA-Pretrain/blip_laion_cc_sbu_558k.json --image_dir LLaVA-Pretrain/images --data_dir /data
  python -m data_pipelines.build --dataset llava --config instruct \\
      --src llava_v1_5_mix665k.json --image_dir /coco_etc --data_dir /data
  python -m data_pipelines.build --dataset webdataset --src 'laion/{00000..00099}.tar' --data_dir /data
  python -m data_pipelines.build --dataset coco_captions --src coco/annotations/captions_train2017.json \\
      --data_dir /data
  python -m data_pipelines.build --dataset refcoco --config refcoco --src refcoco/ \\
      --image_dir coco/train2014 --box_format norm3 --box_frame square --data_dir /data

The result lands in ``data_dir/NAME[/CONFIG]/1.0.0``; use ``name="NAME[/CONFIG]"`` in ``input.sources``.
Prints a progress bar per split and, at the end, records read / written / skipped by reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

DATASETS = ("shapes", "llava", "webdataset", "coco_captions", "refcoco")


def make_builder(args: argparse.Namespace):
    """The builder for ``args.dataset`` configured from the CLI arguments."""
    from data_pipelines import converters, shapes
    from data_pipelines.boxes import BoxCodec

    common: dict[str, Any] = dict(
        data_dir=args.data_dir, config=args.config, num_workers=args.num_workers, strict=args.strict
    )
    if args.dataset == "shapes":
        return shapes.ShapesBuilder(
            image_size=args.image_size,
            num_pretrain=args.num_pretrain,
            num_sft=args.num_sft,
            num_eval=args.num_eval,
            num_val=args.num_val,
            seed=args.seed,
            **common,
        )
    if not args.src:
        raise SystemExit(f"--src is required for --dataset {args.dataset}; point it at the source files.")
    if args.dataset == "llava":
        return converters.LlavaBuilder(src=args.src, image_dir=args.image_dir, split=args.split, **common)
    if args.dataset == "webdataset":
        return converters.WebDatasetBuilder(src=args.src, split=args.split, **common)
    if args.dataset == "coco_captions":
        return converters.CocoCaptionsBuilder(src=args.src, image_dir=args.image_dir, **common)
    if args.dataset == "refcoco":
        codec = BoxCodec(args.box_format, args.box_frame)
        return converters.RefCocoBuilder(
            src=args.src, image_dir=args.image_dir, split_by=args.split_by, codec=codec, **common
        )
    raise SystemExit(f"Unknown --dataset {args.dataset!r}; use one of {DATASETS}.")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.build", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--data_dir", required=True, help="output root (TFDS data_dir)")
    p.add_argument("--src", help="source file / dir / glob (see examples)")
    p.add_argument("--image_dir", help="image root for LLaVA / COCO / RefCOCO")
    p.add_argument("--config", help="variant name, e.g. pretrain / instruct / refcoco+ -> NAME/CONFIG")
    p.add_argument("--split", default="train", help="split name for single-split sources")
    p.add_argument("--num_workers", type=int, default=8, help="threads reading + checking images")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record, naming it")
    p.add_argument("--box_format", default="norm3", choices=("norm3", "int1000", "pixel"))
    p.add_argument("--box_frame", default="square", choices=("square", "original"))
    p.add_argument("--split_by", help="RefCOCO refs file variant: unc, google, umd")
    p.add_argument("--image_size", type=int, default=64, help="shapes: image side")
    p.add_argument("--num_pretrain", type=int, default=2000)
    p.add_argument("--num_sft", type=int, default=2000)
    p.add_argument("--num_eval", type=int, default=200, help="shapes: held-out questions")
    p.add_argument("--num_val", type=int, default=200, help="shapes: held-out captions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summary_json", help="also write the summary to this JSON file")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from data_pipelines.builders import format_summary

    args = parser().parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # TFDS chatter; our summary says what matters
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # our own tqdm bar per split replaces TFDS's
    t0 = time.perf_counter()
    builder = make_builder(args)
    summary = builder.build()
    name = builder.name + (f"/{args.config}" if args.config else "")
    if args.dataset == "shapes":
        import os

        from data_pipelines import shapes

        tok_dir = shapes.write_tokenizer(os.path.join(args.data_dir, "shapes_tokenizer"))
        print(f"tokenizer: {tok_dir}")
    print(format_summary(name, summary))
    print(f"wrote {builder.data_dir} in {time.perf_counter() - t0:.1f}s")
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump({"name": name, "dir": str(builder.data_dir), "splits": summary}, f, indent=2)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
