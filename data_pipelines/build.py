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
  python -m data_pipelines.build --dataset multiscale --source coco --config local \\
      --src coco/annotations/instances_train2017.json --data_dir /data   # also refcoco / llava / shapes

The result lands in ``data_dir/NAME[/CONFIG]/1.0.0``; use ``name="NAME[/CONFIG]"`` in ``input.sources``.
Prints a progress bar per split and, at the end, records read / written / skipped by reason.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any

from absl import flags

DATASETS = ("shapes", "llava", "webdataset", "coco_captions", "refcoco", "multiscale")


def make_builder(args: flags.FlagValues):
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
    if args.dataset == "multiscale":
        from data_pipelines import multiscale

        if args.config not in multiscale.CONFIGS or args.source not in multiscale.SOURCES:
            raise SystemExit(
                f"--dataset multiscale needs --source (one of {multiscale.SOURCES}) and --config (one of "
                f"{multiscale.CONFIGS})."
            )
        reader = multiscale.make_reader(
            args.source, src=args.src, image_dir=args.image_dir, split_by=args.split_by,
            detections=args.detections, split=args.split, num=args.num_scenes, num_eval=args.num_eval,
            image_size=args.image_size, seed=args.seed,
        )  # fmt: skip
        options = multiscale.Options(
            margins=tuple(float(m) for m in args.crop_margins), max_objects=args.max_objects,
            max_crops=args.max_crops, seed=args.seed,
        )  # fmt: skip
        codec = BoxCodec(args.box_format, args.box_frame)
        return multiscale.MultiscaleBuilder(reader=reader, codec=codec, options=options, **common)
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


def define_flags(fv: flags.FlagValues) -> None:
    """The command's flags, in ``fv`` (absl's global ``FLAGS`` when run as a command)."""
    f = functools.partial
    string, integer = f(flags.DEFINE_string, flag_values=fv), f(flags.DEFINE_integer, flag_values=fv)
    enum = f(flags.DEFINE_enum, flag_values=fv)
    enum("dataset", None, DATASETS, "The source's format.")
    string("data_dir", None, "Output root (TFDS data_dir).")
    string("src", None, "Source file / dir / glob (see examples).")
    string("image_dir", None, "Image root for LLaVA / COCO / RefCOCO.")
    string("config", None, "Variant name, e.g. pretrain / instruct / refcoco+ -> NAME/CONFIG.")
    string("split", "train", "Split name for single-split sources.")
    integer("num_workers", 8, "Threads reading + checking images.")
    flags.DEFINE_bool("strict", False, "Stop at the first bad record, naming it.", flag_values=fv)
    enum("box_format", "norm3", ["norm3", "int1000", "pixel"], "How box coordinates are written.")
    enum("box_frame", "square", ["square", "original"], "The frame box coordinates are relative to.")
    string("split_by", None, "RefCOCO refs file variant: unc, google, umd.")
    enum("source", None, ["refcoco", "coco", "llava", "shapes"], "multiscale: the source's format.")
    string("detections", None, "multiscale llava: detections JSON {record_id: {boxes, scores, labels}}.")
    flags.DEFINE_list(
        "crop_margins", ["0", "0.25", "0.5"], "multiscale local: crop context margins.", flag_values=fv
    )
    integer("max_objects", 8, "multiscale: objects per record (the largest kept).")
    integer("max_crops", 3, "multiscale local: objects with their own crop per record.")
    integer("num_scenes", 2000, "multiscale shapes: scenes in the train split (--num_eval: eval).")
    integer("image_size", 64, "shapes: image side.")
    integer("num_pretrain", 2000, "shapes: pretraining captions.")
    integer("num_sft", 2000, "shapes: instruction conversations.")
    integer("num_eval", 200, "shapes: held-out questions.")
    integer("num_val", 200, "shapes: held-out captions.")
    integer("seed", 0, "shapes: random seed.")
    string("summary_json", None, "Also write the summary to this JSON file.")
    flags.mark_flags_as_required(["dataset", "data_dir"], flag_values=fv)


def run(args: flags.FlagValues) -> dict[str, Any]:
    """Builds the dataset ``args`` (:func:`define_flags`, parsed) name; returns its summary."""
    from data_pipelines import multiscale, shapes
    from data_pipelines.builders import format_summary

    logging.getLogger("absl").setLevel(logging.ERROR)  # TFDS chatter; our summary says what matters
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # our own tqdm bar per split replaces TFDS's
    t0 = time.perf_counter()
    builder = make_builder(args)
    summary = builder.build()
    name = builder.name + (f"/{args.config}" if args.config else "")
    if args.dataset == "shapes":
        print(f"tokenizer: {shapes.write_tokenizer(os.path.join(args.data_dir, 'shapes_tokenizer'))}")
    if args.dataset == "multiscale" and args.source == "shapes":
        print(
            f"tokenizer: {multiscale.write_tokenizer(os.path.join(args.data_dir, multiscale.TOKENIZER_DIR))}"
        )
    print(format_summary(name, summary))
    if args.dataset == "multiscale":
        print(multiscale.format_objects(name, summary))
    print(f"wrote {builder.data_dir} in {time.perf_counter() - t0:.1f}s")
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump({"name": name, "dir": str(builder.data_dir), "splits": summary}, f, indent=2)
    return summary


def main(argv: list[str]) -> None:
    """``python -m data_pipelines.build``: :func:`run` on absl's parsed ``FLAGS``."""
    if len(argv) > 1:
        raise SystemExit(f"Unexpected arguments {argv[1:]}; every option is a --flag.")
    run(flags.FLAGS)


if __name__ == "__main__":
    from pargo_jax import launcher

    define_flags(flags.FLAGS)
    launcher.run(main)
