"""Multi-scale alignment data (data_pipelines/multiscale.py) on small files made here, in every source's
real layout (corrupt inputs included): the accounting of records and objects, and the geometry of drawn
scenes (crops hold the object's pixels with the configured margin and square padding; every answer box
decodes back to the drawn object; relation answers agree with the boxes)."""

import io
import json
import math
import os
import pickle
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data_pipelines import multiscale, shapes
from data_pipelines.boxes import BOX_RE, BoxCodec
from data_pipelines.builders import open_source
from data_pipelines.frame import CLIP_MEAN, fill_color
from data_pipelines.schema import IMAGE_PLACEHOLDER, from_example
from tests import procs

BACKGROUND = (90, 90, 90)
MARGINS = (0.0, 0.25, 0.5)
# Drawn scenes: image id -> (width, height, [(box, category, colour)]); each object has its own colour.
SCENES = {
    1: (
        120,
        80,
        [
            ((4, 6, 30, 26), "red block", (220, 30, 30)),  # near the top left: wide margins are clipped
            ((50, 30, 90, 70), "green block", (30, 200, 60)),
            ((95, 5, 115, 20), "blue block", (40, 60, 230)),
            ((100, 50, 112, 76), "green block", (20, 140, 40)),  # a second green block (rec_all)
        ],
    ),
    2: (
        70,
        100,
        [((10, 10, 60, 40), "yellow block", (240, 220, 30)), ((20, 60, 40, 95), "red block", (200, 0, 0))],
    ),
}
CATEGORIES = ["red block", "green block", "blue block", "yellow block"]


def _png(width, height, objects) -> bytes:
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for (x1, y1, x2, y2), _, colour in objects:
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _coco_json(images, anns) -> bytes:
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(CATEGORIES)]
    return json.dumps({"images": images, "annotations": anns, "categories": cats}).encode()


def _coco_ann(ann_id, image_id, box, category, **kw):
    x1, y1, x2, y2 = box
    cat = CATEGORIES.index(category) + 1 if category in CATEGORIES else 99
    return {"id": ann_id, "image_id": image_id, "bbox": [x1, y1, x2 - x1, y2 - y1], "category_id": cat, **kw}


def _drawn_coco(root) -> str:
    """The drawn SCENES as COCO instances (``annotations/instances_val2017.json`` + ``val2017/``)."""
    images, anns = [], []
    for image_id, (w, h, objects) in SCENES.items():
        name = f"{image_id:012d}.png"
        _write(os.path.join(root, "val2017", name), _png(w, h, objects))
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        anns += [_coco_ann(100 * image_id + k, image_id, box, cat) for k, (box, cat, _) in enumerate(objects)]
    path = os.path.join(root, "annotations", "instances_val2017.json")
    _write(path, _coco_json(images, anns))
    return path


def _build(reader, config, out, codec=None, **options):
    builder = multiscale.MultiscaleBuilder(
        reader=reader,
        config=config,
        codec=codec,
        options=multiscale.Options(**options),
        data_dir=out,
        num_workers=2,
        progress=False,
    )
    return builder.build()


def _records(out, name, split):
    src = open_source(out, name, split)
    return {r.id: r for r in (from_example(src[i]) for i in range(len(src)))}


def _check_accounting(summary):
    for s in summary.values():
        assert s["read"] == s["written"] + sum(s["skipped"].values()), s
        o = s["objects"]
        assert o["read"] == o["used"] + sum(o["skipped"].values()), o
        assert set(o["skipped"]) <= set(multiscale.OBJECT_SKIP_REASONS), o


def _qa(rec):
    """(question without the leading image placeholder, answer) pairs of a record."""
    turns = rec.conversation
    assert [t.role for t in turns] == ["user", "assistant"] * (len(turns) // 2)
    assert turns[0].text.startswith(IMAGE_PLACEHOLDER + "\n")
    return [(q.text.removeprefix(IMAGE_PLACEHOLDER + "\n"), a.text) for q, a in zip(turns[::2], turns[1::2])]


def _drawn(image_id, box, codec):
    """The drawn object whose box ``box`` (text) decodes to, within the codec's quantization."""
    w, h, objects = SCENES[image_id]
    got = codec.decode(box, w, h)
    hits = [o for o in objects if np.abs(got - o[0]).max() <= codec.tolerance(w, h)]
    assert len(hits) == 1, (box, got)
    return hits[0]


def _window(box, margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The crop's window, computed here: the box +- margin x its size per side, clipped to the image."""
    x1, y1, x2, y2 = box
    mx, my = margin * (x2 - x1), margin * (y2 - y1)
    return (max(0, math.floor(x1 - mx)), max(0, math.floor(y1 - my)),
            min(width, math.ceil(x2 + mx)), min(height, math.ceil(y2 + my)))  # fmt: skip


def _crop_margin(crop: bytes, image_id: int, obj) -> float:
    """The configured margin the crop of drawn ``obj`` was cut with. Asserts the crop is, pixel for pixel,
    the window of the source at that margin centred on a square of the mean colour, with the object's
    own colour exactly on its box shifted into the crop."""
    w, h, objects = SCENES[image_id]
    source, got = _pixels(_png(w, h, objects)), _pixels(crop)
    found = []
    for margin in MARGINS:
        wx1, wy1, wx2, wy2 = _window(obj[0], margin, w, h)
        side = max(wx2 - wx1, wy2 - wy1)
        ox, oy = (side - (wx2 - wx1)) // 2, (side - (wy2 - wy1)) // 2
        expected = np.empty((side, side, 3), np.uint8)
        expected[:] = fill_color(CLIP_MEAN)
        expected[oy : oy + wy2 - wy1, ox : ox + wx2 - wx1] = source[wy1:wy2, wx1:wx2]
        if np.array_equal(got, expected):
            ys, xs = np.nonzero((got == obj[2]).all(-1))
            x1, y1, x2, y2 = obj[0]
            placed = (ox + x1 - wx1, oy + y1 - wy1, ox + x2 - wx1, oy + y2 - wy1)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == placed
            found.append(margin)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("codec", [BoxCodec("norm3", "square"), BoxCodec("pixel", "original")], ids=str)
def test_local_crops_and_answer_boxes_match_the_drawn_objects(tmp_path, codec):
    src = _drawn_coco(str(tmp_path / "coco"))
    out = str(tmp_path / "out")
    summary = _build(multiscale.CocoReader(src), "local", out, codec, margins=MARGINS, max_crops=4)
    _check_accounting(summary)
    assert summary["val"]["written"] == 2 and summary["val"]["objects"]["used"] == 6
    margins, choices = set(), 0
    for rid, rec in _records(out, "multiscale_coco/local", "val").items():
        image_id = int(rid.removeprefix("img"))
        w, h, objects = SCENES[image_id]
        assert _pixels(rec.image).shape == (h, w, 3)  # the full image first, as it was
        placeholders = sum(t.text.count(IMAGE_PLACEHOLDER) for t in rec.conversation)
        assert placeholders == len(rec.images) == 1 + len(objects) + min(3, len(objects))
        qa, image = _qa(rec), 1
        for i, (q, a) in enumerate(qa):
            crops = rec.images[image : image + q.count(IMAGE_PLACEHOLDER)]
            image += len(crops)
            if q.startswith("what is the object in this crop?"):
                obj = _drawn(image_id, qa[i + 1][1], codec)  # followed by "where is it in the full image?"
                assert a == obj[1] and qa[i + 1][0] == "where is it in the full image?"
            elif q.startswith("where is the object in this crop in the full image?"):
                obj = _drawn(image_id, a, codec)
                assert qa[i + 1] == ("what is it?", obj[1])
            elif m := re.fullmatch(r"which of these crops is the (.+)\? ((?:<image> ?)+)", q):
                named = [o for o in objects if o[1] == m.group(1)]
                shown = [[o for o in objects if _matches(c, image_id, o)] for c in crops]
                assert all(len(s) == 1 for s in shown) and sum(s[0] in named for s in shown) == 1
                assert shown[multiscale.ORDINALS.index(a)][0] in named
                choices += 1
                continue
            else:
                continue
            margins.add(_crop_margin(crops[0], image_id, obj))
        assert image == len(rec.images)
    assert choices == 2 and len(margins) > 1  # several scales of the same objects


def _matches(crop: bytes, image_id: int, obj) -> bool:
    try:
        _crop_margin(crop, image_id, obj)
    except (ValueError, AssertionError):
        return False
    return True


def _check_perception(rec, objects, size, codec, colour=None):
    """Every answer of a perception record against the drawn ``objects`` [(box, name, ...)]."""
    w, h = size
    tol = codec.tolerance(w, h)
    find = lambda text: [o for o in objects if np.abs(codec.decode(text, w, h) - o[0]).max() <= tol]
    kinds = set()
    for q, a in _qa(rec):
        if q == "list every object in the image with its bounding box.":
            items = re.findall(r"([a-z ]+) (\[[^\]]+\])", a)  # "name [box], name [box], ..."
            listed = [find(b) for _, b in items]
            assert [o[1] for (o,) in listed] == [n.strip() for n, _ in items]
            assert sorted(o[0] for (o,) in listed) == sorted(o[0] for o in objects)
        elif m := re.fullmatch(r"give the bounding box of the (.+)\.", q):
            (obj,) = find(a)
            assert obj[1] == m.group(1) and sum(o[1] == obj[1] for o in objects) == 1
        elif m := re.fullmatch(r"give the bounding box of every (.+)\.", q):
            named = [o[0] for o in objects if o[1] == m.group(1)]
            got = [codec.decode(b.group(0), w, h) for b in BOX_RE.finditer(a)]
            assert len(got) == len(named) > 1
            assert all(any(np.abs(g - n).max() <= tol for n in named) for g in got)
        elif m := re.fullmatch(r"what is at (\[.+\])\?", q):
            assert [o[1] for o in find(m.group(1))] == [a]
        elif m := re.fullmatch(r"is the .+? (\[.+?\]) (left of|above) the .+? (\[.+?\])\?", q):
            (a_obj,), (b_obj,) = find(m.group(1)), find(m.group(3))
            lo, hi = (0, 2) if m.group(2) == "left of" else (1, 3)
            assert a_obj[0][hi] <= b_obj[0][lo] or b_obj[0][hi] <= a_obj[0][lo]  # asked only when settled
            assert a == ("yes" if a_obj[0][hi] <= b_obj[0][lo] else "no")
            kinds.add(m.group(2))
        elif m := re.fullmatch(r"which is bigger, (the .+? \[.+?\]) or (the .+? \[.+?\])\?", q):
            area = lambda o: (o[0][2] - o[0][0]) * (o[0][3] - o[0][1])
            (a_obj,), (b_obj,) = find(m.group(1)), find(m.group(2))
            big = m.group(1) if area(a_obj) > area(b_obj) else m.group(2)
            assert a == big and max(area(a_obj), area(b_obj)) >= 1.5 * min(area(a_obj), area(b_obj))
            kinds.add("bigger")
        elif m := re.fullmatch(r"do the (\w+) (\[.+?\]) and the (\w+) (\[.+?\]) have the same colour\?", q):
            (a_obj,), (b_obj,) = find(m.group(2)), find(m.group(4))
            assert a_obj[1].endswith(m.group(1)) and b_obj[1].endswith(m.group(3))  # named by shape only
            assert a == ("yes" if colour(a_obj) == colour(b_obj) else "no")
            kinds.add("same colour")
        else:
            raise AssertionError(f"unexpected question {q!r}")
    return kinds


def test_perception_answers_agree_with_the_drawn_boxes(tmp_path):
    src = _drawn_coco(str(tmp_path / "coco"))
    out = str(tmp_path / "out")
    codec = BoxCodec("int1000", "square")
    _check_accounting(_build(multiscale.CocoReader(src), "perception", out, codec, max_relations=20))
    kinds = set()
    for rid, rec in _records(out, "multiscale_coco/perception", "val").items():
        w, h, objects = SCENES[int(rid.removeprefix("img"))]
        assert rec.labels == [o[1] for o in objects] and len(rec.images) == 1
        np.testing.assert_allclose(rec.boxes, [o[0] for o in objects])
        kinds |= _check_perception(rec, objects, (w, h), codec)
    assert kinds == {"left of", "above", "bigger"}


def test_shapes_relations_same_colour_and_tokenizer(tmp_path):
    """The shapes source: relations (same colour included) agree with the generated scenes; the build's
    tokenizer keeps every shapes id and encodes every record of every config without <unk>."""
    from tokenizers import Tokenizer

    from data_pipelines.pipeline import make_iterator

    built = {
        c: multiscale.build_shapes(str(tmp_path), config=c, num=24, num_eval=4, seed=3)
        for c in multiscale.CONFIGS
    }
    tok = Tokenizer.from_file(os.path.join(built["local"]["tokenizer"], "tokenizer.json"))
    base, _ = shapes.make_tokenizer()
    assert all(tok.token_to_id(p) == i for p, i in base.get_vocab().items())  # an extension: same ids
    assert base.token_to_id("<unk>") in base.encode("which of these crops is the red circle?").ids
    unk, kinds = tok.token_to_id("<unk>"), set()
    for config, out in built.items():
        assert (
            out["name"] == f"multiscale_shapes/{config}" and out["tokenizer"] == built["local"]["tokenizer"]
        )
        for split, n in (("train", 24), ("eval", 4)):
            s = out["summary"][split]
            assert s["read"] == s["written"] == n and not s["skipped"], s
            assert s["objects"]["read"] == s["objects"]["used"] + s["objects"]["skipped"].get(
                "over_max_objects", 0
            )
            for rec in _records(str(tmp_path), out["name"], split).values():
                for t in rec.conversation:
                    assert unk not in tok.encode(t.text).ids, t.text
                if config == "perception":
                    colour = lambda o: o[1].split()[0]
                    objects = [
                        (tuple(b), label) for b, label in zip(rec.boxes.tolist(), rec.labels, strict=True)
                    ]
                    kinds |= _check_perception(rec, objects, (64, 64), shapes.CODEC, colour)
    assert "same colour" in kinds
    # local records (several images each) go through the training pipeline with this tokenizer
    cfg = dict(
        sources=[dict(name="multiscale_shapes/local", data_dir=str(tmp_path), split="train")],
        batch_size=2,
        tokenizer=built["local"]["tokenizer"],
        image_size=16,
        max_len=400,
        max_images=7,
    )
    batch = next(make_iterator(cfg, num_image_tokens=2, seed=0))
    assert batch["image"].shape == (2, 7, 16, 16, 3) and batch["loss_mask"].any()


def test_global_descriptions_name_every_object_with_its_box(tmp_path):
    src = _drawn_coco(str(tmp_path / "coco"))
    out = str(tmp_path / "out")
    codec = BoxCodec()
    _check_accounting(_build(multiscale.CocoReader(src), "global", out, codec))
    for rid, rec in _records(out, "multiscale_coco/global", "val").items():
        w, h, objects = SCENES[int(rid.removeprefix("img"))]
        ((q, a),) = _qa(rec)
        assert q == multiscale.QUESTIONS["describe"] and a.startswith(
            f"the image shows {len(objects)} objects."
        )
        named = re.findall(r"there is an? ([a-z ]+) (\[[^\]]+\])\.", a)
        assert sorted(n for n, _ in named) == sorted(o[1] for o in objects)
        for name, box in named:
            assert _drawn(int(rid.removeprefix("img")), box, codec)[1] == name
        big = max(objects, key=lambda o: (o[0][2] - o[0][0]) * (o[0][3] - o[0][1]))
        assert a.endswith(f"the biggest is the {big[1]} {codec.encode(big[0], w, h)}.")
    assert (
        "at the top left there is a red block"
        in _records(out, "multiscale_coco/global", "val")["img1"].conversation[1].text
    )


def test_coco_accounting_with_corrupt_inputs(tmp_path):
    root = str(tmp_path / "coco")
    img = lambda name, data: _write(os.path.join(root, "val2017", name), data) or name
    good = _png(
        64, 48, [((4, 4, 20, 20), "red block", (255, 0, 0)), ((30, 10, 60, 40), "blue block", (0, 0, 255))]
    )
    images = [
        {"id": 1, "file_name": img("1.png", good)},
        {"id": 2, "file_name": img("2.png", good[:100])},  # truncated
        {"id": 3, "file_name": "3.png"},  # file missing
        {"id": 4, "file_name": img("4.png", b"")},
        {"id": 5, "file_name": img("5.png", good)},  # no annotations
        {"id": 6, "file_name": img("6.png", good)},  # only an unusable box
        {"id": 7, "file_name": img("7.png", good)},  # 3 objects, max_objects=2
    ]
    ann = lambda i, image_id, box, cat="red block", **kw: _coco_ann(i, image_id, box, cat, **kw)
    anns = [
        ann(10, 1, (4, 4, 20, 20)),
        ann(11, 1, (30, 10, 60, 40), "blue block"),
        ann(12, 1, (50, 30, 90, 47)),  # outside the 64 px wide image
        ann(13, 1, (5, 5, 5, 30)),  # zero width
        {"id": 14, "image_id": 1, "bbox": "nope", "category_id": 1},
        ann(15, 1, (0, 0, 64, 48), iscrowd=1),
        ann(16, 1, (1, 1, 9, 9), "unknown category"),
        ann(20, 2, (4, 4, 20, 20)),
        ann(30, 3, (4, 4, 20, 20)),
        ann(40, 4, (4, 4, 20, 20)),
        ann(60, 6, (-10, 4, 20, 20)),
        ann(70, 7, (4, 4, 20, 20)),
        ann(71, 7, (30, 10, 60, 40), "blue block"),
        ann(72, 7, (22, 30, 26, 34)),
        ann(90, 99, (4, 4, 20, 20)),  # an image not in the file
    ]
    path = os.path.join(root, "annotations", "instances_val2017.json")
    _write(path, _coco_json(images, anns))
    out = str(tmp_path / "out")
    summary = _build(multiscale.CocoReader(path), "perception", out, max_objects=2)
    _check_accounting(summary)
    assert summary["val"] == {
        "read": 8,
        "written": 2,
        "skipped": {"bad_image": 1, "missing_image": 2, "no_objects": 2, "zero_byte_image": 1},
        "objects": {
            "read": 15,
            "used": 4,
            "skipped": {
                "box_outside_image": 2,
                "crowd": 1,
                "degenerate_box": 1,
                "malformed_box": 1,
                "no_name": 1,
                "over_max_objects": 1,
                "record_skipped": 4,
            },
        },
    }
    recs = _records(out, "multiscale_coco/perception", "val")
    assert set(recs) == {"img1", "img7"}
    questions = {rid: [q for q, _ in _qa(r)] for rid, r in recs.items()}
    # a crowd region or a dropped object: no "every ..." statement about what is not in the record
    assert "list 2 of the objects in the image with their bounding boxes." in questions["img1"]
    assert "give the bounding box of the red block." not in questions["img1"]
    assert "give the bounding box of the blue block." in questions["img1"]
    assert recs["img7"].labels == ["red block", "blue block"]  # the two largest of three


def test_refcoco_accounting_and_expressions(tmp_path):
    root, imgs = tmp_path / "refcoco", str(tmp_path / "train2014")
    w, h, objects = SCENES[1]
    _write(os.path.join(imgs, "a.png"), _png(w, h, objects))
    _write(os.path.join(imgs, "b.png"), b"\x89PNG\r\n\x1a\n garbage")
    _write(os.path.join(imgs, "d.png"), _png(40, 40, [((5, 5, 30, 30), "blue block", (0, 0, 255))]))
    inst = {
        "images": [
            {"id": 1, "file_name": "a.png"},
            {"id": 2, "file_name": "b.png"},
            {"id": 4, "file_name": "d.png"},
        ],
        "annotations": [_coco_ann(100 + k, 1, box, cat) for k, (box, cat, _) in enumerate(objects)]
        + [
            _coco_ann(110, 1, (0, 0, 120, 80), "green block", iscrowd=1),
            _coco_ann(200, 2, (1, 1, 9, 9), "red block"),
            _coco_ann(400, 4, (5, 5, 30, 30), "blue block"),
        ],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CATEGORIES)],
    }
    sent = lambda *s: [{"sent": x} for x in s]
    refs = [
        {
            "ref_id": 0,
            "ann_id": 100,
            "image_id": 1,
            "split": "train",
            "sentences": sent("left red thing", "red one"),
        },
        {"ref_id": 1, "ann_id": 101, "image_id": 1, "split": "train", "sentences": sent("big green")},
        {"ref_id": 2, "ann_id": 999, "image_id": 1, "split": "train", "sentences": sent("no annotation")},
        {"ref_id": 3, "ann_id": 200, "image_id": 2, "split": "train", "sentences": sent("corrupt")},
        {"ref_id": 4, "ann_id": 300, "image_id": 3, "split": "train", "sentences": sent("no image, no ann")},
        {"ref_id": 5, "ann_id": 400, "image_id": 4, "split": "testA", "sentences": sent("blue square")},
    ]
    _write(str(root / "instances.json"), json.dumps(inst).encode())
    _write(str(root / "refs(unc).p"), pickle.dumps(refs))
    out, codec = str(tmp_path / "out"), BoxCodec("norm3", "original")
    summary = _build(
        multiscale.RefCocoReader(str(root), imgs, "unc"), "perception", out, codec, max_relations=0
    )
    _check_accounting(summary)
    assert summary["train"] == {
        "read": 3,
        "written": 1,
        "skipped": {"bad_image": 1, "missing_image": 1},
        "objects": {"read": 8, "used": 4, "skipped": {"crowd": 1, "malformed_box": 2, "record_skipped": 1}},
    }
    assert summary["testA"]["written"] == 1
    qa = dict(_qa(_records(out, "multiscale_refcoco/perception", "train")["img1"]))
    red = codec.encode(objects[0][0], w, h)
    assert qa[f"what is at {red}?"] in ("left red thing", "red one")  # a referred object: its expression
    asked = [
        q
        for q in qa
        if q in ("give the bounding box of left red thing.", "give the bounding box of red one.")
    ]
    assert len(asked) == 1 and qa[asked[0]] == red
    assert (
        qa[f"what is at {codec.encode(objects[2][0], w, h)}?"] == "blue block"
    )  # not referred: its category
    assert "give the bounding box of every green block." not in qa  # a green crowd region is in the image


def test_llava_detections_accounting(tmp_path):
    imgs = str(tmp_path / "images")
    _write(os.path.join(imgs, "a.png"), _png(50, 40, [((5, 5, 20, 20), "red block", (255, 0, 0))]))
    _write(os.path.join(imgs, "b.png"), _png(50, 40, []))
    _write(os.path.join(imgs, "d.png"), b"not an image")
    records = [
        {"id": "a", "image": "a.png", "conversations": []},
        {"id": "b", "image": "b.png"},
        {"id": "a", "image": "a.png"},
        "not a record",
        {"id": "c", "conversations": []},
        {"id": "d", "image": ["d.png", "a.png"]},
        {"id": "e", "image": "none.png"},
    ]
    det = lambda *boxes: {
        "boxes": [b for b, _, _ in boxes],
        "scores": [s for _, s, _ in boxes],
        "labels": [label for _, _, label in boxes],
    }
    dets = {
        "a": det(
            ([5, 5, 20, 20], 0.9, "cat"),
            ([25, 5, 45, 35], 0.8, "dog"),
            ([1, 1, 4, 4], 0.1, "ant"),
            ([1, 1, 9, 9], 0.9, ""),
            ([30, 30, 70, 39], 0.9, "far"),
        ),
        "c": det(([1, 1, 9, 9], 0.9, "x")),
        "d": det(([1, 1, 9, 9], 0.9, "x")),
        "e": det(([1, 1, 9, 9], 0.9, "x")),
    }
    _write(str(tmp_path / "llava.json"), json.dumps(records).encode())
    _write(str(tmp_path / "dets.json"), json.dumps(dets).encode())
    reader = multiscale.LlavaReader(
        str(tmp_path / "llava.json"), str(tmp_path / "dets.json"), imgs, min_score=0.3
    )
    out = str(tmp_path / "out")
    summary = _build(reader, "global", out)
    _check_accounting(summary)
    assert summary["train"] == {
        "read": 7,
        "written": 1,
        "skipped": {
            "bad_image": 1,
            "duplicate_id": 1,
            "missing_field": 1,
            "missing_image": 2,
            "no_objects": 1,
        },
        "objects": {
            "read": 13,
            "used": 2,
            "skipped": {"box_outside_image": 1, "low_score": 2, "no_name": 1, "record_skipped": 7},
        },
    }
    (rec,) = _records(out, "multiscale_llava/global", "train").values()
    assert rec.labels == ["cat", "dog"] and "there is a cat [" in rec.conversation[1].text


def test_records_are_deterministic_given_the_seed():
    w, h, objects = SCENES[1]
    objs = [multiscale.Obj(box, name) for box, name, _ in objects]
    scene = multiscale.Scene("s", _png(w, h, objects), w, h, objs)
    make = lambda config, seed: multiscale.make_record(
        scene, config, BoxCodec(), multiscale.Options(seed=seed)
    )
    for config in multiscale.CONFIGS:
        a, b = make(config, 0), make(config, 0)
        assert a.conversation == b.conversation and a.more_images == b.more_images
    assert make("perception", 0).conversation != make("perception", 1).conversation


def test_cli_builds_a_multiscale_set(tmp_path):
    src = _drawn_coco(str(tmp_path / "coco"))
    out, summary_json = str(tmp_path / "out"), str(tmp_path / "summary.json")
    args = [
        "--dataset",
        "multiscale",
        "--source",
        "coco",
        "--config",
        "local",
        "--src",
        src,
        "--data_dir",
        out,
        "--crop_margins",
        "0,0.5",
        "--max_crops",
        "2",
        "--box_format",
        "int1000",
        "--num_workers",
        "1",
        "--summary_json",
        summary_json,
    ]
    proc = procs.run("data_pipelines.build", *args, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "multiscale_coco/local objects" in proc.stdout and "over_max_objects=2" in proc.stdout
    saved = json.load(open(summary_json))
    assert saved["name"] == "multiscale_coco/local"
    assert saved["splits"]["val"]["objects"] == {"read": 6, "used": 4, "skipped": {"over_max_objects": 2}}
    rec = _records(out, "multiscale_coco/local", "val")["img2"]
    assert len(rec.images) == 1 + 2 + 2 and any(BOX_RE.search(a) for _, a in _qa(rec))
