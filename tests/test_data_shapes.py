"""Synthetic shapes set: determinism, truthful pixels/boxes/answers, splits, build speed."""

import collections
import io
import re
import time

import numpy as np
import pytest
from PIL import Image

from data_pipelines import shapes
from data_pipelines.builders import format_summary, open_source, read_box_codec
from data_pipelines.schema import from_example


def _pixels(rec):
    return np.asarray(Image.open(io.BytesIO(rec.image)).convert("RGB"))


def test_records_are_a_pure_function_of_seed_split_index():
    a = shapes.make_record("sft", 7, seed=0)
    b = shapes.make_record("sft", 7, seed=0)
    assert a.image == b.image and a.conversation == b.conversation and np.array_equal(a.boxes, b.boxes)
    c = shapes.make_record("sft", 7, seed=1)
    assert a.image != c.image
    # eval is its own random stream, not a copy of sft
    assert shapes.make_record("eval", 7, seed=0).image != a.image


@pytest.mark.parametrize("size", [64, 96])
def test_pixels_boxes_and_answers_are_truthful(size):
    for i in range(40):
        rec = shapes.make_record("sft", i, seed=2, image_size=size)
        px = _pixels(rec)
        assert px.shape == (size, size, 3)
        objects = []
        for box, label in zip(rec.boxes, rec.labels, strict=True):
            color, shape = label.split()
            x1, y1, x2, y2 = box.astype(int)
            assert size // 8 <= x2 - x1 <= size // 4 and x2 <= size and y2 <= size
            cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
            assert tuple(px[cy, cx]) == shapes.COLORS[color], (i, label)  # the shape covers its centre
            if shape == "square":
                assert tuple(px[y1, x1]) == shapes.COLORS[color]
            elif shape in ("circle", "diamond"):  # corners are background
                assert tuple(px[y1, x1]) != shapes.COLORS[color]
            objects.append((color, shape, box))
        # answers agree with the scene
        for q, a in zip(rec.conversation[::2], rec.conversation[1::2], strict=True):
            q = q.text.replace("<image>\n", "")
            if q == "how many shapes are there?":
                assert a.text == shapes.NUMBERS[len(objects)]
            elif m := re.fullmatch(r"give the bounding box of the (\w+) (\w+)\.", q):
                (box,) = [b for c, s, b in objects if (c, s) == m.groups()]
                got = shapes.CODEC.decode(a.text, size, size)
                assert np.abs(got - box).max() <= shapes.CODEC.tolerance(size, size)
            elif m := re.fullmatch(r"what colour is the (\w+)\?", q):
                assert [c for c, s, _ in objects if s == m.group(1)] == [a.text]
            elif m := re.fullmatch(r"how many (\w+) shapes are there\?", q):
                assert a.text == shapes.NUMBERS[sum(c == m.group(1) for c, _, _ in objects)]
            elif m := re.fullmatch(r"what is at (\[.*\])\?", q):
                got = shapes.CODEC.decode(m.group(1), size, size)
                (hit,) = [f"{c} {s}" for c, s, b in objects if np.abs(b - got).max() < 1]
                assert a.text.endswith(hit + ".")


def test_caption_lists_every_shape_with_position_in_reading_or_shape_order():
    orders = collections.Counter()
    for i in range(30):
        rec = shapes.make_record("pretrain", i)
        assert not rec.conversation and rec.caption.endswith(".")
        assert rec.caption.startswith(shapes.NUMBERS[len(rec.labels)] + " shape")
        by_shape = " in " in rec.caption
        items = []
        for label, box in zip(rec.labels, rec.boxes, strict=True):
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            pos = shapes.POSITIONS[min(2, int(cy // (64 / 3)))][min(2, int(cx // (64 / 3)))]
            color, shape = label.split()
            item = f"a {shape} in {color} at the {pos}" if by_shape else f"{label} at the {pos}"
            assert item in rec.caption
            key = (shapes.SHAPES.index(shape), list(shapes.COLORS).index(color)) if by_shape else (cy, cx)
            items.append((key, rec.caption.index(item)))
        assert [at for _, at in sorted(items)] == sorted(at for _, at in items)  # listed in that order
        orders[by_shape] += 1
    assert min(orders.values()) >= 8  # both orders are common


def test_build_writes_splits_tokenizer_and_is_fast(tmp_path):
    t0 = time.perf_counter()
    out = shapes.build(str(tmp_path), num_pretrain=200, num_sft=200, num_eval=40, num_val=20, seed=4)
    elapsed = time.perf_counter() - t0
    assert elapsed < 30, elapsed  # generous bound on a loaded 2-CPU machine; ~1-2 s typical
    assert out["summary"] == {
        "pretrain": {"read": 200, "written": 200, "skipped": {}},
        "sft": {"read": 200, "written": 200, "skipped": {}},
        "eval": {"read": 40, "written": 40, "skipped": {}},
        "val": {"read": 20, "written": 20, "skipped": {}},
    }
    assert "eval" in format_summary("shapes", out["summary"])
    src = open_source(out["data_dir"], "shapes", "eval")
    recs = {r.id: r for r in (from_example(src[i]) for i in range(len(src)))}
    assert set(recs) == {f"shapes/eval/{i}" for i in range(40)}
    ref = shapes.make_record("eval", 3, seed=4)
    assert recs["shapes/eval/3"].image == ref.image and recs["shapes/eval/3"].conversation == ref.conversation
    assert all(len(r.conversation) == 2 for r in recs.values())  # eval: one question each
    sft = open_source(out["data_dir"], "shapes", "sft")
    assert len(from_example(sft[0]).conversation) == 6  # sft: three QA turns
    val = open_source(out["data_dir"], "shapes", "val")
    captions = {r.id: r.caption for r in (from_example(val[i]) for i in range(len(val)))}
    assert captions["shapes/val/0"] == shapes.make_record("val", 0, seed=4).caption  # held-out captions
    assert shapes.make_record("val", 0, seed=4).image != shapes.make_record("pretrain", 0, seed=4).image
    assert read_box_codec(out["data_dir"], "shapes") == shapes.CODEC  # the codec of its ground / refer text


def test_ensure_reuses_an_identical_build(tmp_path):
    first = shapes.ensure(str(tmp_path), num_pretrain=8, num_sft=8, num_eval=4)
    assert first["summary"]["sft"]["written"] == 8
    again = shapes.ensure(str(tmp_path), num_pretrain=8, num_sft=8, num_eval=4)
    assert again["summary"] is None and again["tokenizer"] == first["tokenizer"]
    other = shapes.ensure(str(tmp_path), num_pretrain=8, num_sft=8, num_eval=4, seed=1)
    assert other["summary"] is not None  # different arguments -> rebuilt
    stamp = tmp_path / shapes.STAMP
    stamp.write_text(stamp.read_text().replace(f'"generator": {shapes.GENERATOR}', '"generator": 1'))
    older = shapes.ensure(str(tmp_path), num_pretrain=8, num_sft=8, num_eval=4, seed=1)
    assert older["summary"] is not None  # built by an older generator -> rebuilt
    with pytest.raises(TypeError, match="num_sfts"):
        shapes.ensure(str(tmp_path), num_sfts=3)


def test_fine_variant_draws_its_number_and_answers_truthfully():
    size, asked = 128, set()
    for i in range(40):
        rng = shapes._rng(0, "fine/sft", i)
        number = shapes.sample_number(rng, size)
        rec = shapes.make_record("sft", i, image_size=size, variant="fine")
        px = _pixels(rec)
        assert 5 <= len(rec.labels) <= 8
        for box in rec.boxes:
            assert size // 16 <= box[2] - box[0] <= size // 10
        # every digit's 3 x 5 cells are lit exactly where the font says, in the text colour
        for char, (x1, y1, _, _) in number["digits"]:
            for r, row in enumerate(shapes.DIGIT_FONT[char]):
                for c, bit in enumerate(row):
                    cell = px[y1 + 2 * r, x1 + 2 * c]
                    assert (tuple(cell) == shapes.TEXT_COLOR) == (bit == "1"), (i, char, r, c)
        centres = [((b[0] + b[2]) / 2, label) for b, label in zip(rec.boxes, rec.labels)]
        for q, a in zip(rec.conversation[::2], rec.conversation[1::2], strict=True):
            q = q.text.replace("<image>\n", "")
            asked.add(shapes.question_kind(q))
            if q == "what number is written in the image?":
                assert a.text == number["text"]
            elif m := re.fullmatch(r"what colour is the (\w+) shape from the left\?", q):
                k = shapes.ORDINALS.index(m.group(1))
                assert sorted(centres)[k][1].split()[0] == a.text
            elif m := re.fullmatch(r"is the (\w+ \w+) left of the (\w+ \w+)\?", q):
                x = dict((label, cx) for cx, label in centres)
                assert a.text == ("yes" if x[m.group(1)] < x[m.group(2)] else "no")
    assert {"digit", "kth", "relation"} <= asked
    first = shapes.sample_number(shapes._rng(0, "fine/pretrain", 0), size)
    want = f"the number {first['text']} is written at the {first['position']}."
    assert shapes.make_record("pretrain", 0, image_size=size, variant="fine").caption.endswith(want)
    basic, default = shapes.make_record("sft", 3, variant="basic"), shapes.make_record("sft", 3)
    assert basic.image == default.image and basic.conversation == default.conversation
    with pytest.raises(ValueError, match="variant='tiny' is not one of"):
        shapes.make_record("sft", 0, variant="tiny")
