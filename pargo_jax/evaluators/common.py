"""What every evaluator shares: the base class, its options, reading a built split, writing results.

An evaluator is built from one ``config.evals`` entry, ``{name: dict(type=..., data=..., log_steps=...,
batch_size=..., ...)}``, and a :class:`~pargo_jax.predictor.Predictor`; ``run(params)`` yields
``(metric, value)`` pairs and writes ``{out_dir}/{name}.json`` (the metrics) and
``{out_dir}/{name}.predictions.jsonl`` (one line per example) from process 0. Metrics are pure
functions of the predictions, defined beside each evaluator and unit-tested on their own.

Boxes in questions and answers are read and written with ``codec``, the run's ``config.box_codec``;
evaluators that read boxes take ``box_format`` / ``box_frame`` options (``BOX_OPTIONS``) only as a
check: one naming another codec is an error, as is data declaring another (:meth:`check_data_codec`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from data_pipelines.boxes import BoxCodec
from pargo_jax import configs, paths
from pargo_jax.predictor import DecodeOptions, Predictor, Query

COMMON_KEYS = {"type", "data", "log_steps", "batch_size", "detections"}
BOX_OPTIONS = {"box_format": None, "box_frame": None}  # None: the run's codec


class Evaluator:
    """Base: ``OPTIONS`` (defaults of the keys an evaluator adds to ``COMMON_KEYS``), ``DATA_KEYS``
    (what its ``data`` dict may hold), ``evaluate``."""

    OPTIONS: Mapping[str, Any] = {}
    DATA_KEYS: frozenset[str] = frozenset({"name", "split", "data_dir"})

    def __init__(self, name: str, options: Mapping[str, Any], predictor: Predictor, config):
        options = dict(options.to_dict() if hasattr(options, "to_dict") else options)
        configs.check_keys(options, COMMON_KEYS | set(self.OPTIONS), f"config.evals.{name}")
        self.name, self.predictor, self.config = name, predictor, config
        self.log_steps = int(options.get("log_steps") or 0)  # 0: only when training ends
        self.batch_size = int(options.get("batch_size") or 16)
        self.data = dict(options.get("data") or {})
        configs.check_keys(self.data, self.DATA_KEYS, f"config.evals.{name}.data")
        self.options = {**self.OPTIONS, **{k: v for k, v in options.items() if k in self.OPTIONS}}
        self.codec = self._box_codec()
        self.detections_path = options.get("detections") or ""
        self._detections: dict[str, dict[str, Any]] | None = None
        self.without_boxes = 0  # items of a model with object tokens that the detections file lacks

    def _box_codec(self) -> BoxCodec:
        """The run's ``config.box_codec``; ``box_format`` / ``box_frame`` options naming another codec
        are one ConfigError naming both."""
        run = BoxCodec.of_run(self.config)
        given = {k: self.options.get(f"box_{k}") for k in ("format", "frame")}
        asked = BoxCodec.from_dict({**run.as_dict(), **{k: v for k, v in given.items() if v is not None}})
        if asked != run:
            raise configs.ConfigError(
                f"config.evals.{self.name} reads boxes as {asked} (box_format / box_frame) but the run's "
                f"config.box_codec is {run}: the model answers in the codec it was trained with. Drop the "
                "options (they default to the run's) or evaluate a run trained with that codec."
            )
        return run

    def check_data_codec(self, declared: BoxCodec | None) -> None:
        """The evaluated data's codec (``declared``, e.g. its ``box_codec.json``; None: none declared)
        must be the run's: its questions and references hold boxes the model reads and writes."""
        if declared is not None and declared != self.codec:
            raise configs.ConfigError(
                f"config.evals.{self.name}.data ({self.data.get('name')}) writes its boxes as {declared} but "
                f"the run's config.box_codec is {self.codec}; evaluate it with a run trained with {declared}."
            )

    def due(self, step: int, final: bool) -> bool:
        """Whether to evaluate after training step ``step`` (``final``: the last one)."""
        return final or (self.log_steps > 0 and step % self.log_steps == 0)

    def evaluate(self, params, out_dir: str | None) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """(metrics, one prediction record per example): the evaluator's own work; ``out_dir`` is where
        it may write files of its own (process 0 only)."""
        raise NotImplementedError

    def run(self, params, out_dir: str | None = None) -> Iterator[tuple[str, float]]:
        self.without_boxes = 0
        metrics, predictions = self.evaluate(params, out_dir if jax.process_index() == 0 else None)
        if self.detections_path and self.predictor.max_boxes:
            metrics = {**metrics, "without_boxes": float(self.without_boxes)}
        if out_dir is not None and jax.process_index() == 0:
            write_results(out_dir, self.name, metrics, predictions)
        yield from metrics.items()

    def table(self, metrics: Mapping[str, float]) -> str:
        """Markdown for the console; evaluators with grouped metrics override it."""
        rows = "".join(f"| {k} | {_fmt(v)} |\n" for k, v in metrics.items())
        return f"| {self.name} | value |\n|---|---|\n{rows}"

    # --- helpers -----------------------------------------------------------------------------------
    def records(self) -> tuple[list, dict[str, int]]:
        """The records of ``data`` (``name``, ``split``, ``data_dir`` defaulting to ``input.data_dir``)
        in stored order, and the count of stored records that do not parse, by reason."""
        from data_pipelines import schema
        from data_pipelines.builders import open_source

        missing = sorted({"name", "split"} - set(self.data))
        if missing:
            raise ValueError(
                f"config.evals.{self.name}.data needs {missing} (e.g. dict(name='shapes', split='eval'))."
            )
        source = open_source(self.data_dir(), self.data["name"], self.data["split"])
        records, bad = [], {}
        for i in range(len(source)):
            try:
                records.append(schema.from_example(source[i]))
            except schema.BadRecord as e:
                bad[e.reason] = bad.get(e.reason, 0) + 1
        return records, bad

    def data_dir(self, key: str = "data_dir") -> str:
        """``data[key]`` (``data_dir`` defaults to ``input.data_dir``), which must exist."""
        path = self.data.get(key) or (self.config.input.get("data_dir") if key == "data_dir" else None)
        return configs.require_path(path, f"evals.{self.name}.data.{key}")

    def ask(self, params, items: Sequence[Mapping[str, Any]], query) -> tuple[list[tuple[Any, dict]], int]:
        """Asks ``query(item, image) -> predictor.Query`` of every item (its ``image``: a path or the
        bytes, or a list of those for several images, passed on as a tuple of bytes) and returns
        ``([(item, answer dict)], skipped)``: an item whose image is missing or does not decode is
        skipped and counted, never an error."""
        from pargo_jax.predictor import PredictError, read_image

        read = lambda x: x if isinstance(x, bytes) else read_image(x)
        asked, queries, skipped = [], [], 0
        for it in items:
            try:
                many = isinstance(it["image"], (list, tuple))
                image = tuple(map(read, it["image"])) if many else read(it["image"])
            except PredictError:
                skipped += 1
                continue
            asked.append(it)
            queries.append(self.attach_detections(query(it, image), it))
        answers = self.predictor.answers(params, queries, self.decode_options(), batch_size=self.batch_size)
        done = [(it, a) for it, a in zip(asked, answers) if "error" not in a]
        return done, skipped + len(asked) - len(done)

    def attach_detections(self, query: Query, item: Mapping[str, Any]) -> Query:
        """``query`` with MG-LLaVA's object boxes from the ``detections`` option (a JSON ``{key: {boxes,
        scores, labels}}`` as ``input.detections``), keyed by the item's ``id``, else its (first) image
        path, else that path's file name; an item without an entry has no object tokens and is counted in
        the ``without_boxes`` metric. Unchanged for models without object tokens."""
        if not self.detections_path or not self.predictor.max_boxes:
            return query
        if self._detections is None:
            from data_pipelines.detections import read_detections

            self._detections = read_detections(
                configs.require_path(self.detections_path, f"evals.{self.name}.detections")
            )
        image = item.get("image")
        image = image[0] if isinstance(image, (list, tuple)) and image else image
        image = image if isinstance(image, str) else None
        keys = [str(item.get("id")), *([image, os.path.basename(image)] if image else [])]
        entry = next((self._detections[k] for k in keys if k in self._detections), None)
        self.without_boxes += entry is None
        return dataclasses.replace(query, boxes=entry)

    def decode_options(self, **defaults) -> DecodeOptions:
        fields = {k: self.options[k] for k in ("max_new_tokens", "method", "num_beams") if k in self.options}
        return DecodeOptions(**{**defaults, **fields})


def write_results(out_dir: str, name: str, metrics: Mapping[str, float], predictions: list[dict]) -> None:
    path = paths.path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{name}.json").write_text(json.dumps(dict(metrics), indent=2) + "\n")
    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
    (path / f"{name}.predictions.jsonl").write_text(lines)


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def evals_config(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
    """``config.evals`` as plain dicts (empty when absent)."""
    evals = config.get("evals") or {}
    return {k: dict(v.to_dict() if hasattr(v, "to_dict") else v) for k, v in evals.items()}


def process_sum(value: float) -> float:
    """``value`` summed over all processes (each process counts what it prepared)."""
    from pargo_jax import sharding

    return float(sharding.process_values(np.float64(value)).sum())
