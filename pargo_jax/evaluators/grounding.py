"""Referring expression comprehension (RefCOCO / RefCOCO+ / RefCOCOg): one item per referring sentence,
the answer's box parsed with the box codec and mapped back to the original image, Acc@IoU>=0.5,
mean IoU and the number of answers without a box (counted wrong, IoU 0).

Data, the official files: ``data=dict(refs=".../refs(unc).p", instances=".../instances.json",
images="<COCO train2014 dir>", split="val")`` (``testA``, ``testB``, ``test`` ...). The prompt is the
one the RefCOCO converter trains with (``data_pipelines.converters.REFER_FIRST``). Answers are read with
the run's box codec (``config.box_codec``, what its data declared); a ``box_format`` / ``box_frame``
option naming another is an error.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from typing import Any

from pargo_jax.evaluators import common


def grounding_metrics(ious: Sequence[float | None]) -> dict[str, float]:
    """``acc@0.5``, ``miou`` (an unparseable answer counts IoU 0) and ``unparseable`` of per-item
    IoUs (None = the answer held no box)."""
    values = [0.0 if v is None else v for v in ious]
    n = max(len(values), 1)
    return {
        "acc@0.5": sum(v >= 0.5 for v in values) / n,
        "miou": sum(values) / n,
        "unparseable": float(sum(v is None for v in ious)),
    }


def load_refcoco(refs: str, instances: str, images: str, split: str) -> list[dict[str, Any]]:
    """``[{"id", "image", "sentence", "box" (x1, y1, x2, y2 px), "size" (w, h)}]``: one per sentence."""
    for path, what in ((refs, "refs(<split_by>).p"), (instances, "instances.json")):
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"RefCOCO file {path!r} not found; data needs {what} of the official release."
            )
    with open(refs, "rb") as f:  # the official files are pickles (trusted input)
        ref_list = pickle.load(f, encoding="latin1")
    with open(instances, encoding="utf-8") as f:
        inst = json.load(f)
    imgs = {im["id"]: im for im in inst.get("images", [])}
    anns = {a["id"]: a for a in inst.get("annotations", [])}
    splits = sorted({str(r.get("split")) for r in ref_list})
    if split not in splits:
        raise ValueError(f"{refs} has no split {split!r}; it has {splits}.")
    items = []
    for r in ref_list:
        if str(r.get("split")) != split:
            continue
        ann, im = anns.get(r["ann_id"]), imgs.get(r["image_id"])
        if ann is None or im is None:
            raise ValueError(f"ref {r.get('ref_id')}: ann_id / image_id missing from {instances}.")
        x, y, w, h = (float(v) for v in ann["bbox"])
        for k, s in enumerate(r.get("sentences", [])):
            text = (s.get("sent") or s.get("raw") or "").strip()
            if text:
                items.append(
                    {
                        "id": f"ref{r['ref_id']}/{k}",
                        "image": os.path.join(images, im["file_name"]),
                        "sentence": text,
                        "box": [x, y, x + w, y + h],
                        "size": (im.get("width"), im.get("height")),
                    }
                )
    return items


class GroundingEvaluator(common.Evaluator):
    OPTIONS = {
        **common.BOX_OPTIONS,
        "max_new_tokens": 32,
        "method": "greedy",
        "num_beams": 4,
    }
    DATA_KEYS = frozenset({"refs", "instances", "images", "split"})

    def evaluate(self, params, out_dir):
        from data_pipelines.boxes import box_iou
        from data_pipelines.converters import REFER_FIRST
        from data_pipelines.images import decode
        from data_pipelines.schema import BadRecord
        from pargo_jax.predictor import conversation

        items = load_refcoco(
            self.data_dir("refs"),
            self.data_dir("instances"),
            self.data_dir("images"),
            self.data.get("split", "val"),
        )

        def ask(it, image):
            if not all(it["size"]):  # instances.json without width / height: measure the image
                try:
                    it["size"] = decode(image, it["id"]).size
                except BadRecord:
                    pass  # the predictor skips and counts it
            turn = {"role": "user", "content": REFER_FIRST.format(sent=it["sentence"])}
            return conversation(it["id"], image, [turn])

        done, skipped = self.ask(params, items, ask)
        rows = []
        for it, a in done:
            try:
                box = [float(v) for v in self.codec.decode(a["answer"], *it["size"])]
                iou = box_iou(box, it["box"])
            except ValueError:
                box, iou = None, None
            rows.append({"id": it["id"], "sentence": it["sentence"], "prediction": a["answer"], "box": box,
                         "gt_box": it["box"], "iou": iou})  # fmt: skip
        metrics = grounding_metrics([r["iou"] for r in rows])
        metrics.update(items=float(len(rows)), skipped=float(skipped))
        return metrics, rows
