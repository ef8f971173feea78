"""Several images per sample and packed rows in the input pipeline: the schema's rules, the placeholder
expansion, the (B, I, H, W, 3) layout, and packing (each segment is its sample's unpacked arrays; every
record once, in order; budgets kept; the same global batch on any number of hosts; exact resume)."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines import shapes
from data_pipelines.builders import write_records
from data_pipelines.converters import LlavaBuilder
from data_pipelines.pipeline import make_iterator
from data_pipelines.schema import BadRecord, Record, Turn, validate
from data_pipelines.text import load_tokenizer, pack_example

N_IMG, SIZE, MAX_LEN = 5, 8, 96


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), colour).save(buf, format="PNG")
    return buf.getvalue()


def _colour(i: int, k: int) -> tuple[int, int, int]:
    return (10 + 7 * i % 200, 40 * k + 20, 90)


def _record(i: int, images: int) -> Record:
    """Record i with ``images`` images (colour encodes record and slot) and a question of varied length."""
    question = " ".join(["<image>"] * images + ["what"] * (1 + 5 * i % 13))
    answer = " ".join(["red"] * (1 + 3 * i % 7))
    pics = [_png(_colour(i, k)) for k in range(images)]
    return Record(
        f"r{i}",
        pics[0] if pics else b"",
        conversation=[Turn("user", question), Turn("assistant", answer)],
        more_images=pics[1:],
    )


IMAGE_COUNTS = [1, 0, 2, 1, 3, 1, 0, 1, 2, 1, 1, 0, 3, 1, 2, 1, 1, 1, 0, 1]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("mixed"))
    tokenizer = shapes.build(d, image_size=16, num_pretrain=4, num_sft=4, num_eval=4, seed=0)["tokenizer"]
    records = [_record(i, n) for i, n in enumerate(IMAGE_COUNTS)]
    assert write_records(d, "mixed", {"train": records}, progress=False)["train"]["written"] == len(records)
    return dict(data_dir=d, tokenizer=tokenizer)


def _cfg(data, **kw):
    source = dict(name="mixed", data_dir=data["data_dir"], split="train")
    cfg = dict(sources=[source], batch_size=2, tokenizer=data["tokenizer"], image_size=SIZE, max_len=MAX_LEN,
               max_images=3, shuffle=False)  # fmt: skip
    return {**cfg, **kw}


def test_schema_counts_placeholders_against_images():
    conv = lambda *texts: [Turn(r, t) for r, t in zip(["user", "assistant"] * 3, texts)]  # noqa: E731
    two = dict(more_images=[_png((1, 2, 3))])
    assert (
        len(validate(Record("ok", _png((0, 0, 0)), conversation=conv("<image><image> q", "a"), **two)).images)
        == 2
    )
    late = conv("q", "a", "<image> and <image>?", "b")  # interleaved: later user turns may hold images
    assert len(validate(Record("late", _png((0, 0, 0)), conversation=late, **two)).images) == 2
    black = _png((0, 0, 0))
    bad = {
        "image_count_mismatch": Record("m", black, conversation=conv("<image> q", "a"), **two),
        "misplaced_image_placeholder": Record("p", black, conversation=conv("<image>", "<image>"), **two),
        "zero_byte_image": Record("z", black, conversation=conv("<image><image>", "a"), more_images=[b""]),
    }
    for reason, rec in bad.items():
        with pytest.raises(BadRecord) as e:
            validate(rec)
        assert e.value.reason == reason, (reason, e.value)
    with pytest.raises(BadRecord, match="image_count_mismatch"):
        validate(Record("cap", _png((0, 0, 0)), caption="two pictures", **two))


def test_each_placeholder_becomes_its_images_block_in_order(mixed):
    tok = load_tokenizer(mixed["tokenizer"])
    msgs = _record(4, 3).messages()
    ids, answer = tok.tokenize_chat(msgs)
    out = pack_example(tok, msgs, num_image_tokens=N_IMG, max_len=MAX_LEN, num_images=3)
    got = out["input_ids"][: out["length"]]
    image = np.flatnonzero(got == tok.image_token_id)
    assert len(image) == 3 * N_IMG and out["length"] == len(ids) + 3 * (N_IMG - 1)
    starts = image[::N_IMG]  # three blocks of N_IMG consecutive image tokens, at the placeholders
    np.testing.assert_array_equal(
        image.reshape(3, N_IMG) - starts[:, None], np.tile(np.arange(N_IMG), (3, 1))
    )
    np.testing.assert_array_equal(np.delete(got, image[np.arange(len(image)) % N_IMG != 0]), ids)
    assert out["loss_mask"][: out["length"]].sum() == answer[1:].sum()
    with pytest.raises(BadRecord, match="image_count_mismatch"):
        pack_example(tok, msgs, num_image_tokens=N_IMG, max_len=MAX_LEN, num_images=2)
    with pytest.raises(BadRecord, match="too_long"):  # an image is never cut
        pack_example(tok, msgs, num_image_tokens=N_IMG, max_len=int(image[-1]), num_images=3)


def test_llava_json_with_an_image_list(tmp_path):
    for name, colour in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        Image.new("RGB", (SIZE, SIZE), colour).save(tmp_path / name)
    turns = [
        {"from": "human", "value": "<image> vs <image>: which is red?"},
        {"from": "gpt", "value": "the first"},
    ]
    data = [{"id": "two", "image": ["a.png", "b.png"], "conversations": turns},
            {"id": "short", "image": ["a.png"], "conversations": turns},
            {"id": "gone", "image": ["a.png", "nope.png"], "conversations": turns}]  # fmt: skip
    (tmp_path / "data.json").write_text(json.dumps(data))
    builder = LlavaBuilder(src=str(tmp_path / "data.json"), data_dir=str(tmp_path / "out"))
    skipped = {"image_count_mismatch": 1, "missing_image": 1}
    assert builder.build()["train"] == {"read": 3, "written": 1, "skipped": skipped}
    rec = builder._convert((0, data[0]))
    assert [Image.open(io.BytesIO(b)).getpixel((0, 0)) for b in rec.images] == [(255, 0, 0), (0, 0, 255)]


def test_several_images_per_sample_fill_slots_in_order(mixed):
    it = make_iterator(_cfg(mixed, batch_size=4, repeat=False), num_image_tokens=N_IMG, seed=0)
    tok = load_tokenizer(mixed["tokenizer"])
    rows = 0
    for batch in it:
        assert batch["image"].shape == (4, 3, SIZE, SIZE, 3) and batch["image_mask"].shape == (4, 3)
        for r, rid in enumerate(batch["record_id"]):
            i = int(rid[1:])
            n = IMAGE_COUNTS[i]
            np.testing.assert_array_equal(batch["image_mask"][r], np.arange(3) < n)
            assert (batch["input_ids"][r] == tok.image_token_id).sum() == n * N_IMG
            for k in range(3):
                want = _colour(i, k) if k < n else (0, 0, 0)
                assert tuple(batch["image"][r, k, 0, 0]) == want, (rid, k)
            rows += 1
    assert rows == len(IMAGE_COUNTS) and it.stats()["skipped/total"] == 0
    it = make_iterator(_cfg(mixed, max_images=2, repeat=False), num_image_tokens=N_IMG, seed=0)
    kept = {str(r) for b in it for r in b["record_id"]}  # bad records get substitutes, as always
    assert not kept & {"r4", "r12"} and it.stats()["skipped/too_many_images"] >= 2


def _unpacked(mixed) -> dict[str, dict[str, np.ndarray]]:
    it = make_iterator(_cfg(mixed, batch_size=1, repeat=False), num_image_tokens=N_IMG, seed=0)
    return {str(b["record_id"][0]): {k: v[0] for k, v in b.items()} for b in it}


def _segments(batch):
    """(record id, its segment's arrays, its images) of every sample of every row, in order."""
    for r, ids in enumerate(batch["record_id"]):
        slot = 0
        for s, rid in enumerate(str(ids).split(","), 1):
            where = batch["segment_ids"][r] == s
            n = IMAGE_COUNTS[int(rid[1:])]
            keys = ("input_ids", "targets", "loss_mask", "attention_mask")
            yield rid, {k: batch[k][r][where] for k in keys}, batch["image"][r, slot : slot + n]
            slot += n


def test_packed_rows_hold_each_sample_as_it_is_unpacked(mixed):
    unpacked = _unpacked(mixed)
    cfg = _cfg(mixed, batch_size=3, packing=True, max_images_per_row=4)
    it = make_iterator(cfg, num_image_tokens=N_IMG, seed=0)
    order = []
    for _ in range(6):
        batch = next(it)
        assert batch["image"].shape == (3, 4, SIZE, SIZE, 3) and batch["segment_ids"].shape == (3, MAX_LEN)
        assert (batch["image_mask"].sum(1) <= 4).all()
        for r in range(3):  # segments are contiguous, numbered from 1, padding (0) only at the end
            seg = batch["segment_ids"][r]
            real = seg[seg > 0]
            assert (np.diff(real) >= 0).all() and (seg[len(real) :] == 0).all()
            assert (np.diff(np.unique(real)) == 1).all() and (real.size == 0 or real[0] == 1)
            assert batch["image_mask"][r].sum() == sum(
                IMAGE_COUNTS[int(x[1:])] for x in str(batch["record_id"][r]).split(",")
            )
        for rid, arrays, pixels in _segments(batch):
            want = unpacked[rid]
            n = len(arrays["input_ids"])
            for k, v in arrays.items():
                np.testing.assert_array_equal(v, want[k][:n], err_msg=f"{rid} {k}")
            assert want["attention_mask"][n:].sum() == 0  # the whole sample, nothing cut
            np.testing.assert_array_equal(pixels, want["image"][: len(pixels)])
            order.append(int(rid[1:]))
    # every record once per pass, in stream order (first fit may reorder within a batch only)
    assert sorted(order[: len(IMAGE_COUNTS)]) == list(range(len(IMAGE_COUNTS)))
    tokens = sum(len(x["input_ids"][x["attention_mask"] > 0]) for x in unpacked.values())
    assert tokens <= 6 * 3 * MAX_LEN  # ... which took fewer rows than one sample per row would


def test_packing_is_the_same_on_any_number_of_hosts_and_resumes_exactly(mixed):
    cfg = _cfg(mixed, batch_size=4, packing=True, max_images_per_row=3, shuffle=True)
    whole = make_iterator(cfg, num_image_tokens=N_IMG, seed=3)
    hosts = [
        make_iterator(cfg, num_image_tokens=N_IMG, seed=3, process_index=i, process_count=2) for i in range(2)
    ]
    first = [next(whole) for _ in range(5)]
    for batch in first:
        parts = [next(h) for h in hosts]
        for k in ("input_ids", "segment_ids", "loss_mask", "image", "image_mask", "record_id"):
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), batch[k], err_msg=k)
    state = whole.get_state()
    assert state["next_batch"] == 5 and state["next_record"] > 5
    after = [next(whole) for _ in range(3)]
    resumed = make_iterator({**cfg, "read_threads": 3}, num_image_tokens=N_IMG, seed=3)
    resumed.set_state(json.loads(json.dumps(state)))
    for a, b in zip(after, [next(resumed) for _ in range(3)], strict=True):
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    unpacked = make_iterator({**cfg, "packing": False}, num_image_tokens=N_IMG, seed=3)
    with pytest.raises(ValueError, match="next_record"):
        make_iterator(cfg, num_image_tokens=N_IMG, seed=3).set_state(unpacked.get_state())


def test_packing_skips_and_counts_bad_records(mixed, tmp_path):
    from data_pipelines.schema import to_example

    good = [_record(i, n) for i, n in enumerate(IMAGE_COUNTS[:6])]
    broken = Record("broken", b"\x89PNG no", conversation=[Turn("user", "<image> q"), Turn("assistant", "a")])
    mismatch = to_example(_record(99, 2))
    mismatch["more_images"] = []  # two placeholders, one image: written raw, skipped when read
    write_records(str(tmp_path), "bad", {"train": [*good[:3], broken, mismatch, *good[3:]]}, progress=False)
    cfg = _cfg(
        mixed, packing=True, batch_size=2, sources=[dict(name="bad", data_dir=str(tmp_path), split="train")]
    )
    it = make_iterator(cfg, num_image_tokens=N_IMG, seed=0)
    ids = [x for _ in range(3) for row in next(it)["record_id"] for x in str(row).split(",") if x]
    assert "broken" not in ids and "r99" not in ids and {f"r{i}" for i in range(6)} <= set(ids)
    stats = it.stats()
    assert stats["skipped/bad_image"] >= 1 and stats["skipped/image_count_mismatch"] >= 1
    strict = make_iterator({**cfg, "strict": True}, num_image_tokens=N_IMG, seed=0)
    with pytest.raises(BadRecord, match="r99|broken"):
        for _ in range(3):
            next(strict)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(packing=True, repeat=False), "needs input.repeat"),
        (dict(packing=True, max_images=3, max_images_per_row=2), "max_images_per_row"),
        (dict(max_images=0), "max_images"),
    ],
)
def test_packing_config_errors(mixed, change, message):
    with pytest.raises(ValueError, match=message):
        make_iterator(_cfg(mixed, **change), num_image_tokens=N_IMG, seed=0)


def test_mg_llava_object_boxes_pack_with_their_samples(mixed):
    """MG-LLaVA's object tokens: each packed sample brings its image's boxes (B, I, M, 4) and its masked
    empty box slots, as it has them unpacked."""
    source = dict(name="shapes", data_dir=mixed["data_dir"], split="pretrain")
    cfg = _cfg(mixed, sources=[source], max_images=1, batch_size=2)
    boxes = 4
    unpacked = {}
    for b in make_iterator({**cfg, "repeat": False, "batch_size": 1}, num_image_tokens=N_IMG + boxes, seed=0,
                           num_boxes=boxes):  # fmt: skip
        unpacked[str(b["record_id"][0])] = b
    packed = next(
        make_iterator({**cfg, "packing": True}, num_image_tokens=N_IMG + boxes, seed=0, num_boxes=boxes)
    )
    assert packed["boxes"].shape == (2, 4, boxes, 4) and packed["image_mask"].sum() > 2  # rows hold several
    for r, ids in enumerate(packed["record_id"]):
        for s, rid in enumerate(str(ids).split(","), 1):
            want = unpacked[rid]
            np.testing.assert_array_equal(packed["boxes"][r, s - 1], want["boxes"][0])
            where = packed["segment_ids"][r] == s
            n = int(where.sum())
            np.testing.assert_array_equal(packed["attention_mask"][r][where], want["attention_mask"][0][:n])
