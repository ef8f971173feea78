"""The embedded benchmark: the synthetic shapes set's held-out questions, scored per kind.

Kinds (``data_pipelines.shapes.KINDS``): colour, shape, count (all counting questions), position, refer
("what is at [box]?") and the fine variant's digit, kth and relation are exact matches after
:func:`normalize`; ground ("give the bounding box of ...") parses the answer's box with the run's box
codec and counts it right at IoU >= 0.5 (also reported: mean IoU, the number of answers without a box).
An answer that does not parse is wrong and counted, never an exception. The set declares its codec
(``shapes.CODEC``, norm3 / square; builds older than ``box_codec.json`` are taken to be in it): a run
with another is one error.

    config.evals.shapes = dict(type="shapes", data=dict(name="shapes", split="eval"), log_steps=0)
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping, Sequence
from typing import Any

from data_pipelines.boxes import BoxCodec
from pargo_jax.evaluators import common

KIND_ORDER = ("colour", "shape", "count", "position", "refer", "ground", "digit", "kth", "relation")


def normalize(text: str) -> str:
    """Lowercase, whitespace collapsed, trailing periods dropped: ``" A Red circle. "`` is
    ``"a red circle"``."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(". ").strip()


def box_iou_text(prediction: str, reference: str, codec: BoxCodec | None = None) -> float | None:
    """IoU of the first box in ``prediction`` with the box in ``reference`` (both ``codec``'s text of a
    square image; default: the shapes set's), or None when the prediction holds no box."""
    from data_pipelines.boxes import box_iou
    from data_pipelines.shapes import CODEC

    codec = codec or CODEC
    try:
        predicted = codec.decode(prediction, 1.0, 1.0)
    except ValueError:
        return None
    return box_iou(predicted, codec.decode(reference, 1.0, 1.0))


def score_item(
    kind: str, prediction: str, reference: str, codec: BoxCodec | None = None
) -> tuple[bool, float | None]:
    """(right, IoU): ground answers by IoU >= 0.5 of their ``codec`` boxes (IoU None when the answer
    holds no box), the other kinds by exact match after :func:`normalize`."""
    if kind == "ground":
        iou = box_iou_text(prediction, reference, codec)
        return (iou or 0.0) >= 0.5, iou
    return normalize(prediction) == normalize(reference), None


def shapes_metrics(items: Sequence[Mapping[str, Any]], codec: BoxCodec | None = None) -> dict[str, float]:
    """Metrics of ``items`` (``kind``, ``prediction``, ``reference``; ``ended`` optional): accuracy
    per kind (ground: IoU >= 0.5 of ``codec`` boxes), overall accuracy, ``ground_miou`` (no box = IoU 0),
    ``ground_unparseable``, ``ended`` (fraction of answers that stopped at an end-of-turn token),
    ``examples``."""
    right: dict[str, int] = collections.Counter()
    total: dict[str, int] = collections.Counter()
    ious, unparseable = [], 0
    for it in items:
        kind = it["kind"]
        ok, iou = score_item(kind, it["prediction"], it["reference"], codec)
        total[kind] += 1
        right[kind] += ok
        if kind == "ground":
            unparseable += iou is None
            ious.append(iou or 0.0)
    out = {k: right[k] / total[k] for k in KIND_ORDER if total[k]}
    out["accuracy"] = sum(right.values()) / max(sum(total.values()), 1)
    if ious:
        out["ground_miou"] = sum(ious) / len(ious)
        out["ground_unparseable"] = float(unparseable)
    out["ended"] = sum(bool(it.get("ended", True)) for it in items) / max(len(items), 1)
    out["examples"] = float(len(items))
    return out


class ShapesEvaluator(common.Evaluator):
    OPTIONS = {**common.BOX_OPTIONS, "max_new_tokens": 32, "method": "greedy", "num_beams": 4}

    def evaluate(self, params, out_dir):
        from data_pipelines.builders import read_box_codec
        from data_pipelines.shapes import CODEC, KINDS, question_kind
        from pargo_jax.predictor import conversation

        records, bad = self.records()
        self.check_data_codec(read_box_codec(self.data_dir(), self.data["name"]) or CODEC)
        queries, refs = [], []
        for rec in records:
            turns = [{"role": t.role, "content": t.text} for t in rec.conversation]
            kind = KINDS.get(question_kind(turns[-2]["content"]) or "") if len(turns) >= 2 else None
            if kind is None or turns[-1]["role"] != "assistant":
                bad["not_a_shapes_question"] = bad.get("not_a_shapes_question", 0) + 1
                continue
            queries.append(conversation(rec.id, rec.images, turns[:-1], rec.boxes))
            refs.append((kind, turns[-1]["content"], turns[-2]["content"]))
        results = self.predictor.answers(params, queries, self.decode_options(), batch_size=self.batch_size)
        items, skipped = [], sum(bad.values())
        for r, (kind, reference, q) in zip(results, refs):
            if "error" in r:
                skipped += 1
                continue
            items.append(dict(id=r["id"], kind=kind, question=q, reference=reference,
                              prediction=r["answer"], ended=r["ended"]))  # fmt: skip
        metrics = shapes_metrics(items, self.codec)
        metrics["skipped"] = float(skipped)
        for it in items:
            it["correct"], iou = score_item(it["kind"], it["prediction"], it["reference"], self.codec)
            if iou is not None:
                it["iou"] = iou
        return metrics, items

    def table(self, metrics):
        kinds = [k for k in KIND_ORDER if k in metrics]
        head = "| " + " | ".join(["shapes", *kinds, "all"]) + " |"
        rule = "|" + "---|" * (len(kinds) + 2)
        row = "| accuracy | " + " | ".join(f"{metrics[k]:.3f}" for k in [*kinds, "accuracy"]) + " |"
        extra = [f"{k} {metrics[k]:.4g}" for k in ("ground_miou", "ground_unparseable", "ended", "examples",
                                                   "skipped") if k in metrics]  # fmt: skip
        return "\n".join([head, rule, row, ", ".join(extra)])
