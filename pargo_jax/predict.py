"""The ``predict`` command: answers about images from a trained run's workdir.

    python -m pargo_jax.predict --workdir W --image photo.jpg --prompt "What is in the image?"
    python -m pargo_jax.predict --workdir W --input q.jsonl --output a.jsonl [--batch_size 16]

A line of ``q.jsonl``: ``{"id": "q1", "image": "photo.jpg", "prompt": "What is in the image?"}``;
``"image": ["a.jpg", "b.jpg"]`` asks about several images (one ``<image>`` line each before the
prompt, or the prompt's own ``<image>`` placeholders, one per image, in order); ``"conversation"``
(LLaVA turns) instead of ``"prompt"``; ``"boxes"`` for MG-LLaVA (one image per query).

The prediction functions and :class:`~pargo_jax.predictor.Predictor` are :mod:`pargo_jax.predictor`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence

import jax

from pargo_jax.predictor import (
    DecodeOptions,
    PredictError,
    Predictor,
    Query,
    check_decodes,
    conversation,
    question,
    read_image,
)


def read_queries(path: str) -> Iterator[Query | PredictError]:
    """Queries of a JSONL file (``id``, ``image``: a path or a list of paths relative to the file,
    ``prompt`` or ``conversation``, optional ``boxes`` for MG-LLaVA); a line that cannot be a query
    yields a PredictError naming it."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            qid = f"line {n}"
            try:
                rec = json.loads(line)
                qid = str(rec.get("id", qid))
                if "image" not in rec:
                    raise PredictError(f"{qid}: no 'image' field")
                image = _read_images(base, rec["image"], qid)
                boxes = rec.get("boxes")  # MG-LLaVA: [[x1, y1, x2, y2], ...] in the image's pixels
                if "conversation" in rec:
                    yield conversation(qid, image, rec["conversation"], boxes)
                else:
                    yield question(qid, image, rec.get("prompt", ""), boxes)
            except json.JSONDecodeError as e:
                yield PredictError(f"{qid}: not a JSON object ({e.msg})")
            except PredictError as e:
                yield PredictError(str(e) if str(e).startswith(qid) else f"{qid}: {e}")


def _read_images(base: str, paths, qid: str) -> bytes | tuple[bytes, ...]:
    """A JSONL line's ``image``: the bytes of one path, or a tuple of those of a non-empty list."""
    if isinstance(paths, str):
        return read_image(os.path.join(base, paths))
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise PredictError(f"{qid}: 'image' must be a path or a non-empty list of paths")
    return tuple(read_image(os.path.join(base, p)) for p in paths)


def parse_flags(argv: Sequence[str]):
    """The command's flags parsed from ``argv`` (no program name), apart from absl's global ``FLAGS``:
    ``main(["predict"], parse_flags(["--workdir=w", ...]))`` runs the command in this process."""
    from pargo_jax import launcher

    return launcher.parse(_define_flags, argv, "predict")


def _define_flags(fv=None) -> None:
    """The flags, in ``fv`` (default: absl's global ``FLAGS``)."""
    from absl import flags as f

    fv = f.FLAGS if fv is None else fv
    f.DEFINE_string("workdir", None, "A training run's workdir (config.json, model.json, checkpoints/).",
                    flag_values=fv)  # fmt: skip
    f.DEFINE_integer("step", None, "Checkpoint step (default: the newest).", flag_values=fv)
    f.DEFINE_string("image", None, "An image file to ask about (with --prompt).", flag_values=fv)
    f.DEFINE_string("prompt", None, "The question about --image.", flag_values=fv)
    f.DEFINE_string("input", None, "JSONL of queries: id, image (a path or a list of paths), prompt or "
                    "conversation.", flag_values=fv)  # fmt: skip
    f.DEFINE_string("output", None, "JSONL of answers for --input (default: stdout).", flag_values=fv)
    f.DEFINE_integer("batch_size", 8, "Queries per batch with --input.", flag_values=fv)
    f.DEFINE_integer("max_new_tokens", 64, "Most tokens an answer may have.", flag_values=fv)
    f.DEFINE_enum("method", "greedy", ["greedy", "sample", "beam"], "Decoding method.", flag_values=fv)
    f.DEFINE_integer("num_beams", 4, "Beams for --method=beam.", flag_values=fv)
    f.DEFINE_float("temperature", 1.0, "Sampling temperature.", flag_values=fv)
    f.DEFINE_integer("top_k", 0, "Sampling top-k (0: off).", flag_values=fv)
    f.DEFINE_float("top_p", 1.0, "Sampling nucleus mass.", flag_values=fv)
    f.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
    f.DEFINE_multi_string("stop", [], "A stop string (repeatable): the answer ends after it.", flag_values=fv)


def main(argv, flag_values=None) -> None:
    """The command: ``flag_values`` default to absl's parsed ``FLAGS``; a bad query, image or workdir
    exits with one line, ``predict: why``."""
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}.")
    try:
        run(flags.FLAGS if flag_values is None else flag_values)
    except (PredictError, FileNotFoundError) as e:
        sys.exit(f"predict: {e}")


def run(FLAGS) -> None:
    """The command's work, given its parsed flags."""
    from pargo_jax.runs import load_workdir

    if not FLAGS.workdir:
        raise PredictError("--workdir is required: the workdir of a training run")
    single = FLAGS.image is not None or FLAGS.prompt is not None
    if single == (FLAGS.input is not None):
        raise PredictError("ask either --image with --prompt, or --input q.jsonl")
    options = DecodeOptions(
        max_new_tokens=FLAGS.max_new_tokens, method=FLAGS.method, num_beams=FLAGS.num_beams,
        temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed,
        stop_strings=tuple(FLAGS.stop),
    )  # fmt: skip
    if single:  # check the query before loading the model
        if FLAGS.image is None:
            raise PredictError("--prompt needs an --image")
        query = question(FLAGS.image, read_image(FLAGS.image), FLAGS.prompt or "")
        check_decodes(query)
    elif not os.path.exists(FLAGS.input):
        raise PredictError(f"--input file {FLAGS.input!r} not found")
    trained = load_workdir(FLAGS.workdir, FLAGS.step)
    predictor = Predictor.from_config(trained.model, trained.tokenizer, trained.mesh, trained.config)
    if not single:
        _answer_file(predictor, trained.params, options, FLAGS.input, FLAGS.output, FLAGS.batch_size)
    elif options.method == "beam":
        print(predictor.answers(trained.params, [query], options, batch_size=1)[0]["answer"], flush=True)
    else:
        for piece in predictor.stream(trained.params, query, options):
            print(piece, end="", flush=True)
        print(flush=True)


def _answer_file(predictor: Predictor, params, options: DecodeOptions, src: str, dst: str | None, batch: int):
    items = list(read_queries(src))
    queries = [q for q in items if isinstance(q, Query)]
    bad = [str(e) for e in items if isinstance(e, PredictError)]
    results = predictor.answers(params, queries, options, batch_size=batch, progress=True)
    bad += [r["error"] for r in results if "error" in r]
    if jax.process_index() != 0:
        return
    for line in bad:
        print(f"predict: skipped {line}", file=sys.stderr)
    with open(dst, "w", encoding="utf-8") if dst else contextlib.nullcontext(sys.stdout) as out:
        for r in results:
            if "error" not in r:
                out.write(json.dumps({"id": r["id"], "answer": r["answer"]}, ensure_ascii=False) + "\n")
    answered = len(queries) - sum("error" in r for r in results)
    print(f"predict: answered {answered} of {len(items)} queries ({len(bad)} skipped)", file=sys.stderr)


if __name__ == "__main__":
    from pargo_jax import launcher

    _define_flags()
    launcher.run(main)
