"""grain input pipeline: ArrayRecord sources -> per-host, shuffled, mixed, preprocessed batches.

Order of operations (all on ``grain.MapDataset``, so batch ``k`` is a pure function of
``(seed, k)`` whatever the worker count)::

    per source: data_source -> shuffle(seed) -> repeat
    mix(sources, weights) -> global batch k = records [k * batch_size, (k + 1) * batch_size); this
      host reads only its rows of it (host i of n: the i-th of n equal slices), each preprocessed
      (template, tokenize, mask, pad; decode, resize; optional float normalization), a bad record
      replaced by a deterministic substitute and counted by reason -> to_iter_dataset(ReadOptions)
      -> mp_prefetch(num_workers)

``InputIterator`` (a ``grain.DatasetIterator``) tracks the next batch index and the skip counters,
so ``get_state``/``set_state`` (and grain's orbax ``CheckpointHandler``) resume exactly: a restored
iterator yields the same batches as an uninterrupted one, with any worker count. The global batches do
not depend on the number of hosts, so a run may resume on a different number of processes (the state
is the global batch index).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from data_pipelines import images, schema
from data_pipelines.schema import REASON_INDEX, SKIP_REASONS, BadRecord
from data_pipelines.text import (
    QFormerTokenizer,
    Tokenizer,
    load_qformer_tokenizer,
    load_tokenizer,
    pack_example,
)
from pargo_jax.configs import check_keys, field_names

OVERLONG = ("truncate", "skip")
MAX_ATTEMPTS = 64  # consecutive bad records tolerated before the pipeline gives up

__all__ = [
    "InputConfig",
    "SourceConfig",
    "InputIterator",
    "make_iterator",
    "make_dataset",
    "load_tokenizer",
]


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One built dataset split: ``name`` as built under ``data_dir`` (e.g. "shapes", "llava/pretrain")."""

    name: str
    data_dir: str
    split: str
    weight: float = 1.0
    task: str | None = None  # optional tag; make_iterator(task=...) keeps only sources with this tag


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """The ``input`` config section. Build with ``InputConfig.from_config(cfg.input)``."""

    sources: tuple[SourceConfig, ...]
    batch_size: int  # global batch; each host gets batch_size // process_count
    tokenizer: str  # dir with tokenizer.json + tokenizer_config.json
    data_dir: str | None = None  # default data_dir for sources that do not set their own
    image_size: int = 336
    resize: str = "letterbox"
    max_len: int = 512
    overlong: str = "truncate"
    num_workers: int = 0
    prefetch: int = 2
    read_threads: int = 1
    strict: bool = False
    mean: tuple[float, float, float] = images.CLIP_MEAN
    std: tuple[float, float, float] = images.CLIP_STD
    caption_prompt: str = ""  # optional instruction after <image> for caption records
    normalize: bool = False  # True: `image` is float32 normalized on the host; False: uint8 pixels
    # that the model normalizes on device with the same mean/std (4x less host work and transfer)
    shuffle: bool = True
    repeat: bool = True  # False: one pass (eval); the iterator then ends
    detections: str = ""  # MG-LLaVA: JSON {record_id: {boxes, scores, labels}}; "": the records' own boxes
    jpeg_draft: bool = False  # True: decode JPEGs at a reduced scale (PIL draft, both sides >= image_size):
    # faster, but not the pixels the references feed (a 700 px JPEG is decoded at 350 and upscaled)
    qformer_tokenizer: str = ""  # BLIP-2 / X-Former stage 1: the Q-Former's tokenizer dir ("" = off; see
    # text.prepare_qformer_tokenizer); batches then hold qformer_ids / qformer_mask ([CLS] caption [SEP] pad)
    qformer_max_len: int = 32  # LAVIS's max_txt_len
    max_images: int = 1  # images a sample may have; > 1: `image` is (B, max_images, H, W, 3) + `image_mask`
    packing: bool = False  # pack several samples into each row of max_len tokens (see _PackedBatches)
    max_images_per_row: int = 4  # packing: images a row may hold (a sample that does not fit opens the next)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | InputConfig) -> InputConfig:
        """From a ConfigDict/dict; unknown keys and bad values fail with a sentence naming them."""
        if isinstance(cfg, InputConfig):
            return cfg
        d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        check_keys(d, field_names(cls), "config.input")
        missing = sorted(k for k in ("sources", "batch_size", "tokenizer") if k not in d)
        if missing:
            raise ValueError(f"input config is missing {missing}; set them in the config's input section.")
        sources = []
        for s in d["sources"]:
            s = dict(s.to_dict() if hasattr(s, "to_dict") else s)
            check_keys(s, field_names(SourceConfig), f"input source {s}")
            if d.get("data_dir") and not s.get("data_dir"):
                s["data_dir"] = d["data_dir"]
            if not {"name", "data_dir", "split"} <= set(s):
                raise ValueError(
                    f"Source {s} needs name, data_dir and split; add the missing ones (data_dir may also be "
                    "set once for all sources as input.data_dir)."
                )
            sources.append(SourceConfig(**s))
        d["sources"] = tuple(sources)
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(float(x) for x in d[k])
        out = cls(**d)
        out.validate()
        return out

    @property
    def image_slots(self) -> int:
        """Image slots per row: 0 for today's one image per row ``(B, H, W, 3)``, else ``I`` of
        ``(B, I, H, W, 3)`` (``max_images_per_row`` when packing, else ``max_images``)."""
        if self.packing:
            return self.max_images_per_row
        return self.max_images if self.max_images > 1 else 0

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("input.sources is empty; add at least one dict(name=, data_dir=, split=).")
        if self.resize not in images.RESIZE_MODES:
            raise ValueError(f"input.resize={self.resize!r} is unknown; use one of {images.RESIZE_MODES}.")
        if self.overlong not in OVERLONG:
            raise ValueError(f"input.overlong={self.overlong!r} is unknown; use one of {OVERLONG}.")
        if self.batch_size <= 0 or self.max_len <= 1 or self.image_size <= 0:
            raise ValueError(
                f"input.batch_size={self.batch_size}, max_len={self.max_len}, image_size={self.image_size} "
                "must be positive (max_len >= 2)."
            )
        if self.qformer_max_len < 3:
            raise ValueError(
                f"input.qformer_max_len={self.qformer_max_len} leaves no caption token between [CLS] and "
                "[SEP]; use >= 3 (LAVIS: 32)."
            )
        if self.max_images < 1 or (self.packing and self.max_images_per_row < self.max_images):
            raise ValueError(
                f"input.max_images={self.max_images} must be >= 1, and with packing input.max_images_per_row="
                f"{self.max_images_per_row} at least max_images (a sample must fit an empty row)."
            )
        if self.packing and not self.repeat:
            raise ValueError("input.packing packs the training stream: it needs input.repeat=True.")
        if self.packing and self.qformer_tokenizer:
            raise ValueError(
                "input.packing is for the LLM objective; BLIP-2's stage 1 reads a caption per row."
            )
        for s in self.sources:
            if s.weight <= 0:
                raise ValueError(f"Source {s.name}/{s.split} has weight {s.weight}; weights must be > 0.")


class Preprocessor:
    """Stored example -> training arrays, in two stages; each raises ``BadRecord`` if unusable.
    ``num_boxes`` > 0 (MG-LLaVA): also ``boxes`` (num_boxes, 4) in input pixels, the slots of absent
    boxes masked out of attention. ``qformer`` (BLIP-2 stage 1): also ``qformer_ids`` / ``qformer_mask``
    (``qformer_max_len``,), the caption in the Q-Former's tokens."""

    def __init__(
        self,
        cfg: InputConfig,
        tokenizer: Tokenizer,
        num_image_tokens: int,
        num_boxes: int = 0,
        qformer: QFormerTokenizer | None = None,
    ):
        self.cfg, self.tok, self.num_image_tokens, self.num_boxes = (
            cfg,
            tokenizer,
            num_image_tokens,
            num_boxes,
        )
        self.qformer = qformer
        self.detections = None
        if num_boxes and cfg.detections:
            from data_pipelines.detections import read_detections

            self.detections = read_detections(cfg.detections)

    def text(self, ex: Mapping[str, Any]) -> tuple[schema.Record, dict[str, Any]]:
        """Parse and validate the record; render, tokenize, mask and pad its conversation."""
        rec = schema.from_example(ex)
        if len(rec.images) > self.cfg.max_images:
            raise schema.BadRecord(
                "too_many_images", rec.id, f"{len(rec.images)} images > max_images {self.cfg.max_images}"
            )
        out = pack_example(
            self.tok,
            rec.messages(self.cfg.caption_prompt),
            num_image_tokens=self.num_image_tokens,
            max_len=self.cfg.max_len,
            overlong=self.cfg.overlong,
            record_id=rec.id,
            num_images=len(rec.images),
        )
        out["record_id"] = rec.id
        if self.qformer is not None:  # after the LLM's checks, so their skip counts stay as they were
            out["qformer_ids"], out["qformer_mask"] = self.qformer_caption(rec)
        if self.num_boxes:
            self.boxes(rec, out)
        return rec, out

    def qformer_caption(self, rec: schema.Record) -> tuple[np.ndarray, np.ndarray]:
        """The caption in the Q-Former's tokens. BLIP-2's stage 1 trains on captions; a conversation record
        gives its first assistant turn (the answer about the image) instead. ``no_caption`` when it has no
        text (or no token of it)."""
        text = rec.caption
        if rec.conversation:
            text = next((t.text for t in rec.conversation if t.role == "assistant"), "")
        if not text.strip() or not self.qformer.text_ids(text):
            raise schema.BadRecord("no_caption", rec.id, "no caption text for the Q-Former")
        return self.qformer.encode(text, self.cfg.qformer_max_len)

    def image(self, rec: schema.Record) -> np.ndarray:
        """Decode + resize every image of the record: uint8 (n, S, S, 3) pixels (normalized per batch, in
        ``Collate``); n = 0 for a text-only record."""
        cfg, size = self.cfg, self.cfg.image_size
        loaded = [
            images.to_array(images.load(data, size, cfg.resize, cfg.mean, rec.id, jpeg_draft=cfg.jpeg_draft))
            for data in rec.images
        ]
        return np.stack(loaded) if loaded else np.zeros((0, size, size, 3), np.uint8)

    def __call__(self, ex: Mapping[str, Any]) -> dict[str, Any]:
        rec, out = self.text(ex)
        out["image"] = self.image(rec)
        return out

    def boxes(self, rec: schema.Record, out: dict[str, Any]) -> None:
        """Adds ``boxes`` (the detections file's for this record, else its own) and masks the empty
        object-token slots."""
        from data_pipelines import detections

        det = self.detections.get(rec.id) if self.detections is not None else None
        boxes, scores, labels = (
            (det["boxes"], det["scores"], det["labels"]) if det else (rec.boxes, None, None)
        )
        width, height = images.decode(rec.image, rec.id).size if len(boxes) else (1, 1)
        out["boxes"], real = detections.prepare_boxes(
            boxes, width, height, self.cfg.image_size, self.cfg.resize, self.num_boxes, scores, labels
        )
        detections.mask_box_slots(out["input_ids"], out["attention_mask"], real, self.num_boxes,
                                  self.tok.image_token_id)  # fmt: skip


def _substitute(seed: int, index: int, attempt: int) -> int:
    """Deterministic stand-in index for a bad record (a pure function of seed, index, attempt)."""
    h = hashlib.blake2b(f"{seed}/{index}/{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % (1 << 30) + 1


class _HostBatches(grain.MapDataset):
    """This host's ``B`` rows of each global batch of ``G`` rows read from ``parent``: what the one-sample
    and the packed kind share."""

    def __init__(self, parent: grain.MapDataset, fn: Preprocessor, rows: tuple[int, int, int], collate,
                 strict: bool):  # fmt: skip
        super().__init__(parent)
        self._fn, self._collate, self._strict = fn, collate, strict
        self._global, self._offset, self._batch = rows  # (G, offset, B)

    def _attempt(self, stage, arg, skipped: np.ndarray):
        """``stage(arg)``, or None for a bad record, counted in ``skipped`` (strict mode: raised)."""
        try:
            return stage(arg)
        except BadRecord as e:
            if self._strict:
                raise
            skipped[REASON_INDEX[e.reason]] += 1
            return None


class _PreprocessedBatches(_HostBatches):
    """Element ``k`` = the collated, preprocessed records ``[k * G + offset, k * G + offset + B)`` of
    ``parent``: this host's ``B`` rows of global batch ``k`` (``G`` records).

    A bad record is replaced by another, deterministic one (a pure function of seed, position and
    attempt) and counted: each batch carries ``_skipped``, counts per ``SKIP_REASONS``. In strict
    mode the first bad record raises instead. A batch runs its text stage for all its records, then
    its image stage: grouping the small Python steps apart from the large pixel loops keeps both
    cache-warm (measured ~0.5 ms/image less than record-by-record).
    """

    def __init__(self, parent, fn, rows, collate, seed: int, strict: bool):
        super().__init__(parent, fn, rows, collate, strict)
        self._seed = seed

    def __len__(self) -> int:
        return len(self._parent) // self._global

    def __str__(self) -> str:
        return f"PreprocessedBatches(batch_size={self._batch})"

    def _replacement(self, index: int, skipped: np.ndarray) -> dict[str, Any]:
        length = len(self._parent)
        for attempt in range(1, MAX_ATTEMPTS):
            j = (index + _substitute(self._seed, index, attempt)) % length
            out = self._attempt(self._fn, self._parent[j], skipped)
            if out is not None:
                return out
        reasons = {r: int(c) for r, c in zip(SKIP_REASONS, skipped, strict=True) if c}
        raise RuntimeError(
            f"{MAX_ATTEMPTS} records in a row were unusable around index {index} ({reasons}); "
            "check the dataset (python -m data_pipelines.build prints a per-reason summary)."
        )

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        skipped = np.zeros(len(SKIP_REASONS), np.int64)
        start = index * self._global + self._offset
        first = range(start, start + self._batch)
        records = self._parent._getitems(list(first))  # one batched read through grain's layers
        texts = [self._attempt(self._fn.text, ex, skipped) for ex in records]
        pixels = [None if t is None else self._attempt(self._fn.image, t[0], skipped) for t in texts]
        examples = [
            self._replacement(i, skipped) if img is None else dict(t[1], image=img)
            for i, t, img in zip(first, texts, pixels, strict=True)
        ]
        batch = self._collate(examples)
        batch["_skipped"] = skipped
        return batch


class _PackedBatches(_HostBatches):
    """Element ``k`` = this host's rows of packed global batch ``k`` of the record stream ``parent`` read
    from record ``start`` on.

    Global batch ``k`` packs records ``[c_k, c_{k+1})`` in order, first fit, into ``G`` rows of ``max_len``
    tokens and at most ``max_images_per_row`` images each; the first record that fits no row opens batch
    ``k + 1``. A row is its samples' unpadded arrays one after another, then padding; ``segment_ids``
    numbers them 1, 2, ... (0 = padding). So batch ``k`` is a pure function of the records' lengths and
    image counts in the seed's order, whatever the number of hosts: every host plans every batch (the
    text stage, cheap) and decodes the images of its own rows only. Cursors are planned in order under a
    lock (grain's read threads ask out of order) and kept; a plan is cached for a while and re-planned
    from its cursor if asked again. A batch carries ``_cursor`` (``c_{k+1}``) for the iterator's state.

    A record that fails its text stage is skipped and counted in the batch whose plan read it; one whose
    image fails to decode is left out of its row and counted by the host of that row.
    """

    def __init__(self, parent, fn, rows, collate, strict: bool, start: int = 0):
        super().__init__(parent, fn, rows, collate, strict)
        self._start = start
        self._setup()

    def _setup(self):
        self._lock = threading.Lock()
        self._cursors = [self._start]  # _cursors[k]: first record of batch k
        self._plans: collections.OrderedDict = collections.OrderedDict()
        self._last_text: tuple[int, Any] = (-1, None)  # the record that opened the next batch

    def __getstate__(self):  # picklable for grain worker processes: each plans from the cursor again
        state = dict(self.__dict__)
        for key in ("_lock", "_cursors", "_plans", "_last_text"):
            state.pop(key)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._setup()

    def __len__(self) -> int:
        return len(self._parent) - self._start  # a bound: every batch reads at least one record

    def __str__(self) -> str:
        return f"PackedBatches(rows={self._batch}, start={self._start})"

    def from_cursor(self, start: int) -> _PackedBatches:
        """The same stream read from record ``start`` (the iterator's resume point)."""
        return _PackedBatches(
            self._parent,
            self._fn,
            (self._global, self._offset, self._batch),
            self._collate,
            self._strict,
            start,
        )

    def _text(self, index: int, skipped: np.ndarray):
        """Record ``index``'s text stage (None: bad, counted); the record that opened the next batch is
        kept from the last plan."""
        if self._last_text[0] == index:
            return self._last_text[1]
        return self._attempt(self._fn.text, self._parent[index], skipped)

    def _plan(self, start: int) -> tuple[list[list[tuple]], np.ndarray, int]:
        """(rows of (record, text arrays), skip counts, next cursor) of the batch starting at ``start``."""
        cfg = self._fn.cfg
        rows: list[list[tuple]] = [[] for _ in range(self._global)]
        tokens, pictures = [0] * self._global, [0] * self._global
        skipped, bad, index = np.zeros(len(SKIP_REASONS), np.int64), 0, start
        while True:
            res = self._text(index, skipped)
            if res is None:
                bad, index = bad + 1, index + 1
                if bad >= MAX_ATTEMPTS:
                    raise RuntimeError(
                        f"{MAX_ATTEMPTS} records in a row were unusable before record {index}; check "
                        "the dataset (python -m data_pipelines.build prints a summary)."
                    )
                continue
            bad, (rec, out) = 0, res
            length, count = out["length"], len(rec.images)
            fits = (
                r
                for r in range(self._global)
                if tokens[r] + length <= cfg.max_len and pictures[r] + count <= cfg.max_images_per_row
            )
            row = next(fits, None)
            if row is None:
                self._last_text = (index, res)
                return rows, skipped, index
            rows[row].append((rec, out))
            tokens[row], pictures[row], index = tokens[row] + length, pictures[row] + count, index + 1

    def plan(self, k: int) -> tuple[list[list[tuple]], np.ndarray, int]:
        """The plan of batch ``k`` (see :meth:`_plan`), planning the batches before it first if needed."""
        with self._lock:
            while len(self._cursors) <= k + 1:
                n = len(self._cursors) - 1
                plan = self._plan(self._cursors[n])
                self._cursors.append(plan[2])
                self._plans[n] = plan
                while len(self._plans) > 64:
                    self._plans.popitem(last=False)
            plan = self._plans.pop(k, None)
            return plan if plan is not None else self._plan(self._cursors[k])

    def _row(self, samples: Sequence[tuple], skipped: np.ndarray) -> dict[str, Any]:
        """One packed row: the samples' arrays one after another (a sample whose image fails is left out)."""
        cfg, pad = self._fn.cfg, self._fn.tok.pad_id
        row = {
            key: np.zeros(cfg.max_len, np.float32 if key == "loss_mask" else np.int32)
            for key in ("input_ids", "targets", "loss_mask", "attention_mask", "segment_ids")
        }
        row["input_ids"][:], row["targets"][:] = pad, pad
        pixels, boxes, ids, truncated, pos = [], [], [], 0, 0
        for rec, out in samples:
            image = self._attempt(self._fn.image, rec, skipped)
            if image is None:
                continue
            n = out["length"]
            for key in ("input_ids", "targets", "loss_mask", "attention_mask"):
                row[key][pos : pos + n] = out[key][:n]
            row["segment_ids"][pos : pos + n] = len(ids) + 1
            pixels.append(image)
            if "boxes" in out and len(image):
                boxes.append(np.asarray(out["boxes"], np.float32)[None])
            ids.append(rec.id)
            truncated, pos = truncated + int(out["truncated"]), pos + n
        size = cfg.image_size
        row["image"] = np.concatenate(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)
        if self._fn.num_boxes:
            row["boxes"] = (
                np.concatenate(boxes) if boxes else np.zeros((0, self._fn.num_boxes, 4), np.float32)
            )
        row["record_id"], row["truncated"] = ",".join(ids), truncated
        return row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        rows, skipped, cursor = self.plan(index)
        skipped = skipped.copy()
        mine = rows[self._offset : self._offset + self._batch]
        batch = self._collate([self._row(samples, skipped) for samples in mine])
        batch["_skipped"], batch["_cursor"] = skipped, np.int64(cursor)
        return batch


class Collate:
    """Stack examples into a batch and normalize the uint8 images in one pass over the batch.

    An example's ``image`` is (n, S, S, 3). ``slots`` 0: the batch's ``image`` is (B, S, S, 3), the
    first image of each example (black for a text-only one, whose sequence has no image token, so the
    tower's output is unused). ``slots`` I > 0: (B, I, S, S, 3), each row's images in the first slots,
    the rest black, and ``image_mask`` int32 (B, I); ``boxes`` (per image) likewise (B, I, M, 4). Record
    ids become a str array."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], normalize: bool = True, slots: int = 0):
        self.normalize = images.Normalizer(mean, std) if normalize else None
        self.slots = slots

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        skip = ("record_id", "image", "truncated", "length", "boxes")
        batch = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k not in skip}
        batch["_truncated"] = np.int64(sum(int(e.get("truncated", 0)) for e in examples))
        counts = [len(e["image"]) for e in examples]
        slots = self.slots or 1
        pixels = np.zeros((len(examples), slots, *examples[0]["image"].shape[1:]), np.uint8)
        for row, (e, n) in enumerate(zip(examples, counts, strict=True)):
            pixels[row, : min(n, slots)] = e["image"][:slots]
        if "boxes" in examples[0]:
            boxes = [np.asarray(e["boxes"], np.float32).reshape(-1, *np.shape(examples[0]["boxes"])[-2:])
                     for e in examples]  # fmt: skip
            batch["boxes"] = np.zeros((len(examples), slots, *boxes[0].shape[1:]), np.float32)
            for row, b in enumerate(boxes):
                batch["boxes"][row, : len(b)] = b
            if not self.slots:
                batch["boxes"] = batch["boxes"][:, 0]
        if self.normalize is not None:
            b, i, h, w, c = pixels.shape
            pixels = self.normalize(pixels.reshape(b * i * h, w, c)).reshape(b, i, h, w, c)
        if self.slots:
            batch["image"] = pixels
            batch["image_mask"] = (np.arange(slots)[None] < np.asarray(counts)[:, None]).astype(np.int32)
        else:
            batch["image"] = pixels[:, 0]
        batch["record_id"] = np.array([e["record_id"] for e in examples])
        return batch


def _sources(cfg: InputConfig, task: str | None) -> tuple[SourceConfig, ...]:
    if task is None:
        return cfg.sources
    chosen = tuple(s for s in cfg.sources if (s.task or s.split) == task)
    if not chosen:
        tags = sorted({s.task or s.split for s in cfg.sources})
        raise ValueError(f"No input source has task {task!r}; sources are tagged {tags}.")
    return chosen


def make_dataset(
    input_cfg: Mapping[str, Any] | InputConfig,
    *,
    num_image_tokens: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    task: str | None = None,
    num_boxes: int = 0,
) -> grain.MapDataset:
    """The ``MapDataset`` whose element ``k`` is this host's rows of global batch ``k`` (before
    ``_skipped`` removal)."""
    from data_pipelines.builders import open_source

    cfg = InputConfig.from_config(input_cfg)
    if cfg.batch_size % process_count:
        raise ValueError(
            f"input.batch_size={cfg.batch_size} is not divisible by process_count={process_count}; "
            "use a multiple of the number of hosts."
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is outside [0, {process_count}).")
    if num_boxes and cfg.max_images > 1:
        raise ValueError(
            f"input.max_images={cfg.max_images}: MG-LLaVA's object tokens read one image per sample; use "
            "input.packing to put several samples (one image each) in a row."
        )
    tok = load_tokenizer(cfg.tokenizer)
    qformer = load_qformer_tokenizer(cfg.qformer_tokenizer) if cfg.qformer_tokenizer else None
    host_batch = cfg.batch_size // process_count
    datasets, weights = [], []
    for i, s in enumerate(_sources(cfg, task)):
        ds = grain.MapDataset.source(open_source(s.data_dir, s.name, s.split))
        if len(ds) == 0:
            raise ValueError(f"Source {s.name}/{s.split} has no records; add data.")
        if cfg.shuffle:
            ds = ds.shuffle(seed=_derive(seed, "shuffle", i))
        if cfg.repeat:
            ds = ds.repeat(None)
        datasets.append(ds)
        weights.append(s.weight)
    ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
    preprocess = Preprocessor(cfg, tok, num_image_tokens, num_boxes, qformer)
    rows = (cfg.batch_size, process_index * host_batch, host_batch)
    collate = Collate(cfg.mean, cfg.std, cfg.normalize, cfg.image_slots)
    if cfg.packing:
        return _PackedBatches(ds, preprocess, rows, collate, cfg.strict)
    return _PreprocessedBatches(ds, preprocess, rows, collate, _derive(seed, "skip"), cfg.strict)


def _derive(seed: int, *parts: Any) -> int:
    h = hashlib.blake2b("/".join(map(str, (seed, *parts))).encode(), digest_size=4).digest()
    return int.from_bytes(h, "little")


class InputIterator(grain.DatasetIterator):
    """Checkpointable iterator over host batches; state = next batch index + skip counters."""

    def __init__(self, batches: grain.MapDataset, cfg: InputConfig):
        super().__init__()
        self._batches, self._cfg = batches, cfg
        self._next = 0
        self._skipped: collections.Counter = collections.Counter()
        self._truncated = 0
        self._cursor = 0  # packing: the first record of the next batch
        self._it = None

    def _start(self):
        packed = isinstance(self._batches, _PackedBatches)
        ds = self._batches.from_cursor(self._cursor) if packed else self._batches[self._next :]
        read = grain.ReadOptions(
            num_threads=max(1, self._cfg.read_threads), prefetch_buffer_size=self._cfg.prefetch
        )
        it_ds = ds.to_iter_dataset(read)
        if self._cfg.num_workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain reads absl flags; outside absl.app use defaults
                flags.FLAGS.mark_as_parsed()
            it_ds = it_ds.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self._cfg.num_workers, per_worker_buffer_size=max(1, self._cfg.prefetch)
                )
            )
        self._it = iter(it_ds)

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._start()
        batch = next(self._it)
        self._next += 1
        self._truncated += int(batch.pop("_truncated"))
        if "_cursor" in batch:
            self._cursor = int(batch.pop("_cursor"))
        for reason, count in zip(SKIP_REASONS, batch.pop("_skipped"), strict=True):
            if count:
                self._skipped[reason] += int(count)
        return batch

    def get_state(self) -> dict[str, Any]:
        state = {"next_batch": self._next, "skipped": dict(self._skipped), "truncated": self._truncated}
        if isinstance(self._batches, _PackedBatches):
            state["next_record"] = self._cursor
        return state

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.close_workers()
        self._next = int(state["next_batch"])
        self._skipped = collections.Counter({k: int(v) for k, v in state.get("skipped", {}).items()})
        self._truncated = int(state.get("truncated", 0))
        if isinstance(self._batches, _PackedBatches):
            if "next_record" not in state:
                raise ValueError(
                    "This checkpoint's data state has no next_record: it was not written with "
                    "input.packing; resume it with the packing setting it was trained with."
                )
            self._cursor = int(state["next_record"])

    def stats(self) -> dict[str, int]:
        """Counters so far, as metrics: ``{"skipped/<reason>": n, ..., "skipped/total": n, "truncated": n}``
        (``truncated``: records kept with their tokens past ``max_len`` cut)."""
        out = {f"skipped/{r}": int(self._skipped.get(r, 0)) for r in SKIP_REASONS}
        out["skipped/total"] = int(sum(self._skipped.values()))
        out["truncated"] = self._truncated
        return out

    def close_workers(self) -> None:
        """Stop prefetch threads / worker processes (restarted lazily on the next ``next``)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()

    def close(self) -> None:
        self.close_workers()
        super().close()


def make_iterator(
    input_cfg: Mapping[str, Any] | InputConfig,
    *,
    num_image_tokens: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    task: str | None = None,
    num_boxes: int = 0,
) -> InputIterator:
    """Checkpointable iterator of this host's batches (dicts of numpy arrays).

    Keys: ``image`` uint8 (B, H, W, 3) pixels (f32 normalized with ``mean``/``std`` if ``normalize=True``);
    ``input_ids`` i32 (B, T) with the image placeholder expanded to ``num_image_tokens`` image-token
    ids; ``targets`` i32 (B, T) next tokens (last = pad); ``loss_mask`` f32 (B, T), 1 where the
    target is an answer token; ``attention_mask`` i32 (B, T); ``record_id`` str (B,).
    B = batch_size // process_count (this host's rows of the global batch), T = max_len. ``task`` keeps only
    sources tagged ``task`` (a source's tag is its ``task`` field, else its split). ``num_boxes`` > 0
    (MG-LLaVA): ``boxes`` f32 (B, num_boxes, 4) too (see :class:`Preprocessor`). ``input.qformer_tokenizer``
    set (BLIP-2 stage 1): ``qformer_ids`` / ``qformer_mask`` i32 (B, qformer_max_len), the caption as
    ``[CLS] text [SEP] [PAD]...`` in the Q-Former's tokens.
    Skip counts: ``iterator.stats()``.
    """
    cfg = InputConfig.from_config(input_cfg)
    batches = make_dataset(
        cfg,
        num_image_tokens=num_image_tokens,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        task=task,
        num_boxes=num_boxes,
    )
    return InputIterator(batches, cfg)
