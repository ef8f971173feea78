"""Converters on small files made here, in every source format, including corrupt inputs.

Each test checks the accounting (read = written + skipped, by reason) and reads the ArrayRecord
output back through the shared schema.
"""

import io
import json
import os
import pickle
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_pipelines import build as build_cli
from data_pipelines.boxes import BoxCodec
from data_pipelines.builders import open_source, read_box_codec
from data_pipelines.converters import CocoCaptionsBuilder, LlavaBuilder, RefCocoBuilder, WebDatasetBuilder
from data_pipelines.schema import BadRecord, from_example
from data_pipelines.text import load_tokenizer
from pargo_jax import launcher


def _jpeg(w=48, h=32, color=(30, 120, 200)) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (w, h), color)
    img.paste((250, 250, 250), (w // 4, h // 4, w // 2, h // 2))
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _read_all(data_dir, name, split):
    src = open_source(data_dir, name, split)
    return {r.id: r for r in (from_example(src[i]) for i in range(len(src)))}


def _check_accounting(summary):
    for s in summary.values():
        assert s["read"] == s["written"] + sum(s["skipped"].values()), s


def _llava_files(root):
    imgs = os.path.join(root, "images")
    for i in range(4):
        _write(os.path.join(imgs, f"000{i}", f"{i}.jpg"), _jpeg(color=(i * 50, 80, 90)))
    _write(os.path.join(imgs, "zero.jpg"), b"")
    _write(os.path.join(imgs, "trunc.jpg"), _jpeg(200, 200)[:300])
    good_pretrain = [
        {
            "id": f"p{i}",
            "image": f"000{i}/{i}.jpg",
            "conversations": [
                {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
                {"from": "gpt", "value": f"caption number {i}"},
            ],
        }
        for i in range(2)
    ]
    good_instruct = [
        {
            "id": "i0",
            "image": "0002/2.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is in the picture?"},
                {"from": "gpt", "value": "A white square on blue."},
                {"from": "human", "value": "Where is the square?"},
                {"from": "gpt", "value": "Top left."},
            ],
        },
        {
            "id": "i1",
            "image": "0003/3.jpg",
            "conversations": [
                {"from": "system", "value": "You are terse."},
                {"from": "human", "value": "<image>\nColour?"},
                {"from": "gpt", "value": "Blue."},
            ],
        },
    ]

    def rec(rid, image="0000/0.jpg", conv=None, **kw):
        d = {"id": rid, "image": image, "conversations": conv}
        d.update(kw)
        return d

    qa = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    bad = {
        "missing_file": ("missing_image", rec("missing_file", image="nope/none.jpg", conv=qa)),
        "zero": ("zero_byte_image", rec("zero", image="zero.jpg", conv=qa)),
        "trunc": ("bad_image", rec("trunc", image="trunc.jpg", conv=qa)),
        "noimage": ("missing_image", {"id": "noimage", "conversations": qa}),  # asks for an image
        "dup": ("duplicate_id", rec("i0", image="0001/1.jpg", conv=qa)),  # i0 again: the first is kept
        "noconv": ("missing_field", {"id": "noconv", "image": "0000/0.jpg"}),
        "empty": ("empty_conversation", rec("empty", conv=[])),
        "noph": ("no_image_placeholder", rec("noph", conv=[{"from": "human", "value": "q"}, qa[1]])),
        "phgpt": (
            "misplaced_image_placeholder",
            rec("phgpt", conv=[{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image> a"}]),
        ),
        "robot": ("bad_role", rec("robot", conv=[{"from": "robot", "value": "<image>"}, qa[1]])),
        "novalue": ("missing_field", rec("novalue", conv=[{"from": "human"}, qa[1]])),
        "noanswer": ("empty_conversation", rec("noanswer", conv=[qa[0]])),
    }
    text_only = {"id": "t0", "conversations": [{"from": "human", "value": "What is 2 + 2?"},
                                               {"from": "gpt", "value": "4"}]}  # fmt: skip
    data = good_pretrain + good_instruct + [text_only] + [r for _, r in bad.values()]
    text = json.dumps(data).encode()
    # one record with invalid UTF-8 bytes inside a JSON string
    text = (
        text[:-1] + b', {"id": "utf8", "image": "0000/0.jpg", "conversations": [{"from": "human", "value": '
    )
    text += b'"<image>\\ncaf\xe9"}, {"from": "gpt", "value": "ok"}]}]'
    bad["utf8"] = ("invalid_utf8", None)
    _write(os.path.join(root, "llava.json"), text)
    return os.path.join(root, "llava.json"), imgs, bad


def test_llava_pretrain_and_instruct_formats(tmp_path):
    src, imgs, bad = _llava_files(str(tmp_path / "src"))
    out = str(tmp_path / "out")
    b = LlavaBuilder(src=src, image_dir=imgs, data_dir=out, config="mix", num_workers=2, progress=False)
    summary = b.build()
    _check_accounting(summary)
    s = summary["train"]
    assert s["read"] == 5 + len(bad) and s["written"] == 5 and s["text_only"] == 1
    expected = {}
    for reason, _ in bad.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert s["skipped"] == expected
    recs = _read_all(out, "llava/mix", "train")
    assert set(recs) == {"p0", "p1", "i0", "i1", "t0"}
    assert recs["t0"].text_only and recs["t0"].image == b"" and not recs["i0"].text_only
    assert recs["i0"].conversation[1].text == "A white square on blue."  # the first i0, not the duplicate
    assert [t.role for t in recs["p0"].conversation] == ["user", "assistant"]
    assert recs["p0"].conversation[0].text.endswith("<image>")  # pretrain puts it last
    assert [t.role for t in recs["i0"].conversation] == ["user", "assistant"] * 2
    assert recs["i1"].conversation[0].role == "system"
    assert Image.open(io.BytesIO(recs["i0"].image)).size == (48, 32)


def test_llava_strict_raises_naming_the_record(tmp_path):
    src, imgs, _ = _llava_files(str(tmp_path / "src"))
    b = LlavaBuilder(
        src=src, image_dir=imgs, data_dir=str(tmp_path / "o"), strict=True, num_workers=1, progress=False
    )
    with pytest.raises(Exception, match="missing_file"):
        b.build()


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_tars(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    _tar(
        str(d / "00000.tar"),
        [
            ("000000000.jpg", _jpeg()),
            ("000000000.txt", b"a white square"),
            (
                "000000000.json",
                json.dumps({"key": "000000000", "caption": "ignored", "status": "success"}).encode(),
            ),
            ("000000001.jpg", _jpeg(color=(1, 2, 3))),
            ("000000001.json", json.dumps({"key": "000000001", "caption": "from json"}).encode()),
            ("000000002.jpg", _jpeg()),  # no caption at all
            ("000000003.jpg", b"\xff\xd8\xff garbage"),
            ("000000003.txt", b"corrupt image"),
            ("000000004.txt", b"caption without image"),
            ("000000005.jpg", _jpeg()),
            ("000000005.txt", b"bad \xff utf8"),
        ],
    )
    _tar(str(d / "00001.tar"), [("000000006.png", _jpeg()), ("000000006.txt", b"second shard")])
    # truncated shards (cut inside a member's data / inside a header): earlier samples survive, the
    # cut one is counted
    for shard, cut in (("00002", 100), ("00003", -300)):
        path = d / f"{shard}.tar"
        members = [("000000007.jpg", _jpeg()), ("000000007.txt", b"ok"), ("000000008.jpg", _jpeg(400, 400))]
        _tar(str(path), [(f"{shard}_{n}", data) for n, data in members])
        with tarfile.open(path) as tar:
            offset = tar.getmembers()[-1].offset_data
        path.write_bytes(path.read_bytes()[: offset + cut])
    out = str(tmp_path / "out")
    summary = WebDatasetBuilder(src=str(d), data_dir=out, num_workers=2, progress=False).build()
    _check_accounting(summary)
    s = summary["train"]
    assert s["written"] == 5, s
    assert s["skipped"] == {
        "missing_field": 1,
        "bad_image": 1,
        "missing_image": 1,
        "invalid_utf8": 1,
        "truncated_archive": 2,
    }, s
    recs = _read_all(out, "webdataset", "train")
    assert recs["000000000"].caption == "a white square"  # .txt wins over json caption
    assert recs["000000001"].caption == "from json"
    assert {r.caption for r in recs.values()} >= {"second shard", "ok"}


def test_coco_captions(tmp_path):
    root = tmp_path / "coco"
    _write(str(root / "val2017" / "000000000001.jpg"), _jpeg())
    _write(str(root / "val2017" / "000000000002.jpg"), _jpeg(64, 64))
    ann = {
        "images": [
            {"id": 1, "file_name": "000000000001.jpg", "width": 48, "height": 32},
            {"id": 2, "file_name": "000000000002.jpg", "width": 64, "height": 64},
            {"id": 3, "file_name": "000000000003.jpg", "width": 64, "height": 64},  # file missing
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A white square on blue. "},
            {"id": 11, "image_id": 1, "caption": "Blue background."},
            {"id": 12, "image_id": 2, "caption": "Another one."},
            {"id": 13, "image_id": 3, "caption": "Missing file."},
            {"id": 14, "image_id": 99, "caption": "Unknown image."},
            {"id": 15, "image_id": 2},
            {"id": 16, "image_id": 2, "caption": "   "},
        ],
    }
    _write(str(root / "annotations" / "captions_val2017.json"), json.dumps(ann).encode())
    out = str(tmp_path / "out")
    summary = CocoCaptionsBuilder(
        src=str(root / "annotations" / "captions_val2017.json"), data_dir=out, progress=False
    ).build()
    _check_accounting(summary)
    assert summary["val"] == {
        "read": 7,
        "written": 3,
        "skipped": {"empty_caption": 1, "missing_field": 1, "missing_image": 2},
    }
    recs = _read_all(out, "coco_captions", "val")
    assert recs["1_10"].caption == "A white square on blue."
    assert not recs["1_10"].conversation
    assert read_box_codec(out, "coco_captions") is None  # no boxes in its text: no codec declared


@pytest.mark.parametrize("fmt,frame", [("norm3", "square"), ("int1000", "original"), ("pixel", "square")])
def test_refcoco_grounding_with_box_codec(tmp_path, fmt, frame):
    root = tmp_path / "refcoco"
    imgs = tmp_path / "train2014"
    _write(str(imgs / "COCO_train2014_000000000001.jpg"), _jpeg(80, 40))
    instances = {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 80, "height": 40}],
        "annotations": [
            {"id": 100, "image_id": 1, "bbox": [20.0, 10.0, 20.0, 10.0], "category_id": 1},
            {"id": 101, "image_id": 1, "bbox": [0.0, 0.0, 0.0, 5.0], "category_id": 1},
        ],
    }
    refs = [
        {
            "ref_id": 0,
            "ann_id": 100,
            "image_id": 1,
            "split": "train",
            "sentences": [{"sent": "white square"}, {"sent": "the bright box"}],
        },
        {"ref_id": 1, "ann_id": 100, "image_id": 1, "split": "testA", "sentences": [{"sent": "square"}]},
        {"ref_id": 2, "ann_id": 101, "image_id": 1, "split": "train", "sentences": [{"sent": "zero width"}]},
        {"ref_id": 3, "ann_id": 999, "image_id": 1, "split": "train", "sentences": [{"sent": "no ann"}]},
        {"ref_id": 4, "ann_id": 100, "image_id": 1, "split": "train", "sentences": []},
    ]
    _write(str(root / "instances.json"), json.dumps(instances).encode())
    _write(str(root / "refs(unc).p"), pickle.dumps(refs))
    out = str(tmp_path / "out")
    codec = BoxCodec(fmt, frame)
    summary = RefCocoBuilder(
        src=str(root), image_dir=str(imgs), codec=codec, data_dir=out, config="refcoco", progress=False
    ).build()
    _check_accounting(summary)
    assert summary["train"] == {"read": 4, "written": 1, "skipped": {"bad_boxes": 2, "empty_conversation": 1}}
    assert summary["testA"]["written"] == 1
    rec = _read_all(out, "refcoco/refcoco", "train")["ref0"]
    assert [t.role for t in rec.conversation] == ["user", "assistant"] * 2
    assert rec.conversation[0].text.startswith("<image>\n") and "white square" in rec.conversation[0].text
    np.testing.assert_allclose(rec.boxes, [[20, 10, 40, 20]])
    decoded = codec.decode(rec.conversation[1].text, 80, 40)
    assert np.abs(decoded - [20, 10, 40, 20]).max() <= codec.tolerance(80, 40)
    assert read_box_codec(out, "refcoco/refcoco") == codec  # the dataset declares the codec it wrote


def test_cli_prints_summary_and_output_feeds_the_pipeline(tmp_path, capsys):
    from data_pipelines import shapes
    from data_pipelines.pipeline import make_iterator

    src, imgs, bad = _llava_files(str(tmp_path / "src"))
    out = str(tmp_path / "out")
    summary_path = str(tmp_path / "summary.json")
    flags = launcher.parse(
        build_cli.define_flags,
        [
            "--dataset",
            "llava",
            "--config",
            "instruct",
            "--src",
            src,
            "--image_dir",
            imgs,
            "--data_dir",
            out,
            "--num_workers",
            "2",
            "--summary_json",
            summary_path,
        ],
        prog="build",
    )
    build_cli.run(flags)
    printed = capsys.readouterr().out
    assert "llava/instruct" in printed and "missing_image=2" in printed and "zero_byte_image=1" in printed
    assert "Downloading" not in printed and "downloaded and prepared" not in printed  # no TFDS chatter
    saved = json.load(open(summary_path))
    assert saved["splits"]["train"]["read"] == 5 + len(bad)
    assert "duplicate_id=1" in printed and "(written: 1 text-only)" in printed
    # the converted records go through the training pipeline (with a tokenizer that knows <image>)
    cfg = dict(
        sources=[dict(name="llava/instruct", data_dir=out, split="train")],
        batch_size=2,
        tokenizer=shapes.ASSET_TOKENIZER,
        image_size=16,
        max_len=96,
    )
    it = make_iterator({**cfg, "batch_size": 5}, num_image_tokens=4, seed=0)
    b = next(it)
    assert b["image"].shape == (5, 16, 16, 3) and set(b["record_id"]) == {"p0", "p1", "i0", "i1", "t0"}
    t = list(b["record_id"]).index("t0")  # text-only: no image token, black pixels, answer tokens trained
    image_id = load_tokenizer(shapes.ASSET_TOKENIZER).image_token_id
    assert not (b["input_ids"][t] == image_id).any() and not b["image"][t].any() and b["loss_mask"][t].any()
    assert all((b["input_ids"][i] == image_id).sum() == 4 for i in range(5) if i != t)
    assert "tensorflow" not in sys.modules  # building and reading never imports TensorFlow


def test_converter_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="--src"):
        LlavaBuilder(src=str(tmp_path / "none.json"), data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="No .tar shards"):
        WebDatasetBuilder(src=str(tmp_path), data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="refs"):
        RefCocoBuilder(src=str(tmp_path), data_dir=str(tmp_path))
    assert issubclass(BadRecord, ValueError)


def test_a_build_past_tfds_memory_buffer_spills_without_tensorflow(tmp_path, monkeypatch):
    """TFDS's write shuffle spills to bucket files past its memory buffer (1 GB; here 4 kB), through
    ``tf.io.gfile`` unless patched: without TensorFlow the spilled build holds the in-memory build's
    records, in the same order."""
    from tensorflow_datasets.core import shuffle

    from data_pipelines import builders, shapes

    small = dict(image_size=32, num_pretrain=24, num_sft=8, num_eval=4, num_val=4)
    shapes.build(str(tmp_path / "memory"), **small)
    opened: list[str] = []
    gfile, real_open = builders._EpathFiles.io.gfile, builders._EpathFiles.io.gfile.GFile
    monkeypatch.setattr(
        gfile, "GFile", staticmethod(lambda path, mode: opened.append(mode) or real_open(path, mode))
    )
    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 4096)
    monkeypatch.setattr(shuffle, "tf", shuffle.tf)  # the patch below is undone after the test
    shapes.build(str(tmp_path / "spilled"), **small)
    assert "wb" in opened and "rb" in opened  # the buckets were written and read through epath
    for split, count in (("pretrain", 24), ("sft", 8)):
        a, b = (open_source(str(tmp_path / d), "shapes", split) for d in ("memory", "spilled"))
        assert len(a) == len(b) == count
        for i in range(count):
            np.testing.assert_equal(a[i], b[i])
