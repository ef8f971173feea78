"""Offline detector boxes for MG-LLaVA's object tokens: read, select, and move them with the pixels.

The detections file is JSON ``{record_id: {"boxes": [[x1, y1, x2, y2], ...] (pixels of the original
image), "scores": [...], "labels": [...]}}``. :func:`select` keeps what MG-LLaVA's dataloader keeps:
per-class non-maximum suppression at IoU 0.2 (torchvision's ``batched_nms``: highest score first, a
box is dropped when its IoU with a kept box of the same label exceeds the threshold), then, when more
than 100 boxes remain, the 20 best of each class. :func:`transform_boxes` moves the boxes with the pixels
(the geometry of :mod:`data_pipelines.frame`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines.frame import square_frame


def parse_entry(entry: Any, where: str) -> dict[str, Any]:
    """One detections entry (``{boxes, scores?, labels?}``, or a bare list of boxes) ->
    ``{"boxes": (K, 4) float32, "scores": (K,) float32, "labels": [str]}``; a malformed one is a
    ValueError starting with ``where``."""
    d = dict(entry) if isinstance(entry, Mapping) else {"boxes": entry}
    want = f"{where}: boxes must be [[x1, y1, x2, y2], ...] in pixels"
    try:
        boxes = np.asarray([] if d.get("boxes") is None else d["boxes"], np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{want} ({e})") from e
    boxes = boxes.reshape(0, 4) if boxes.size == 0 else boxes
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{want}, got an array of shape {boxes.shape}.")
    if np.any(boxes[:, 2:] < boxes[:, :2]):
        raise ValueError(f"{want}; one has x2 < x1 or y2 < y1.")
    scores = np.asarray(d.get("scores", [1.0] * len(boxes)), np.float32).reshape(-1)
    labels = [str(x) for x in d.get("labels", [""] * len(boxes))]
    if not (len(boxes) == len(scores) == len(labels)):
        raise ValueError(f"{where}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels.")
    return {"boxes": boxes, "scores": scores, "labels": labels}


def read_detections(path: str) -> dict[str, dict[str, Any]]:
    """``{record_id: parse_entry(...)}`` of a detections file; a malformed entry is one error naming
    the file and the record."""
    with open(path) as f:
        raw = json.load(f)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected a JSON object {{record_id: {{boxes, scores, labels}}}}.")
    return {str(rid): parse_entry(d, f"{path}: record {rid!r}") for rid, d in raw.items()}


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    x1, y1 = np.maximum(box[0], others[:, 0]), np.maximum(box[1], others[:, 1])
    x2, y2 = np.minimum(box[2], others[:, 2]), np.minimum(box[3], others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.maximum(area(box) + area(others) - inter, 1e-12)


def nms_per_class(
    boxes: np.ndarray, scores: np.ndarray, labels: Sequence[str], iou: float = 0.2
) -> np.ndarray:
    """Indices kept by per-class greedy NMS, in decreasing score order (ties: first index first)."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    for i in order:
        same = [k for k in keep if labels[k] == labels[i]]
        if not same or np.all(_iou(boxes[i], boxes[same]) <= iou):
            keep.append(int(i))
    return np.asarray(keep, np.int64)


def select(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: Sequence[str],
    *,
    iou: float = 0.2,
    many: int = 100,
    per_class: int = 20,
) -> np.ndarray:
    """Indices MG-LLaVA keeps: per-class NMS, then above ``many`` boxes the ``per_class`` best of each
    class (classes in first-seen order after NMS, best first within a class)."""
    keep = nms_per_class(boxes, scores, labels, iou)
    if len(keep) <= many:
        return keep
    by_class: dict[str, list[int]] = {}
    for i in keep:
        by_class.setdefault(labels[i], []).append(int(i))
    return np.asarray([i for idx in by_class.values() for i in idx[:per_class]], np.int64)


def transform_boxes(boxes: np.ndarray, width: int, height: int, size: int, mode: str) -> np.ndarray:
    """Pixel boxes of a ``width x height`` image -> pixels of the ``size x size`` image that
    ``images.resize(img, size, mode)`` makes (the shared :func:`data_pipelines.frame.square_frame`)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return square_frame(width, height, size, mode).to_input(b).astype(np.float32)


def prepare_boxes(
    boxes: np.ndarray,
    width: int,
    height: int,
    size: int,
    mode: str,
    max_boxes: int,
    scores: np.ndarray | None = None,
    labels: Sequence[str] | None = None,
) -> tuple[np.ndarray, int]:
    """A record's boxes as the model takes them: :func:`select` (scores 1 and one class when none are
    given), moved with the pixels, clipped to the image, empty ones dropped, the best ``max_boxes``
    kept; returns ((max_boxes, 4) float32 zero-padded, number of real boxes)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.ones(len(boxes), np.float32) if scores is None else np.asarray(scores, np.float32)
    labels = [""] * len(boxes) if labels is None else list(labels)
    kept = transform_boxes(boxes[select(boxes, scores, labels)], width, height, size, mode)
    kept = np.clip(kept, 0, size)
    kept = kept[(kept[:, 2] > kept[:, 0]) & (kept[:, 3] > kept[:, 1])][:max_boxes]
    out = np.zeros((max_boxes, 4), np.float32)
    out[: len(kept)] = kept
    return out, len(kept)


def mask_box_slots(input_ids: np.ndarray, attention_mask: np.ndarray, num_real: int, max_boxes: int,
                   image_token_id: int) -> None:  # fmt: skip
    """Zeroes (in place) the attention of the object-token slots past ``num_real``: the last
    ``max_boxes`` image-token positions of the sequence are the box slots."""
    positions = np.flatnonzero(input_ids == image_token_id)
    if len(positions) < max_boxes:
        return
    attention_mask[positions[len(positions) - max_boxes + num_real :]] = 0
