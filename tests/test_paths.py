"""Remote workdirs: everything a run writes besides checkpoints (config, model.json, tokenizer, metrics,
TensorBoard, eval outputs) goes through epath, checked on a fake ``gs://`` backend that maps buckets to
a local directory and, like GCS, cannot append."""

from __future__ import annotations

import json
import os

import pytest
from etils.epath import backend, gpath

from pargo_jax import configs, metrics, paths


class _LocalBuckets(backend._OsPathBackend):
    """``gs://bucket/x`` -> ``root/bucket/x``; append mode refused, as on an object store."""

    def __init__(self, root: str):
        self.root = root

    def _local(self, p) -> str:
        p = os.fspath(p)
        return os.path.join(self.root, p.removeprefix("gs://")) if p.startswith("gs://") else p

    def open(self, path, mode, *args, **kwargs):
        if "a" in mode:
            raise OSError(f"object stores cannot append ({path})")
        return super().open(self._local(path), mode, *args, **kwargs)

    def exists(self, path):
        return super().exists(self._local(path))

    def isdir(self, path):
        return super().isdir(self._local(path))

    def listdir(self, path):
        return super().listdir(self._local(path))

    def glob(self, path):
        return [p.replace(self.root + "/", "gs://", 1) for p in super().glob(self._local(path))]

    def makedirs(self, path, *args, **kwargs):
        return super().makedirs(self._local(path), *args, **kwargs)

    def mkdir(self, path, *args, **kwargs):
        return super().mkdir(self._local(path), *args, **kwargs)

    def remove(self, path):
        return super().remove(self._local(path))

    def rename(self, path, dst):
        return super().rename(self._local(path), self._local(dst))

    def replace(self, path, dst):
        return super().replace(self._local(path), self._local(dst))

    def rmtree(self, path):
        return super().rmtree(self._local(path))

    def stat(self, path):
        return super().stat(self._local(path))


def _scalars(files) -> list[tuple[int, float]]:
    """(step, value) of every ``loss`` scalar in TensorBoard event files (TFRecord framing)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for f in files:
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            out += [(event.step, v.simple_value) for v in event.summary.value if v.tag == "loss"]
            i += 12 + n + 4
    return sorted(out)


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """The local directory that stands for ``gs://``; the test runs in an empty cwd."""
    root = tmp_path / "buckets"
    root.mkdir()
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", _LocalBuckets(str(root)))
    monkeypatch.chdir(tmp_path)
    return root


def test_paths_keep_remote_urls_and_absolutize_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.join("gs://b/run", "eval", "3") == "gs://b/run/eval/3"
    assert paths.join("run", "x") == str(tmp_path / "run" / "x")
    assert paths.is_remote("gs://b") and not paths.is_remote("/b")


def test_metric_writer_on_a_bucket_appends_across_restarts(gcs, tmp_path):
    w = metrics.MetricWriter("gs://bucket/run")
    w.write(1, {"loss": 2.0})
    w.write(2, {"loss": 1.5})
    w.close()
    w = metrics.MetricWriter("gs://bucket/run")  # a resumed run keeps the earlier lines
    w.write(3, {"loss": 1.0})
    w.close()
    lines = (gcs / "bucket/run/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [
        {"step": 1, "loss": 2.0},
        {"step": 2, "loss": 1.5},
        {"step": 3, "loss": 1.0},
    ]
    events = sorted((gcs / "bucket/run/tensorboard").iterdir())
    assert events and all(e.name.startswith("events.out.tfevents") for e in events)
    assert _scalars(events) == [(1, 2.0), (2, 1.5), (3, 1.0)]
    assert not (tmp_path / "gs:").exists()  # nothing written into a local directory named "gs:"


def test_run_files_and_eval_outputs_on_a_bucket(gcs, tmp_path):
    import ml_collections

    from data_pipelines import shapes
    from data_pipelines.text import Tokenizer
    from pargo_jax.evaluators import common, mme

    config = ml_collections.ConfigDict({"seed": 3, "model": {"projector": {"name": "pargo"}}})
    configs.save_run_config(config, "gs://bucket/run")
    assert configs.load_run_config("gs://bucket/run").seed == 3
    tok = Tokenizer.load(shapes.write_tokenizer(str(tmp_path / "tok")))
    tok.save("gs://bucket/run/tokenizer")
    assert Tokenizer.load("gs://bucket/run/tokenizer").vocab_size == tok.vocab_size
    common.write_results("gs://bucket/run/eval/5", "shapes", {"acc": 0.5}, [{"id": "a", "answer": "b"}])
    mme.write_results("gs://bucket/run/eval/5/mme_results", {"OCR": [("1.jpg", "q?", "Yes", "No")]})
    out = gcs / "bucket/run/eval/5"
    assert json.loads((out / "shapes.json").read_text()) == {"acc": 0.5}
    assert (out / "shapes.predictions.jsonl").read_text() == '{"id": "a", "answer": "b"}\n'
    assert (out / "mme_results/OCR.txt").read_text() == "1.jpg\tq?\tYes\tNo\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buckets", "tok"]
