"""grain pipeline: batch contract, determinism, exact resume, host slicing, mixing, bad records."""

import collections
import io
import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines import shapes
from data_pipelines.builders import dataset_dir, open_source, write_records
from data_pipelines.pipeline import InputConfig, make_dataset, make_iterator
from data_pipelines.schema import BadRecord, Record, Turn, from_example, to_example
from data_pipelines.text import load_tokenizer

N_IMG = 6


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("shapes"))
    return shapes.build(d, image_size=32, num_pretrain=48, num_sft=48, num_eval=12, seed=1)


def _cfg(data, split="sft", **kw):
    cfg = dict(
        sources=[dict(name="shapes", data_dir=data["data_dir"], split=split)],
        batch_size=4,
        tokenizer=data["tokenizer"],
        image_size=24,
        max_len=80,
    )
    cfg.update(kw)
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(
        set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


def test_batch_contract(shapes_data):
    tok = load_tokenizer(shapes_data["tokenizer"])
    it = make_iterator(_cfg(shapes_data, max_len=128, normalize=True), num_image_tokens=N_IMG, seed=0)
    b = next(it)
    assert set(b) == {"image", "input_ids", "targets", "loss_mask", "attention_mask", "record_id"}
    assert b["image"].dtype == np.float32 and b["image"].shape == (4, 24, 24, 3)
    for k, dt in [("input_ids", np.int32), ("targets", np.int32), ("attention_mask", np.int32)]:
        assert b[k].dtype == dt and b[k].shape == (4, 128), k
    assert b["loss_mask"].dtype == np.float32 and b["record_id"].shape == (4,)
    np.testing.assert_array_equal(b["targets"][:, :-1], b["input_ids"][:, 1:])
    assert (b["targets"][:, -1] == tok.pad_id).all()
    assert ((b["input_ids"] == tok.image_token_id).sum(1) == N_IMG).all()
    n = b["attention_mask"].sum(1)
    assert (n < 128).all()  # nothing truncated, so every answer must be fully in the mask
    for row in range(4):
        assert (b["input_ids"][row, n[row] :] == tok.pad_id).all()
        assert (b["input_ids"][row, : n[row]] != tok.pad_id).all()
        # loss only on answer tokens: every masked target decodes to assistant text / <|im_end|>
        rec = shapes.make_record("sft", int(b["record_id"][row].split("/")[-1]), seed=1, image_size=32)
        answers = "".join(t.text + "<|im_end|>" for t in rec.conversation if t.role == "assistant")
        masked = b["targets"][row][b["loss_mask"][row] > 0]
        assert tok.decode(masked, skip_special_tokens=False) == answers
    # the image is normalized (padding/background is not raw 0..255)
    assert -3 < b["image"].min() and b["image"].max() < 3


def test_same_seed_same_batches_other_seed_differs(shapes_data):
    a = _take(make_iterator(_cfg(shapes_data), num_image_tokens=N_IMG, seed=5), 4)
    b = _take(make_iterator(_cfg(shapes_data), num_image_tokens=N_IMG, seed=5), 4)
    c = _take(make_iterator(_cfg(shapes_data), num_image_tokens=N_IMG, seed=6), 4)
    assert _same(a, b)
    assert not all(np.array_equal(x["record_id"], y["record_id"]) for x, y in zip(a, c, strict=True))


def test_resume_from_state_equals_uninterrupted(shapes_data, tmp_path):
    from etils import epath
    from grain.checkpoint import CheckpointHandler

    full = _take(make_iterator(_cfg(shapes_data), num_image_tokens=N_IMG, seed=0), 30)  # > 1 epoch
    it = make_iterator(_cfg(shapes_data), num_image_tokens=N_IMG, seed=0)
    first = _take(it, 17)
    state = json.loads(json.dumps(it.get_state()))  # JSON-serializable
    resumed = make_iterator(_cfg(shapes_data), num_image_tokens=N_IMG, seed=0)
    resumed.set_state(state)
    assert _same(first + _take(resumed, 13), full)
    # grain's orbax checkpoint handler saves/restores the same state
    CheckpointHandler().save(epath.Path(tmp_path), item=it)
    again = make_iterator(_cfg(shapes_data), num_image_tokens=N_IMG, seed=0)
    CheckpointHandler().restore(epath.Path(tmp_path), item=again)
    assert _same(_take(again, 13), full[17:])


def test_orbax_checkpoint_manager_restores_the_iterator(shapes_data, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    full = _take(make_iterator(_cfg(shapes_data), num_image_tokens=N_IMG, seed=0), 8)
    it = make_iterator(_cfg(shapes_data), num_image_tokens=N_IMG, seed=0)
    _take(it, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    fresh = make_iterator(_cfg(shapes_data), num_image_tokens=N_IMG, seed=0)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(
            mngr.latest_step(), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh))
        )
    assert _same(_take(fresh, 3), full[5:])


def test_epochs_reshuffle_and_cover_all_records(shapes_data):
    it = make_iterator(_cfg(shapes_data, batch_size=8), num_image_tokens=N_IMG, seed=0)
    epochs = [np.concatenate([b["record_id"] for b in _take(it, 6)]) for _ in range(2)]  # 48 = 6 x 8
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(f"shapes/sft/{i}" for i in range(48))
    assert list(epochs[0]) != list(epochs[1])


def test_hosts_read_their_rows_of_the_same_global_batches(shapes_data):
    """3 hosts read disjoint rows whose concatenation is the 1-host batch (so losses and the resume
    point do not depend on the number of processes); together they cover every record once."""
    cfg = _cfg(shapes_data, batch_size=6, repeat=False)
    one = make_dataset(cfg, num_image_tokens=N_IMG, seed=0)
    hosts = [
        make_dataset(cfg, num_image_tokens=N_IMG, seed=0, process_index=h, process_count=3) for h in range(3)
    ]
    assert len(one) == len(hosts[0]) == 8  # 48 records / global batch 6
    seen = []
    for k in range(len(one)):
        rows = [ds[k] for ds in hosts]
        assert all(len(r["record_id"]) == 2 for r in rows)
        for key in ("record_id", "input_ids", "image"):
            np.testing.assert_array_equal(np.concatenate([r[key] for r in rows]), one[k][key])
        seen += [i for r in rows for i in r["record_id"]]
    assert sorted(seen) == sorted(f"shapes/sft/{i}" for i in range(48))
    with pytest.raises(ValueError, match="not divisible"):
        make_iterator(_cfg(shapes_data, batch_size=4), num_image_tokens=N_IMG, seed=0, process_count=3)


def test_weighted_mixture(shapes_data):
    cfg = _cfg(shapes_data, batch_size=8)
    cfg["sources"] = [
        dict(name="shapes", data_dir=shapes_data["data_dir"], split="pretrain", weight=3.0),
        dict(name="shapes", data_dir=shapes_data["data_dir"], split="sft", weight=1.0),
    ]
    ids = np.concatenate(
        [b["record_id"] for b in _take(make_iterator(cfg, num_image_tokens=N_IMG, seed=0), 10)]
    )
    frac = np.mean([r.startswith("shapes/pretrain") for r in ids])
    assert 0.7 <= frac <= 0.8, frac
    only = make_iterator(cfg, num_image_tokens=N_IMG, seed=0, task="sft")
    assert all(r.startswith("shapes/sft") for r in next(only)["record_id"])
    with pytest.raises(ValueError, match="No input source has task"):
        make_iterator(cfg, num_image_tokens=N_IMG, seed=0, task="nope")


def _png(size=16, color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _raw(rid, image, caption="", roles=(), texts=()):
    ex = to_example(Record(rid, b"x", caption=caption))
    ex.update(id=rid, image=image, conversation={"role": list(roles), "text": list(texts)})
    return ex


BAD = {
    "zero": ("zero_byte_image", _raw("zero", b"", caption="a red circle.")),
    "garbage": ("bad_image", _raw("garbage", b"\x89PNG not really", caption="a red circle.")),
    "truncated": ("bad_image", _raw("truncated", _png(64)[:50], caption="a red circle.")),
    "nocap": ("empty_caption", _raw("nocap", _png(), caption="")),
    "noph": ("no_image_placeholder", _raw("noph", _png(), roles=["user", "assistant"], texts=["hi", "red"])),
    "twice": (
        "image_count_mismatch",
        _raw("twice", _png(), roles=["user", "assistant"], texts=["<image><image>", "red"]),
    ),
    "noans": ("empty_conversation", _raw("noans", _png(), roles=["user"], texts=["<image>\nhi"])),
    "utf8": ("invalid_utf8", _raw("utf8", _png(), caption=b"caf\xe9 \xff")),
    "role": ("bad_role", _raw("role", _png(), roles=["robot", "assistant"], texts=["<image>", "red"])),
    "long": ("too_long", _raw("long", _png(), caption=" ".join(["red circle"] * 60))),
}


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory, shapes_data):
    d = str(tmp_path_factory.mktemp("bad"))
    good = [
        Record(
            f"good{i}",
            _png(16, (i * 20, 50, 90)),
            conversation=[Turn("user", "<image>\nwhat colour?"), Turn("assistant", "red")],
        )
        for i in range(12)
    ]
    summary = write_records(
        d, "mixed_quality", {"train": good + [ex for _, ex in BAD.values()]}, progress=False
    )
    assert summary["train"] == {"read": 22, "written": 22, "skipped": {}}  # raw dicts are written unchecked
    return dict(shapes_data, data_dir=d)


def _bad_cfg(bad_data, **kw):
    return _cfg(bad_data, split="train", **dict(dict(max_len=48, overlong="skip"), **kw)) | {
        "sources": [dict(name="mixed_quality", data_dir=bad_data["data_dir"], split="train")]
    }


def test_bad_records_are_skipped_and_counted(bad_data):
    it = make_iterator(
        _bad_cfg(bad_data, shuffle=False, repeat=False, batch_size=2), num_image_tokens=N_IMG, seed=0
    )
    ids = [r for b in it for r in b["record_id"]]
    assert set(ids) <= {f"good{i}" for i in range(12)}  # never a bad record in a batch
    assert len(ids) == 22  # bad ones were replaced by good substitutes, batches stay full
    stats = it.stats()
    expected = collections.Counter(reason for reason, _ in BAD.values())
    for reason, n in expected.items():
        assert stats[f"skipped/{reason}"] >= n, (reason, stats)
    assert stats["skipped/total"] >= len(BAD)
    assert stats["skipped/truncated_archive"] == 0


def test_skip_counters_survive_resume(bad_data):
    cfg = _bad_cfg(bad_data)
    it = make_iterator(cfg, num_image_tokens=N_IMG, seed=0)
    _take(it, 6)
    state = it.get_state()
    later = _take(it, 6)
    resumed = make_iterator(cfg, num_image_tokens=N_IMG, seed=0)
    resumed.set_state(state)
    assert _same(_take(resumed, 6), later)
    assert resumed.stats() == it.stats() and it.stats()["skipped/total"] > 0


def test_overlong_truncate_keeps_record(bad_data):
    cfg = _bad_cfg(bad_data, overlong="truncate", shuffle=False, repeat=False, batch_size=2)
    it = make_iterator(cfg, num_image_tokens=N_IMG, seed=0)
    rows = [(r, b["attention_mask"][i], b["loss_mask"][i]) for b in it for i, r in enumerate(b["record_id"])]
    assert it.stats()["skipped/too_long"] == 0
    assert it.stats()["truncated"] == 1 and it.get_state()["truncated"] == 1  # kept, and counted
    long_rows = [(att, loss) for r, att, loss in rows if r == "long"]
    assert len(long_rows) == 1  # kept, cut to max_len, still trains on the caption tokens that fit
    att, loss = long_rows[0]
    assert att.all() and loss.sum() > 10 and loss[-1] == 0


def test_strict_mode_raises_with_record_id(bad_data):
    it = make_iterator(
        _bad_cfg(bad_data, strict=True, shuffle=False, repeat=False, batch_size=2),
        num_image_tokens=N_IMG,
        seed=0,
    )
    with pytest.raises(BadRecord) as e:
        for _ in it:
            pass
    assert e.value.record_id in BAD and e.value.reason == BAD[e.value.record_id][0]


def test_config_errors_name_the_bad_value(shapes_data):
    with pytest.raises(ValueError, match="Unknown key\\(s\\) 'batchsize'"):
        InputConfig.from_config(dict(_cfg(shapes_data), batchsize=3))
    with pytest.raises(ValueError, match="resize='crop'"):
        InputConfig.from_config(_cfg(shapes_data, resize="crop"))
    with pytest.raises(ValueError, match="overlong='drop'"):
        InputConfig.from_config(_cfg(shapes_data, overlong="drop"))
    with pytest.raises(ValueError, match="no split 'nosplit'"):
        make_iterator(_cfg(shapes_data, split="nosplit"), num_image_tokens=N_IMG, seed=0)
    with pytest.raises(FileNotFoundError, match="No built dataset 'nothere'"):
        cfg = _cfg(shapes_data)
        cfg["sources"] = [dict(name="nothere", data_dir=shapes_data["data_dir"], split="sft")]
        make_iterator(cfg, num_image_tokens=N_IMG, seed=0)


def test_ml_collections_config_accepted(shapes_data):
    import ml_collections

    raw = _cfg(shapes_data, resize="pad", mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], normalize=True)
    raw["data_dir"] = shapes_data["data_dir"]  # input-level default data_dir
    raw["sources"] = [dict(name="shapes", split="sft", weight=1.0)]
    cfg = ml_collections.ConfigDict(raw)
    b = next(make_iterator(cfg, num_image_tokens=N_IMG, seed=0))
    assert b["image"].shape == (4, 24, 24, 3) and b["image"].min() >= -1.0001 and b["image"].max() <= 1.0001


def test_uint8_images_when_normalization_is_left_to_the_device(shapes_data):
    from data_pipelines.images import Normalizer

    f32 = next(make_iterator(_cfg(shapes_data, normalize=True), num_image_tokens=N_IMG, seed=0))
    u8 = next(make_iterator(_cfg(shapes_data), num_image_tokens=N_IMG, seed=0))  # the default
    assert u8["image"].dtype == np.uint8 and u8["image"].shape == f32["image"].shape
    norm = Normalizer()
    np.testing.assert_allclose(np.stack([norm(x) for x in u8["image"]]), f32["image"], atol=1e-5)
    np.testing.assert_array_equal(u8["input_ids"], f32["input_ids"])


def _outcome(example):
    """What the pipeline makes of a stored example: the Record's fields, or the skip reason."""
    try:
        r = from_example(example)
    except BadRecord as e:
        return ("skipped", e.reason, e.record_id)
    return (r.id, r.image, r.caption, [(t.role, t.text) for t in r.conversation], r.boxes.tolist(), r.labels)


def test_fast_record_parser_matches_tfds_decoding(bad_data, shapes_data):
    """``open_source`` parses the stored protos itself; every record must read as TFDS decodes it."""
    import tensorflow_datasets as tfds

    splits = [(bad_data["data_dir"], "mixed_quality", "train"), (shapes_data["data_dir"], "shapes", "sft")]
    for data_dir, name, split in splits:
        ours = open_source(data_dir, name, split)
        ref = tfds.builder_from_directory(dataset_dir(data_dir, name)).as_data_source(split)
        assert len(ours) == len(ref) > 0
        outcomes = [(_outcome(ours[i]), _outcome(ref[i])) for i in range(len(ref))]
        assert all(a == b for a, b in outcomes), next((a, b) for a, b in outcomes if a != b)
        assert any(o[0] == "skipped" for o, _ in outcomes) == (name == "mixed_quality")
        has_boxes = any(len(o) == 6 and o[4] for o, _ in outcomes)
        assert has_boxes == (name == "shapes")  # the shapes SFT split has grounding boxes


def test_worker_processes_give_identical_batches_and_resume(shapes_data):
    ref = _take(make_iterator(_cfg(shapes_data), num_image_tokens=N_IMG, seed=0), 6)
    it = make_iterator(_cfg(shapes_data, num_workers=1), num_image_tokens=N_IMG, seed=0)
    try:
        got = _take(it, 3)
        state = it.get_state()
    finally:
        it.close()
    assert _same(got, ref[:3])
    # a state saved with 1 worker restores into an in-process iterator (and vice versa)
    resumed = make_iterator(_cfg(shapes_data), num_image_tokens=N_IMG, seed=0)
    resumed.set_state(state)
    assert _same(_take(resumed, 3), ref[3:])
    del got, ref


@pytest.fixture(scope="module")
def qformer_tok(shapes_data, tmp_path_factory):
    """A BERT-style Q-Former tokenizer (lowercasing WordPiece) over the shapes words, with [DEC] added."""
    from data_pipelines.text import prepare_qformer_tokenizer
    from tests.demo import bert_tokenizer

    d = tmp_path_factory.mktemp("qformer_tok")
    words = sorted(w for w in shapes.vocabulary() if w.isalpha())
    return prepare_qformer_tokenizer(bert_tokenizer(str(d / "bert"), words), str(d / "ready"))


def test_qformer_caption_tokens(shapes_data, qformer_tok):
    """``input.qformer_tokenizer``: each row's ``qformer_ids`` is [CLS] caption [SEP] [PAD]... (a
    conversation's first answer), the LLM arrays unchanged; off: no new keys."""
    import re

    from data_pipelines.text import load_qformer_tokenizer

    q = load_qformer_tokenizer(qformer_tok)
    for split, max_len in (("pretrain", 96), ("sft", 48)):
        off = next(make_iterator(_cfg(shapes_data, split=split), num_image_tokens=N_IMG, seed=0))
        cfg = _cfg(shapes_data, split=split, qformer_tokenizer=qformer_tok, qformer_max_len=max_len)
        on = next(make_iterator(cfg, num_image_tokens=N_IMG, seed=0))
        assert set(off) == {"image", "input_ids", "targets", "loss_mask", "attention_mask", "record_id"}
        assert set(on) == set(off) | {"qformer_ids", "qformer_mask"}
        assert all(np.array_equal(on[k], off[k]) for k in off)
        for k in ("qformer_ids", "qformer_mask"):
            assert on[k].dtype == np.int32 and on[k].shape == (4, max_len), k
        for ids, mask, rid in zip(on["qformer_ids"], on["qformer_mask"], on["record_id"], strict=True):
            rec = shapes.make_record(split, int(rid.split("/")[-1]), seed=1, image_size=32)
            text = rec.caption or next(t.text for t in rec.conversation if t.role == "assistant")
            n = int(mask.sum())
            assert mask[:n].all() and (ids[n:] == q.pad_id).all()
            assert ids[0] == q.cls_id and ids[n - 1] == q.sep_id
            assert re.sub(r"\s", "", q.decode(ids[:n])) == re.sub(r"\s", "", text.lower())  # all fit
    with pytest.raises(ValueError, match="qformer_max_len=2"):
        InputConfig.from_config(_cfg(shapes_data, qformer_tokenizer=qformer_tok, qformer_max_len=2))


def test_record_without_caption_text_is_skipped_as_no_caption(tmp_path, shapes_data, qformer_tok):
    """A conversation whose first answer is blank trains the LLM (a later answer has text) but gives the
    Q-Former no caption: skipped and counted as ``no_caption`` only when the Q-Former tokens are on."""
    conv = [Turn("user", "<image>\nwhat colour?"), Turn("assistant", "red")]
    recs = [Record(f"good{i}", _png(16, (i * 40, 50, 90)), conversation=conv) for i in range(5)]
    blank = [
        Turn("user", "<image>\nhi"),
        Turn("assistant", " "),
        Turn("user", "colour?"),
        Turn("assistant", "red"),
    ]
    recs.append(Record("nocap", _png(), conversation=blank))
    write_records(str(tmp_path), "qf", {"train": recs}, progress=False)
    data = dict(shapes_data, data_dir=str(tmp_path))
    cfg = _cfg(data, split="train", shuffle=False, repeat=False, batch_size=2) | {
        "sources": [dict(name="qf", data_dir=str(tmp_path), split="train")]
    }
    off = make_iterator(cfg, num_image_tokens=N_IMG, seed=0)
    assert "nocap" in [r for b in off for r in b["record_id"]] and off.stats()["skipped/total"] == 0
    on = make_iterator(dict(cfg, qformer_tokenizer=qformer_tok), num_image_tokens=N_IMG, seed=0)
    ids = [r for b in on for r in b["record_id"]]
    assert len(ids) == 6 and "nocap" not in ids
    stats = on.stats()
    assert stats["skipped/no_caption"] >= 1 and stats["skipped/total"] == stats["skipped/no_caption"]
