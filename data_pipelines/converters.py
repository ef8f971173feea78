"""Converters from the formats MLLM users hold into the shared record schema (TFDS ArrayRecord).

* ``LlavaBuilder``       LLaVA JSON (LLaVA-Pretrain 558K and LLaVA-Instruct 665K layouts) + image dir.
* ``WebDatasetBuilder``  img2dataset WebDataset tars: ``key.jpg`` + ``key.txt`` or ``key.json``.
* ``CocoCaptionsBuilder`` ``captions_<split>.json`` + image dir; one record per caption.
* ``RefCocoBuilder``     RefCOCO / RefCOCO+ / RefCOCOg ``refs(<by>).p`` + ``instances.json`` ->
                         grounding conversations with boxes written by a ``BoxCodec``.

Every builder accounts for each record it reads: written, or skipped with a reason.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import re
import tarfile
from typing import Any

import numpy as np

from data_pipelines.boxes import BoxCodec
from data_pipelines.builders import IMAGE_EXTS, ConverterBuilder, check_image, read_image_file
from data_pipelines.schema import IMAGE_PLACEHOLDER, BadRecord, Record, Turn

LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def load_json(path: str) -> Any:
    """JSON whose invalid UTF-8 bytes survive as lone surrogates (caught per record later)."""
    with open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8", errors="surrogateescape"))


def require_file(path: str | None, what: str, flag: str) -> str:
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} not found; pass it with {flag}.")
    return path


class LlavaBuilder(ConverterBuilder, skip_registration=True):
    """LLaVA JSON: ``[{"id", "image": "rel/path.jpg", "conversations": [{"from", "value"}, ...]}]``;
    ``"image"`` may be a list of paths (multi-image / interleaved data: the k-th ``<image>`` is the k-th
    path)."""

    name = "llava"

    def __init__(self, *, src: str, image_dir: str | None = None, split: str = "train", **kwargs):
        self.src = require_file(src, "LLaVA JSON file", "--src")
        self.image_dir = image_dir or os.path.dirname(os.path.abspath(src))
        self.split = split
        self._data: list | None = None
        super().__init__(**kwargs)

    def _load(self) -> list:
        if self._data is None:
            data = load_json(self.src)
            if not isinstance(data, list):
                raise ValueError(
                    f"{self.src} holds a {type(data).__name__}; LLaVA JSON is a list of records."
                )
            self._data = data
        return self._data

    def _split_names(self):
        return [self.split]

    def _count(self, split):
        return len(self._load())

    def _items(self, split):
        return enumerate(self._load())

    def _convert(self, item) -> Record:
        index, ex = item
        if not isinstance(ex, dict):
            raise BadRecord("missing_field", f"#{index}", "record is not a JSON object")
        rid = str(ex.get("id", f"#{index}"))
        convs = ex.get("conversations")
        if convs is None:
            raise BadRecord("missing_field", rid, "no 'conversations'")
        if not isinstance(convs, list) or not convs:
            raise BadRecord("empty_conversation", rid)
        turns = []
        for t in convs:
            if not isinstance(t, dict) or not isinstance(t.get("value"), str) or "from" not in t:
                raise BadRecord("missing_field", rid, "a turn lacks 'from' or a string 'value'")
            role = LLAVA_ROLES.get(t["from"])
            if role is None:
                raise BadRecord("bad_role", rid, f"unknown speaker {t['from']!r}")
            turns.append(Turn(role, t["value"]))
        for t in turns:
            try:
                t.text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise BadRecord("invalid_utf8", rid) from e
        if not ex.get("image"):  # text-only (LLaVA-1.5 trains these too), unless it asks for an image
            if any(IMAGE_PLACEHOLDER in t.text for t in turns):
                raise BadRecord("missing_image", rid, "no 'image' but the conversation has <image>")
            return Record(rid, b"", conversation=turns)
        paths = ex["image"] if isinstance(ex["image"], list) else [ex["image"]]
        if not all(isinstance(p, str) and p for p in paths):
            raise BadRecord("missing_image", rid, f"'image' holds {paths!r}, not file paths")
        first, *more = [read_image_file(os.path.join(self.image_dir, p), rid) for p in paths]
        return Record(rid, first, conversation=turns, more_images=more)


def _ends_with_eof_marker(path: str, offset: int) -> bool:
    """A complete tar ends with zero blocks (>= 1024 bytes) after the last member."""
    with open(path, "rb") as f:
        f.seek(offset)
        rest = f.read()
    return len(rest) >= 1024 and not rest.strip(b"\0")


class WebDatasetBuilder(ConverterBuilder, skip_registration=True):
    """img2dataset WebDataset shards: members grouped by key; image + ``txt`` or ``json["caption"]``."""

    name = "webdataset"

    def __init__(self, *, src: str, split: str = "train", **kwargs):
        paths = (
            sorted(glob.glob(os.path.join(src, "*.tar"))) if os.path.isdir(src) else sorted(glob.glob(src))
        )
        if not paths:
            raise FileNotFoundError(
                f"No .tar shards at {src!r}; pass a directory of shards or a glob with --src."
            )
        self.paths, self.split = paths, split
        super().__init__(**kwargs)

    def _split_names(self):
        return [self.split]

    def _items(self, split):
        for path in self.paths:
            shard = os.path.splitext(os.path.basename(path))[0]
            group: dict[str, bytes] = {}
            key = None
            try:
                with tarfile.open(path, "r") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        base = os.path.basename(member.name)
                        k, _, ext = base.partition(".")
                        k = os.path.join(os.path.dirname(member.name), k)
                        if key is not None and k != key:
                            yield shard, key, group
                            group = {}
                        key = k
                        group[ext.lower()] = tar.extractfile(member).read()
                    end = tar.offset
                if key is not None:
                    yield shard, key, group
                if not _ends_with_eof_marker(path, end):
                    # tarfile stops silently at a header cut short: the archive lost its tail
                    yield BadRecord("truncated_archive", f"{shard}/after {key}", "no end-of-archive marker")
            except (tarfile.TarError, EOFError, OSError) as e:
                # the sample being read when the archive broke is lost: count it, keep the rest
                yield BadRecord("truncated_archive", f"{shard}/{key}", f"{type(e).__name__}: {e}")

    def _convert(self, item) -> Record:
        shard, key, group = item
        meta: dict[str, Any] = {}
        if "json" in group:
            try:
                meta = json.loads(group["json"].decode("utf-8"))
            except UnicodeDecodeError as e:
                raise BadRecord("invalid_utf8", f"{shard}/{key}", "json member") from e
            except json.JSONDecodeError as e:
                raise BadRecord("missing_field", f"{shard}/{key}", f"json member: {e}") from e
        rid = str(meta.get("key") or f"{shard}/{os.path.basename(key)}")
        image = next((group[e.lstrip(".")] for e in IMAGE_EXTS if e.lstrip(".") in group), None)
        if image is None:
            raise BadRecord("missing_image", rid, f"members {sorted(group)}")
        if "txt" in group:
            try:
                caption = group["txt"].decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadRecord("invalid_utf8", rid, "txt member") from e
        elif isinstance(meta.get("caption"), str):
            caption = meta["caption"]
        else:
            raise BadRecord("missing_field", rid, "no .txt member and no json caption")
        return Record(rid, check_image(image, rid), caption=caption.strip())


class CocoCaptionsBuilder(ConverterBuilder, skip_registration=True):
    """COCO captions: ``--src`` = ``captions_<split>.json`` file(s) (comma-separated) + image dir(s).

    The image dir defaults to ``<annotations dir>/../<split>`` (e.g. ``train2017``), the COCO layout.
    """

    name = "coco_captions"

    def __init__(self, *, src: str, image_dir: str | None = None, **kwargs):
        self.files = {}
        for path in src.split(","):
            require_file(path, "COCO captions file", "--src")
            m = re.match(r"captions_(\w+?)\.json$", os.path.basename(path))
            if not m:
                raise ValueError(
                    f"{path} is not named captions_<split>.json; rename it or pass the COCO file."
                )
            full = m.group(1)  # e.g. train2017
            split = re.sub(r"\d+$", "", full) or full
            img_dir = image_dir or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), full)
            self.files[split] = (path, img_dir)
        self._cache: dict[str, Any] = {}
        super().__init__(**kwargs)

    def _split_names(self):
        return list(self.files)

    def _load(self, split):
        if split not in self._cache:
            data = load_json(self.files[split][0])
            if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
                raise ValueError(
                    f"{self.files[split][0]} lacks 'images'/'annotations'; is it a COCO captions file?"
                )
            self._cache[split] = data
        return self._cache[split]

    def _count(self, split):
        return len(self._load(split)["annotations"])

    def _items(self, split):
        data = self._load(split)
        images = {im.get("id"): im for im in data["images"] if isinstance(im, dict)}
        for index, ann in enumerate(data["annotations"]):
            yield split, index, ann, images.get(ann.get("image_id") if isinstance(ann, dict) else None)

    def _convert(self, item) -> Record:
        split, index, ann, image = item
        if not isinstance(ann, dict) or "caption" not in ann:
            raise BadRecord("missing_field", f"{split}#{index}", "annotation without caption")
        rid = f"{ann.get('image_id')}_{ann.get('id', index)}"
        if image is None or "file_name" not in image:
            raise BadRecord("missing_image", rid, f"image_id {ann.get('image_id')} not in images")
        caption = ann["caption"]
        if not isinstance(caption, str):
            raise BadRecord("missing_field", rid, "caption is not a string")
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadRecord("invalid_utf8", rid) from e
        data = read_image_file(os.path.join(self.files[split][1], image["file_name"]), rid)
        return Record(rid, data, caption=caption.strip())


REFER_FIRST = IMAGE_PLACEHOLDER + "\nprovide the bounding box of the region this sentence describes: {sent}"
REFER_NEXT = "provide the bounding box of the region this sentence describes: {sent}"


def refcoco_files(src: str, split_by: str | None = None) -> tuple[str, str]:
    """``(refs(<split_by>).p, instances.json)`` of a RefCOCO/+/g dir (the first refs file without
    ``split_by``); one error naming what is missing."""
    refs = sorted(glob.glob(os.path.join(src, "refs(*).p")))
    if split_by:
        refs = [r for r in refs if os.path.basename(r) == f"refs({split_by}).p"]
    if not refs:
        raise FileNotFoundError(f"No refs({split_by or '*'}).p in {src!r}; pass the RefCOCO dir with --src.")
    return refs[0], require_file(os.path.join(src, "instances.json"), "instances.json", "--src")


class RefCocoBuilder(ConverterBuilder, skip_registration=True):
    """RefCOCO/+/g: ``--src`` dir with ``refs(<split_by>).p`` and ``instances.json``; ``--image_dir``
    the COCO ``train2014`` images. One record per referred object: each referring sentence is a
    user turn answered by the box, written by ``codec`` (default norm3 / square; declared as the
    dataset's ``box_codec``) in the frame of the image it measures.
    """

    name = "refcoco"

    def __init__(
        self,
        *,
        src: str,
        image_dir: str | None = None,
        split_by: str | None = None,
        codec: BoxCodec | None = None,
        **kwargs,
    ):
        self.refs_path, self.instances_path = refcoco_files(src, split_by)
        self.image_dir = image_dir or os.path.join(src, "images")
        self._refs: list | None = None
        self._images: dict | None = None
        self._anns: dict | None = None
        super().__init__(box_codec=codec or BoxCodec(), **kwargs)

    def _load(self):
        if self._refs is None:
            with open(self.refs_path, "rb") as f:  # the official files are pickles (trusted input)
                self._refs = pickle.load(f, encoding="latin1")
            inst = load_json(self.instances_path)
            self._images = {im["id"]: im for im in inst.get("images", [])}
            self._anns = {a["id"]: a for a in inst.get("annotations", [])}
        return self._refs

    def _split_names(self):
        return sorted({str(r.get("split", "train")) for r in self._load()})

    def _count(self, split):
        return sum(str(r.get("split", "train")) == split for r in self._load())

    def _items(self, split):
        for r in self._load():
            if str(r.get("split", "train")) == split:
                yield r

    def _convert(self, ref) -> Record:
        rid = f"ref{ref.get('ref_id', '?')}"
        ann = self._anns.get(ref.get("ann_id"))
        image = self._images.get(ref.get("image_id"))
        if ann is None or "bbox" not in ann:
            raise BadRecord("bad_boxes", rid, f"ann_id {ref.get('ann_id')} not in instances")
        if image is None:
            raise BadRecord("missing_image", rid, f"image_id {ref.get('image_id')} not in instances")
        sents = [s.get("sent") or s.get("raw") for s in ref.get("sentences", []) if isinstance(s, dict)]
        sents = [s.strip() for s in sents if isinstance(s, str) and s.strip()]
        if not sents:
            raise BadRecord("empty_conversation", rid, "no referring sentence")
        data = read_image_file(os.path.join(self.image_dir, image["file_name"]), rid)
        w, h = image.get("width"), image.get("height")
        if not w or not h:
            from data_pipelines.images import decode

            w, h = decode(data, rid).size
        x, y, bw, bh = (float(v) for v in ann["bbox"])
        if bw <= 0 or bh <= 0 or not np.isfinite([x, y, bw, bh]).all():
            raise BadRecord("bad_boxes", rid, f"bbox {ann['bbox']}")
        box = [x, y, x + bw, y + bh]
        answer = self.box_codec.encode(box, w, h)
        turns = []
        for i, s in enumerate(sents):
            turns += [
                Turn("user", (REFER_FIRST if i == 0 else REFER_NEXT).format(sent=s)),
                Turn("assistant", answer),
            ]
        return Record(rid, data, conversation=turns, boxes=np.array([box], np.float32), labels=[sents[0]])
