"""Offline detections: reading with clear errors, MG-LLaVA's selection (per-class NMS at IoU 0.2, then
the 20 best per class above 100 boxes) and boxes following each resize mode's pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines import detections, images


def test_nms_is_per_class_and_keeps_iou_at_the_threshold():
    boxes = np.array(
        [[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 5]], np.float32
    )
    scores = np.array([0.9, 0.95, 0.5, 0.3, 0.8], np.float32)
    labels = ["cat", "cat", "dog", "cat", "cat"]
    # box 1 (best cat) suppresses box 0 (IoU 0.82) but not box 4 (IoU 50 / 105 = 0.476 > 0.2: dropped)
    # nor box 3 (no overlap); box 2 is another class.
    keep = detections.nms_per_class(boxes, scores, labels, 0.2)
    assert keep.tolist() == [1, 2, 3]
    # A pair at exactly the threshold is kept (torchvision drops only IoU > threshold).
    two = np.array([[0, 0, 10, 10], [10 - 10 / 3, 0, 20 - 10 / 3, 10]], np.float32)
    iou = float(detections._iou(two[0], two[1:])[0])
    assert iou == pytest.approx(0.2, abs=1e-6)
    assert len(detections.nms_per_class(two, np.array([1.0, 0.5]), ["x", "x"], iou)) == 2
    assert len(detections.nms_per_class(two, np.array([1.0, 0.5]), ["x", "x"], iou - 1e-4)) == 1


def test_above_100_boxes_the_20_best_of_each_class_stay():
    rng = np.random.RandomState(0)
    n = 150
    xy = np.stack([np.arange(n) * 20.0, np.zeros(n)], 1)
    boxes = np.concatenate([xy, xy + 10], 1).astype(np.float32)  # disjoint: NMS keeps all
    scores = rng.rand(n).astype(np.float32)
    labels = ["a"] * 100 + ["b"] * 30 + ["c"] * 20
    keep = detections.select(boxes, scores, labels)
    kept = [labels[i] for i in keep]
    assert kept.count("a") == 20 and kept.count("b") == 20 and kept.count("c") == 20
    best_a = sorted(range(100), key=lambda i: -scores[i])[:20]
    assert sorted(i for i in keep if labels[i] == "a") == sorted(best_a)
    assert len(detections.select(boxes[:90], scores[:90], labels[:90])) == 90  # <= 100: NMS only


@pytest.mark.parametrize("mode", images.RESIZE_MODES)
def test_boxes_follow_the_pixels(mode):
    """A white rectangle drawn at a box lands where the transformed box says, for each resize mode."""
    w, h, size = 120, 60, 48
    img = Image.new("RGB", (w, h), (0, 0, 0))
    box = np.array([[30, 12, 90, 42]], np.float32)
    img.paste((255, 255, 255), tuple(int(v) for v in box[0]))
    out = np.asarray(images.resize(img, size, mode).convert("L")) > 128
    x1, y1, x2, y2 = detections.transform_boxes(box, w, h, size, mode)[0]
    ys, xs = np.nonzero(out)
    assert abs(xs.min() - x1) <= 1 and abs(xs.max() + 1 - x2) <= 1
    assert abs(ys.min() - y1) <= 1 and abs(ys.max() + 1 - y2) <= 1


def test_read_detections_names_bad_entries(tmp_path):
    good = {"r1": {"boxes": [[0, 0, 4, 4]], "scores": [0.5], "labels": ["cat"]}, "r2": {"boxes": []}}
    path = tmp_path / "det.json"
    path.write_text(json.dumps(good))
    d = detections.read_detections(str(path))
    assert (
        d["r1"]["boxes"].shape == (1, 4) and d["r1"]["labels"] == ["cat"] and d["r2"]["boxes"].shape == (0, 4)
    )
    path.write_text(json.dumps({"r3": {"boxes": [[0, 0, 4, 4]], "scores": [0.5, 0.1], "labels": ["a"]}}))
    with pytest.raises(ValueError, match="record 'r3': 1 boxes, 2 scores, 1 labels"):
        detections.read_detections(str(path))
    path.write_text(json.dumps({"r4": {"boxes": [[5, 0, 4, 4]]}}))
    want = r"boxes must be \[\[x1, y1, x2, y2\], ...\] in pixels"
    with pytest.raises(ValueError, match=f"record 'r4': {want}; one has x2 < x1"):
        detections.read_detections(str(path))
    path.write_text(json.dumps({"r5": {"boxes": [[0, 0, 4]]}}))
    with pytest.raises(ValueError, match=rf"record 'r5': {want}, got an array of shape \(1, 3\)"):
        detections.read_detections(str(path))
    path.write_text(json.dumps({"r6": {"boxes": [[0, 0, 4, 4], [1]]}}))  # ragged
    with pytest.raises(ValueError, match=f"record 'r6': {want} "):
        detections.read_detections(str(path))
    bare = detections.parse_entry([[1, 2, 3, 4]], "q1")  # predict's --input boxes: a bare list
    assert bare["boxes"].tolist() == [[1, 2, 3, 4]] and bare["scores"].tolist() == [1.0]
