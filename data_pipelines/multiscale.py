"""Multi-scale alignment data (TinyGroundingGPT, arXiv 2411.09691): the same objects as text,
coordinates and object images, in three configs that follow the paper's three stages.

  * ``perception`` object <-> coordinates and relations: referring expression -> box, box -> name or
                   expression, a grounded caption listing every object with its box, and relations
                   between two objects given with their boxes (left of / above / which is bigger / same
                   colour where colours are known), answered from the boxes.
  * ``local``      object image <-> text and coordinates: each object's crop (cut from the original image
                   with a context margin drawn from ``Options.margins``, padded to a square) as an extra
                   image, asked "what is it?" and "where is it in the full image?", and "which of these
                   crops is X?" over several crops (answered by ordinal).
  * ``global``     a detailed description of the image naming every object with its box.

Every source is read into ``Pending`` scenes (one per image: its id, how to load its image, its candidate
``Obj`` s); the builder loads the image, checks each object against it and writes one record per scene
with the boxes written by a ``BoxCodec`` in the frame of the first (full) image. Sources: RefCOCO/+/g
(``refs(<by>).p`` + ``instances.json``: every COCO object of a referred image, the referred ones with
their expressions), COCO instances (``instances_<split>.json``), LLaVA JSON + an offline detections file
(:mod:`data_pipelines.detections`; labels as names) and the synthetic shapes set (names like
"red circle", colours known).

Accounting, per split: records as every builder (read = written + skipped by ``schema.SKIP_REASONS``)
and objects (read = used + skipped by ``OBJECT_SKIP_REASONS``). Records are a pure function of
(source, config, ``Options``, codec): each scene's questions come from its own seeded random stream.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import json
import math
import os
import pickle
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines import images, schema, shapes
from data_pipelines.boxes import BoxCodec
from data_pipelines.builders import ConverterBuilder, check_image, read_image_file
from data_pipelines.converters import load_json, refcoco_files, require_file
from data_pipelines.detections import read_detections
from data_pipelines.schema import IMAGE_PLACEHOLDER, BadRecord, Record, Turn

CONFIGS = ("perception", "local", "global")
SOURCES = ("refcoco", "coco", "llava", "shapes")

# Every question and answer text the records hold (the shapes tokenizer's extra words come from here).
QUESTIONS = {
    "caption": "list every object in the image with its bounding box.",
    "caption_some": "list {count} of the objects in the image with their bounding boxes.",
    "rec": "give the bounding box of {phrase}.",
    "rec_all": "give the bounding box of every {name}.",
    "reg": "what is at {box}?",
    "left": "is {a} left of {b}?",
    "above": "is {a} above {b}?",
    "bigger": "which is bigger, {a} or {b}?",
    "same_colour": "do {a} and {b} have the same colour?",
    "crop_name": "what is the object in this crop? {crop}",
    "crop_where": "where is the object in this crop in the full image? {crop}",
    "then_name": "what is it?",
    "then_where": "where is it in the full image?",
    "crop_choice": "which of these crops is {phrase}? {crops}",
    "describe": "describe the image in detail, naming every object with its bounding box.",
}
ANSWERS = {
    "object": "{name} {box}",  # a grounded caption's item
    "operand": "the {noun} {box}",  # an object in a relation question (and the answer to "which is bigger")
    "the": "the {name}",  # a phrase naming the only object of its name
    "count": "the image shows {count} {objects}.",
    "count_some": "the image shows more than {count} objects, among them:",
    "at": "at the {position} there is {article} {name} {box}.",
    "biggest": "the biggest is the {name} {box}.",
}
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
YES_NO = ("yes", "no")
RELATIONS = ("left", "above", "bigger", "same_colour")
BIGGER_RATIO = 1.5  # "which is bigger" is asked only when one box's area is this many times the other's
BOX_SLACK = 1.0  # px a box may pass the image edge (clipped); further out it is box_outside_image
# Why an object is not in a record (objects are accounted separately from records).
OBJECT_SKIP_REASONS = (
    "malformed_box",  # no box, or not 4 finite numbers
    "box_outside_image",  # the box passes the image edge by more than BOX_SLACK
    "degenerate_box",  # a side below Options.min_side after clipping
    "no_name",  # no category / label / expression (or not valid UTF-8)
    "crowd",  # a COCO crowd region (many objects in one box)
    "low_score",  # a detection below min_score
    "over_max_objects",  # past the per-record cap (the largest objects, referred ones first, are kept)
    "record_skipped",  # its record was skipped (reason in the record accounting)
)
TOKENIZER_DIR = "multiscale_shapes_tokenizer"


@dataclasses.dataclass(frozen=True)
class Options:
    """How records are made from scenes (every config)."""

    margins: tuple[float, ...] = (0.0, 0.25, 0.5)  # local: crop context per side, fractions of box size
    max_objects: int = 8  # objects per record; the rest are counted as over_max_objects
    max_crops: int = 3  # local: objects with their own crop; images <= 1 + max_crops + num_choices
    num_choices: int = 3  # local: crops in "which of these crops is X?"
    max_relations: int = 4  # perception: relation questions per record
    min_side: float = 1.0  # px; a smaller box side is degenerate
    seed: int = 0

    def __post_init__(self):
        if not self.margins or min(self.margins) < 0:
            raise ValueError(
                f"margins {self.margins} must be non-empty and >= 0 (fractions of the box size)."
            )
        if self.max_objects < 1 or self.max_crops < 1 or self.max_relations < 0:
            raise ValueError("max_objects and max_crops must be >= 1, max_relations >= 0.")
        if not 2 <= self.num_choices <= len(ORDINALS):
            raise ValueError(f"num_choices={self.num_choices} must be in [2, {len(ORDINALS)}].")


@dataclasses.dataclass
class Obj:
    """One object: ``box`` ``[x1, y1, x2, y2]`` in pixels of the original image, its ``name`` (category or
    label), referring ``expressions`` if any, known ``attributes`` (``colour``, ``shape``)."""

    box: tuple[float, ...]
    name: str
    expressions: tuple[str, ...] = ()
    attributes: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


@dataclasses.dataclass
class Scene:
    """An image and its checked objects. ``omitted``: names of objects in the image that are not in
    ``objects`` (past the cap, crowd regions), so that no "every ..." statement is made about them."""

    id: str
    image: bytes
    width: int
    height: int
    objects: list[Obj]
    omitted: tuple[str, ...] = ()


@dataclasses.dataclass
class Pending:
    """A scene as a reader yields it (cheap): its image is loaded and its objects checked by the builder's
    worker threads. ``skipped``: objects the reader already dropped, by reason; ``error``: why the scene
    cannot be built at all (its objects count as record_skipped)."""

    split: str
    id: str
    load: Callable[[], bytes]
    objects: list[Obj]
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    error: BadRecord | None = None
    omitted: tuple[str, ...] = ()  # names of objects the reader dropped but that are in the image (crowd)


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------
def box_problem(box: Sequence[Any], width: int, height: int, min_side: float) -> str | None:
    """Why ``box`` cannot be used on a ``width x height`` image (in ``OBJECT_SKIP_REASONS``), or None."""
    try:
        b = np.asarray(box, np.float64)
    except (TypeError, ValueError):
        return "malformed_box"
    if b.shape != (4,) or not np.isfinite(b).all():
        return "malformed_box"
    if b[0] < -BOX_SLACK or b[1] < -BOX_SLACK or b[2] > width + BOX_SLACK or b[3] > height + BOX_SLACK:
        return "box_outside_image"
    c = clip_box(b, width, height)
    return "degenerate_box" if min(c[2] - c[0], c[3] - c[1]) < min_side else None


def clip_box(box: Sequence[float], width: int, height: int) -> tuple[float, ...]:
    return tuple(float(v) for v in np.clip(np.asarray(box, np.float64), 0, [width, height, width, height]))


def crop_window(box: Sequence[float], margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Integer pixel window of an object's crop: its box grown by ``margin`` times its width (height) on
    the left and right (top and bottom), clipped to the image."""
    x1, y1, x2, y2 = box
    mx, my = margin * (x2 - x1), margin * (y2 - y1)
    return (
        max(0, math.floor(x1 - mx)),
        max(0, math.floor(y1 - my)),
        min(width, math.ceil(x2 + mx)),
        min(height, math.ceil(y2 + my)),
    )


def crop_object(img: Image.Image, box: Sequence[float], margin: float) -> Image.Image:
    """The object's crop (:func:`crop_window`) padded to a centred square with the mean colour, as the
    ``letterbox`` resize pads a whole image (native resolution, no scaling)."""
    part = img.crop(crop_window(box, margin, img.width, img.height))
    return images.resize(part, max(part.size), "letterbox")


def _encode_like(img: Image.Image, source: bytes) -> bytes:
    """PNG for a PNG source (lossless), else JPEG quality 95."""
    buf = io.BytesIO()
    if source.startswith(b"\x89PNG"):
        img.save(buf, format="PNG", compress_level=1)
    else:
        img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def reading_order(objects: Sequence[Obj]) -> list[Obj]:
    """Top to bottom, then left to right, by box centre."""
    return sorted(objects, key=lambda o: (o.box[1] + o.box[3], o.box[0] + o.box[2]))


def position(box: Sequence[float], width: int, height: int) -> str:
    """The box centre's cell of a 3 x 3 grid, in the shapes set's words ("top left", "center", ...)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return shapes.POSITIONS[min(2, int(3 * cy / height))][min(2, int(3 * cx / width))]


def relation_answer(kind: str, a: Obj, b: Obj) -> str | None:
    """The answer the boxes (and known colours) give to ``QUESTIONS[kind]`` about ``a`` then ``b``:
    "yes" / "no", or "a" / "b" for the bigger one; None when they do not settle it."""
    if kind in ("left", "above"):
        lo, hi = (0, 2) if kind == "left" else (1, 3)
        if a.box[hi] <= b.box[lo]:
            return "yes"
        return "no" if b.box[hi] <= a.box[lo] else None
    if kind == "bigger":
        if a.area >= BIGGER_RATIO * b.area:
            return "a"
        return "b" if b.area >= BIGGER_RATIO * a.area else None
    if kind == "same_colour":
        ca, cb = a.attributes.get("colour"), b.attributes.get("colour")
        return None if ca is None or cb is None else YES_NO[ca != cb]
    raise ValueError(f"Unknown relation {kind!r}; use one of {RELATIONS}.")


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------
def _article(word: str) -> str:
    return shapes.ARTICLES[word[:1].lower() in "aeiou"]


def _describe(o: Obj, rng: random.Random) -> str:
    """What names the object: one of its referring expressions, else its name."""
    return rng.choice(o.expressions) if o.expressions else o.name


def _refer(o: Obj, rng: random.Random) -> str:
    """A phrase for ``o``: one of its expressions, else "the <name>" (unique only among distinct names)."""
    return rng.choice(o.expressions) if o.expressions else ANSWERS["the"].format(name=o.name)


def _perception(scene: Scene, box: Callable[[Obj], str], rng: random.Random, opts: Options):
    objs = scene.objects
    items = ", ".join(ANSWERS["object"].format(name=o.name, box=box(o)) for o in reading_order(objs))
    caption = QUESTIONS["caption_some"].format(count=len(objs)) if scene.omitted else QUESTIONS["caption"]
    qa = [(caption, items)]
    for name in dict.fromkeys(o.name for o in objs):  # names whose every object is here: one REC each
        group = reading_order([o for o in objs if o.name == name])
        if name in scene.omitted:
            continue
        if len(group) == 1:
            the = ANSWERS["the"].format(name=name)
            qa.append((QUESTIONS["rec"].format(phrase=the), box(group[0])))
        else:
            qa.append((QUESTIONS["rec_all"].format(name=name), ", ".join(box(o) for o in group)))
    for o in objs:
        if o.expressions:
            qa.append((QUESTIONS["rec"].format(phrase=rng.choice(o.expressions)), box(o)))
        qa.append((QUESTIONS["reg"].format(box=box(o)), _describe(o, rng)))
    askable = [
        (k, a, b)
        for k in RELATIONS
        for i, a in enumerate(objs)
        for b in objs[i + 1 :]
        if relation_answer(k, a, b) is not None
    ]
    for kind, a, b in rng.sample(askable, min(opts.max_relations, len(askable))):
        if rng.random() < 0.5:
            a, b = b, a
        noun = (lambda o: o.attributes.get("shape", o.name)) if kind == "same_colour" else (lambda o: o.name)
        a_text, b_text = (ANSWERS["operand"].format(noun=noun(o), box=box(o)) for o in (a, b))
        answer = relation_answer(kind, a, b)
        answer = {"a": a_text, "b": b_text}.get(answer, answer)
        qa.append((QUESTIONS[kind].format(a=a_text, b=b_text), answer))
    rng.shuffle(qa)
    return qa, []


def _local(scene: Scene, box: Callable[[Obj], str], rng: random.Random, opts: Options):
    img = images.decode(scene.image, scene.id)
    crop = lambda o: _encode_like(crop_object(img, o.box, rng.choice(opts.margins)), scene.image)
    blocks = []  # (questions and answers, the crops their placeholders stand for), shuffled as units
    for o in scene.objects:
        name, where = (QUESTIONS["crop_name"], _describe(o, rng)), (QUESTIONS["crop_where"], box(o))
        first, then = (name, where) if rng.random() < 0.5 else (where, name)
        follow = QUESTIONS["then_where"] if first is name else QUESTIONS["then_name"]
        q = first[0].format(crop=IMAGE_PLACEHOLDER)
        blocks.append(([(q, first[1]), (follow, then[1])], [crop(o)]))
    target = rng.choice(scene.objects)
    pool = [o for o in scene.objects if o is not target and (target.expressions or o.name != target.name)]
    if pool:
        shown = rng.sample(pool, min(opts.num_choices - 1, len(pool))) + [target]
        rng.shuffle(shown)
        crops = " ".join([IMAGE_PLACEHOLDER] * len(shown))
        q = QUESTIONS["crop_choice"].format(phrase=_refer(target, rng), crops=crops)
        blocks.append(([(q, ORDINALS[shown.index(target)])], [crop(o) for o in shown]))
    rng.shuffle(blocks)
    return [x for qa, _ in blocks for x in qa], [c for _, crops in blocks for c in crops]


def _global(scene: Scene, box: Callable[[Obj], str], rng: random.Random, opts: Options):
    del rng, opts
    n = len(scene.objects)
    if scene.omitted:
        parts = [ANSWERS["count_some"].format(count=n)]
    else:
        parts = [ANSWERS["count"].format(count=n, objects="object" if n == 1 else "objects")]
    for o in reading_order(scene.objects):
        where = position(o.box, scene.width, scene.height)
        parts.append(ANSWERS["at"].format(position=where, article=_article(o.name), name=o.name, box=box(o)))
    if n > 1 and not scene.omitted:
        big = max(scene.objects, key=lambda o: o.area)
        parts.append(ANSWERS["biggest"].format(name=big.name, box=box(big)))
    return [(QUESTIONS["describe"], " ".join(parts))], []


_CONFIG_QA = {"perception": _perception, "local": _local, "global": _global}


def make_record(scene: Scene, config: str, codec: BoxCodec, options: Options | None = None) -> Record:
    """The ``config`` record of ``scene``: boxes written by ``codec`` in the frame of the full image
    (the first image; ``local`` adds the crops after it, in placeholder order)."""
    if config not in CONFIGS:
        raise ValueError(f"Unknown config {config!r}; use one of {CONFIGS}.")
    options = options or Options()
    rng = random.Random(f"multiscale/{options.seed}/{config}/{scene.id}")
    box = lambda o: codec.encode(o.box, scene.width, scene.height)
    qa, crops = _CONFIG_QA[config](scene, box, rng, options)
    turns = []
    for i, (q, a) in enumerate(qa):
        turns += [Turn("user", (IMAGE_PLACEHOLDER + "\n" if i == 0 else "") + q), Turn("assistant", a)]
    boxes = np.array([o.box for o in scene.objects], np.float32).reshape(-1, 4)
    labels = [o.name for o in scene.objects]
    return Record(scene.id, scene.image, conversation=turns, boxes=boxes, labels=labels, more_images=crops)


# ------------------------------------------------------------------------------------------------
# Readers: one per source, yielding Pending scenes per split
# ------------------------------------------------------------------------------------------------
def _text(value: Any) -> str:
    """A stripped string that is valid UTF-8, else ""."""
    if not isinstance(value, str):
        return ""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return ""
    return value.strip()


def _coco_scene(
    split: str,
    image_id: Any,
    image: Mapping[str, Any] | None,
    anns: Sequence[Mapping[str, Any]],
    categories: Mapping[Any, Any],
    image_dir: str,
    expressions: Mapping[Any, Sequence[str]] | None = None,
) -> Pending:
    """A COCO-format image (``image``: its entry in ``images``, or None) and its annotations: crowd
    regions and malformed boxes are dropped here, boxes go from ``[x, y, w, h]`` to corners."""
    rid = f"img{image_id}"
    objects, skipped, omitted = [], collections.Counter(), []
    for ann in anns:
        name = _text(categories.get(ann.get("category_id")))
        if ann.get("iscrowd"):
            skipped["crowd"] += 1
            omitted.append(name)
            continue
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            skipped["malformed_box"] += 1
            continue
        exprs = tuple(e for e in (expressions or {}).get(ann.get("id"), ()) if e)
        objects.append(Obj((x, y, x + w, y + h), name or (exprs[0] if exprs else ""), exprs))
    if image is None or not isinstance(image.get("file_name"), str):
        error = BadRecord("missing_image", rid, f"image_id {image_id} not in the annotation file's images")
        return Pending(split, rid, lambda: b"", objects, skipped, error)
    load = functools.partial(read_image_file, os.path.join(image_dir, image["file_name"]), rid)
    return Pending(split, rid, load, objects, skipped, omitted=tuple(omitted))


def _index_instances(data: Mapping[str, Any]) -> tuple[dict[Any, list[dict]], dict[Any, Any]]:
    """A COCO instances file's annotations by image id, and its category names by id."""
    anns: dict[Any, list[dict]] = collections.defaultdict(list)
    for a in data.get("annotations", []):
        anns[a.get("image_id")].append(a)
    return anns, {c.get("id"): c.get("name") for c in data.get("categories", [])}


class RefCocoReader:
    """RefCOCO/+/g: ``src`` dir with ``refs(<split_by>).p`` and ``instances.json``; ``image_dir`` the COCO
    ``train2014`` images. A scene per referred image (per split): every object of its annotations, the
    referred ones with their sentences as expressions."""

    source = "refcoco"

    def __init__(self, src: str, image_dir: str | None = None, split_by: str | None = None):
        self.refs_path, self.instances_path = refcoco_files(src, split_by)
        self.image_dir = image_dir or os.path.join(src, "images")
        self._data: tuple | None = None

    def _load(self):
        if self._data is None:
            with open(self.refs_path, "rb") as f:  # the official files are pickles (trusted input)
                refs = [r for r in pickle.load(f, encoding="latin1") if isinstance(r, dict)]
            inst = load_json(self.instances_path)
            self._data = refs, {im["id"]: im for im in inst.get("images", [])}, *_index_instances(inst)
        return self._data

    def splits(self) -> list[str]:
        return sorted({str(r.get("split", "train")) for r in self._load()[0]})

    def _refs_by_image(self, split: str) -> dict[Any, list[dict]]:
        by_image: dict[Any, list[dict]] = {}
        for r in self._load()[0]:
            if str(r.get("split", "train")) == split:
                by_image.setdefault(r.get("image_id"), []).append(r)
        return by_image

    def count(self, split: str) -> int:
        return len(self._refs_by_image(split))

    def scenes(self, split: str) -> Iterator[Pending]:
        _, image_table, anns, cats = self._load()
        for image_id, refs in self._refs_by_image(split).items():
            exprs = collections.defaultdict(list)
            for r in refs:
                sents = [
                    _text(s.get("sent") or s.get("raw"))
                    for s in r.get("sentences", [])
                    if isinstance(s, dict)
                ]
                exprs[r.get("ann_id")] += [s for s in sents if s]
            image_anns = anns.get(image_id, [])
            pending = _coco_scene(
                split, image_id, image_table.get(image_id), image_anns, cats, self.image_dir, exprs
            )
            known = {a.get("id") for a in image_anns}  # a ref to no annotation has no box
            pending.skipped["malformed_box"] += sum(r.get("ann_id") not in known for r in refs)
            yield pending


class CocoReader:
    """COCO instances: ``src`` = ``instances_<split>.json`` file(s), comma-separated; ``image_dir``
    defaults to ``<annotations dir>/../<split>`` (e.g. ``train2017``). A scene per image; names are the
    category names."""

    source = "coco"

    def __init__(self, src: str, image_dir: str | None = None):
        self.files: dict[str, tuple[str, str]] = {}
        for path in src.split(","):
            require_file(path, "COCO instances file", "--src")
            m = re.match(r"instances_(\w+?)\.json$", os.path.basename(path))
            if not m:
                raise ValueError(f"{path} is not named instances_<split>.json; pass the COCO instances file.")
            full = m.group(1)
            root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
            self.files[re.sub(r"\d+$", "", full) or full] = (path, image_dir or os.path.join(root, full))
        self._cache: dict[str, Any] = {}

    def _load(self, split: str) -> dict:
        if split not in self._cache:
            data = load_json(self.files[split][0])
            if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
                raise ValueError(
                    f"{self.files[split][0]} lacks 'images'/'annotations'; is it a COCO instances file?"
                )
            self._cache[split] = data
        return self._cache[split]

    def splits(self) -> list[str]:
        return list(self.files)

    def count(self, split: str) -> int:
        return len(self._load(split)["images"])

    def scenes(self, split: str) -> Iterator[Pending]:
        data = self._load(split)
        anns, cats = _index_instances(data)
        table = {im.get("id"): im for im in data["images"] if isinstance(im, dict)}
        for image_id in [*table, *(i for i in anns if i not in table)]:  # then annotations of unknown images
            yield _coco_scene(
                split, image_id, table.get(image_id), anns.get(image_id, []), cats, self.files[split][1]
            )


class LlavaReader:
    """LLaVA JSON (``[{"id", "image", ...}]``) + a detections file ``{record_id: {boxes, scores, labels}}``
    (:func:`data_pipelines.detections.read_detections`): a scene per record, its detections the objects
    (labels as names; those scoring below ``min_score`` dropped). A list of images uses the first."""

    source = "llava"

    def __init__(
        self,
        src: str,
        detections: str,
        image_dir: str | None = None,
        split: str = "train",
        min_score: float = 0.0,
    ):
        self.src = require_file(src, "LLaVA JSON file", "--src")
        self.detections = require_file(detections, "detections file", "--detections")
        self.image_dir = image_dir or os.path.dirname(os.path.abspath(src))
        self.split, self.min_score = split, min_score

    def splits(self) -> list[str]:
        return [self.split]

    def count(self, split: str) -> int | None:
        return None

    def scenes(self, split: str) -> Iterator[Pending]:
        data, dets, seen = load_json(self.src), read_detections(self.detections), set()
        if not isinstance(data, list):
            raise ValueError(f"{self.src} holds a {type(data).__name__}; LLaVA JSON is a list of records.")
        for index, raw in enumerate(data):
            ex = raw if isinstance(raw, dict) else {}
            rid = str(ex.get("id", f"#{index}"))
            det = dets.get(rid, {"boxes": [], "scores": [], "labels": []})
            objects, skipped = [], collections.Counter()
            for box, score, label in zip(det["boxes"], det["scores"], det["labels"], strict=True):
                if score < self.min_score:
                    skipped["low_score"] += 1
                else:
                    objects.append(Obj(tuple(float(v) for v in box), _text(label)))
            path = ex.get("image")
            path = path[0] if isinstance(path, list) and path else path
            error = None
            if not isinstance(raw, dict):
                error = BadRecord("missing_field", rid, "record is not a JSON object")
            elif rid in seen:
                error = BadRecord("duplicate_id", rid, "an earlier record has this id")
            elif not isinstance(path, str) or not path:
                error = BadRecord("missing_image", rid, f"'image' holds {path!r}, not a file path")
            seen.add(rid)
            load = functools.partial(read_image_file, os.path.join(self.image_dir, str(path)), rid)
            yield Pending(split, rid, load, objects, skipped, error)


class ShapesReader:
    """The synthetic shapes set's scenes (:func:`data_pipelines.shapes.make_record`, their own random
    stream ``multiscale/<split>``): ``num`` in ``train``, ``num_eval`` in ``eval``; names like
    "red circle", with colour and shape attributes."""

    source = "shapes"

    def __init__(
        self,
        num: int = 2000,
        num_eval: int = 200,
        image_size: int = 64,
        seed: int = 0,
        variant: str = "basic",
    ):
        self.sizes = {"train": num, "eval": num_eval}
        self.image_size, self.seed, self.variant = image_size, seed, variant

    def splits(self) -> list[str]:
        return [s for s, n in self.sizes.items() if n > 0]

    def count(self, split: str) -> int:
        return self.sizes[split]

    def scenes(self, split: str) -> Iterator[Pending]:
        for i in range(self.sizes[split]):
            rec = shapes.make_record(
                f"multiscale/{split}", i, seed=self.seed, image_size=self.image_size, variant=self.variant
            )
            rid = f"shapes/{split}/{i}"
            objects = [
                Obj(
                    tuple(float(v) for v in box),
                    label,
                    attributes=dict(zip(("colour", "shape"), label.split())),
                )
                for box, label in zip(rec.boxes, rec.labels, strict=True)
            ]
            yield Pending(split, rid, functools.partial(check_image, rec.image, rid), objects)


Reader = RefCocoReader | CocoReader | LlavaReader | ShapesReader


def make_reader(
    source: str,
    *,
    src: str | None = None,
    image_dir: str | None = None,
    split_by: str | None = None,
    detections: str | None = None,
    split: str = "train",
    num: int = 2000,
    num_eval: int = 200,
    image_size: int = 64,
    seed: int = 0,
) -> Reader:
    """The reader of ``source`` (one of ``SOURCES``) from the build CLI's arguments."""
    if source == "shapes":
        return ShapesReader(num, num_eval, image_size, seed)
    if source not in SOURCES:
        raise ValueError(f"Unknown source {source!r}; use one of {SOURCES}.")
    if not src:
        raise FileNotFoundError(f"--src is required for --source {source}; point it at the source files.")
    if source == "refcoco":
        return RefCocoReader(src, image_dir, split_by)
    if source == "coco":
        return CocoReader(src, image_dir)
    return LlavaReader(src, detections or "", image_dir, split)


# ------------------------------------------------------------------------------------------------
# Builder
# ------------------------------------------------------------------------------------------------
class MultiscaleBuilder(ConverterBuilder, skip_registration=True):
    """One config (``CONFIGS``) of a source's scenes -> ``data_dir/multiscale_<source>/<config>``; boxes
    written by ``codec``. ``summary()`` adds each split's object accounting (``objects``)."""

    def __init__(
        self,
        *,
        reader: Reader,
        config: str,
        codec: BoxCodec | None = None,
        options: Options | None = None,
        **kwargs,
    ):
        if config not in CONFIGS:
            raise ValueError(f"Unknown config {config!r}; use one of {CONFIGS}.")
        self.name = f"multiscale_{reader.source}"  # instance attribute: one builder class for every source
        self.reader, self.stage, self.codec = reader, config, codec or BoxCodec()
        self.options = options or Options()
        self.objects: dict[str, collections.Counter] = {}
        self._lock = threading.Lock()
        super().__init__(config=config, box_codec=self.codec, **kwargs)

    def _split_names(self):
        return self.reader.splits()

    def _count(self, split):
        return self.reader.count(split)

    def _items(self, split):
        return self.reader.scenes(split)

    def _scene(self, item: Pending, data: bytes, counts: collections.Counter) -> Scene:
        """Check every object against the image (dropped ones counted in ``counts`` by reason) and keep
        the ``max_objects`` largest, referred ones first (``local``: at most ``max_crops``)."""
        width, height = images.size(data)
        good = []
        for o in item.objects:
            reason = box_problem(o.box, width, height, self.options.min_side) or ("" if o.name else "no_name")
            if reason:
                counts[reason] += 1
            else:
                good.append(dataclasses.replace(o, box=clip_box(o.box, width, height)))
        cap = self.options.max_objects
        cap = min(cap, self.options.max_crops) if self.stage == "local" else cap
        ranked = sorted(range(len(good)), key=lambda i: (not good[i].expressions, -good[i].area, i))
        kept, dropped = sorted(ranked[:cap]), ranked[cap:]
        counts["over_max_objects"] += len(dropped)
        omitted = item.omitted + tuple(good[i].name for i in dropped)
        return Scene(item.id, data, width, height, [good[i] for i in kept], omitted)

    def _safe_convert(self, item: Pending) -> Record | BadRecord:
        """The scene's record, or why it is skipped; its objects counted (used or skipped by reason)."""
        counts = collections.Counter(item.skipped)
        result: Record | BadRecord
        try:
            if item.error is not None:
                raise item.error
            scene = self._scene(item, item.load(), counts)
        except BadRecord as e:  # the scene or its image: no object was looked at
            counts["record_skipped"] += len(item.objects)
            result = e
        else:
            try:
                if not scene.objects:
                    raise BadRecord("no_objects", item.id, f"none of {len(item.objects)} objects is usable")
                result = schema.validate(make_record(scene, self.stage, self.codec, self.options))
                counts["used"] += len(scene.objects)
            except BadRecord as e:
                counts["record_skipped"] += len(scene.objects)
                result = e
        with self._lock:
            self.objects.setdefault(item.split, collections.Counter()).update(counts)
        return result

    def summary(self) -> dict[str, dict[str, Any]]:
        out = super().summary()
        for split, s in out.items():
            c = collections.Counter(self.objects.get(split, {}))
            used = c.pop("used", 0)
            skipped = {k: v for k, v in sorted(c.items()) if v}
            s["objects"] = {"read": used + sum(skipped.values()), "used": used, "skipped": skipped}
        return out


def format_objects(name: str, summary: Mapping[str, Mapping[str, Any]]) -> str:
    """The object accounting of a ``MultiscaleBuilder`` summary, one line per split."""
    lines = [f"{name} objects: {'split':<10} {'read':>9} {'used':>9} {'skipped':>9}  reasons"]
    for split, s in summary.items():
        o = s["objects"]
        reasons = ", ".join(f"{k}={v}" for k, v in o["skipped"].items()) or "-"
        lines.append(
            f"{' ' * len(name)}          {split:<10} {o['read']:>9} {o['used']:>9} "
            f"{sum(o['skipped'].values()):>9}  {reasons}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The shapes source's tokenizer and build (for demos)
# ------------------------------------------------------------------------------------------------
def template_words() -> list[str]:
    """The words of every question / answer template here (the shapes tokenizer lacks some)."""
    texts = [*QUESTIONS.values(), *ANSWERS.values(), *ORDINALS, *YES_NO, *shapes.ARTICLES]
    texts += [p for row in shapes.POSITIONS for p in row] + ["object", "objects"]
    return sorted({w for t in texts for w in re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", " ", t))})


def write_tokenizer(path: str) -> str:
    """The shapes word-level tokenizer (same ids) with the template words added, written to ``path``."""
    from tokenizers import Tokenizer, models

    shapes.write_tokenizer(path)
    file = os.path.join(path, "tokenizer.json")
    tok = Tokenizer.from_file(file)
    vocab = tok.get_vocab()
    for word in template_words():
        for piece in (word, "\u2581" + word):  # as the shapes vocabulary: with and without the space marker
            vocab.setdefault(piece, len(vocab))
    tok.model = models.WordLevel(vocab, unk_token="<unk>")
    tok.save(file)
    return path


def build_shapes(
    data_dir: str,
    *,
    config: str = "perception",
    num: int = 2000,
    num_eval: int = 200,
    image_size: int = 64,
    seed: int = 0,
    variant: str = "basic",
    options: Options | None = None,
    codec: BoxCodec = shapes.CODEC,
    num_workers: int = 2,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the ``config`` records of shapes scenes and their tokenizer under ``data_dir``.

    Returns ``{"name": "multiscale_shapes/<config>", "data_dir", "tokenizer": <dir>, "summary", "seconds"}``
    (``name`` for ``input.sources``, ``tokenizer`` for ``input.tokenizer``).
    """
    t0 = time.perf_counter()
    options = dataclasses.replace(options or Options(), seed=seed)
    reader = ShapesReader(num, num_eval, image_size, seed, variant)
    builder = MultiscaleBuilder(
        reader=reader,
        config=config,
        codec=codec,
        options=options,
        data_dir=data_dir,
        num_workers=num_workers,
        progress=progress,
    )
    summary = builder.build()
    return {
        "name": f"{builder.name}/{config}",
        "data_dir": data_dir,
        "tokenizer": write_tokenizer(os.path.join(data_dir, TOKENIZER_DIR)),
        "summary": summary,
        "seconds": time.perf_counter() - t0,
    }


STAMP = "multiscale_shapes_build.json"  # the arguments of ensure_shapes' last build


def ensure_shapes(data_dir: str, *, num: int = 2000, num_eval: int = 200, image_size: int = 64, seed: int = 0,
                  progress: bool = False, **options: Any) -> dict[str, Any]:  # fmt: skip
    """The three configs of shapes scenes and their tokenizer under ``data_dir``, built unless a build with
    the same arguments is there. ``options``: :class:`Options` fields. Returns ``{"names": {config: name},
    "tokenizer", "built"}``."""
    params = dict(num=num, num_eval=num_eval, image_size=image_size, seed=seed, options=options)
    stamp = os.path.join(data_dir, STAMP)
    names = {config: f"multiscale_shapes/{config}" for config in CONFIGS}
    tokenizer = os.path.join(data_dir, TOKENIZER_DIR)
    if os.path.exists(stamp) and os.path.exists(os.path.join(tokenizer, "tokenizer.json")):
        with open(stamp) as f:
            if json.load(f) == params:
                return {"names": names, "tokenizer": tokenizer, "built": False}
    opts = Options(**options)
    for config in CONFIGS:
        out = build_shapes(data_dir, config=config, num=num, num_eval=num_eval, image_size=image_size,
                           seed=seed, options=opts, progress=progress)  # fmt: skip
        names[config], tokenizer = out["name"], out["tokenizer"]
    with open(stamp, "w") as f:
        json.dump(params, f)
    return {"names": names, "tokenizer": tokenizer, "built": True}
