"""The one record schema shared by every source, and the reasons a record can be skipped.

A record is: ``id``, ``image`` (encoded PNG/JPEG/WebP bytes; ``more_images`` for a second, third ...
image), and EITHER a ``caption`` OR a ``conversation`` (turns of ``role`` in {system, user, assistant}
and ``text``; one image placeholder ``<image>`` per image, in user turns: the k-th placeholder stands
for the k-th image, and a one-image record has its placeholder in the first user turn), plus optional
``boxes`` (pixels of the original (first) image, ``[x1, y1, x2, y2]``) with one ``label`` each.

On disk (TFDS ArrayRecord) strings are stored as UTF-8 ``Text`` features and the image as a scalar
bytes ``Tensor``, so neither writing nor reading needs TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")

# Every reason a record may be skipped, by the converters or by the input pipeline. Order is fixed:
# per-example skip counts travel as int vectors indexed by this tuple.
SKIP_REASONS: tuple[str, ...] = (
    "zero_byte_image",  # image bytes are empty
    "bad_image",  # image bytes do not decode (corrupt, truncated, unknown format)
    "missing_image",  # no image key / image file not found
    "missing_field",  # a required field (caption or conversation, turn text/role) is absent
    "invalid_utf8",  # a text field is not valid UTF-8
    "empty_conversation",  # no turns, or no assistant turn with text
    "bad_role",  # a role outside system/user/assistant, or turns not starting with a user turn
    "no_image_placeholder",  # no <image> in the conversation
    "misplaced_image_placeholder",  # <image> more than once, or not in the first user turn
    "empty_caption",  # caption is empty or only whitespace
    "bad_boxes",  # boxes malformed or not matching labels
    "too_long",  # tokenized length exceeds max_len (overlong="skip", or image would be cut)
    "no_answer_tokens",  # after truncation no answer token is left to train on
    "template_error",  # the tokenizer's chat template rejected the conversation (raise_exception)
    "truncated_archive",  # a tar/WebDataset shard ends in the middle of a member
    "duplicate_id",  # a converter met this record id before: the first record of an id is kept
    "no_caption",  # input.qformer_tokenizer set: no caption (or first assistant turn) text for the Q-Former
    "image_count_mismatch",  # the number of <image> placeholders differs from the number of images
    "too_many_images",  # more images than input.max_images
    "no_objects",  # a multi-scale alignment scene with no usable object (data_pipelines.multiscale)
)  # new reasons go last: checkpointed iterator states and skip vectors index this order
REASON_INDEX = {r: i for i, r in enumerate(SKIP_REASONS)}


class BadRecord(ValueError):
    """A record that cannot be used; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, record_id: str = "?", detail: str = ""):
        if reason not in REASON_INDEX:
            raise ValueError(f"Unknown skip reason {reason!r}; use one of {SKIP_REASONS}.")
        self.reason, self.record_id, self.detail = reason, record_id, detail
        super().__init__(f"record {record_id!r} skipped ({reason}){': ' + detail if detail else ''}")


@dataclasses.dataclass
class Turn:
    role: str
    text: str


@dataclasses.dataclass
class Record:
    """One training example, independent of its source format. ``image == b""`` with a conversation
    that has no ``<image>`` is a text-only example (LLaVA-Instruct has ~40K): it trains the LLM with no
    image tokens. ``more_images``: the images after the first, in placeholder order (multi-image and
    interleaved conversations)."""

    id: str
    image: bytes
    caption: str = ""
    conversation: list[Turn] = dataclasses.field(default_factory=list)
    boxes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: list[str] = dataclasses.field(default_factory=list)
    more_images: list[bytes] = dataclasses.field(default_factory=list)

    @property
    def text_only(self) -> bool:
        return len(self.image) == 0 and not self.more_images

    @property
    def images(self) -> list[bytes]:
        """Every image of the record, in placeholder order ([] for a text-only record)."""
        return [] if self.text_only else [self.image, *self.more_images]

    def messages(self, caption_prompt: str = "") -> list[dict[str, str]]:
        """Chat messages for the template; a caption becomes user ``<image>`` -> assistant caption."""
        if self.conversation:
            return [{"role": t.role, "content": t.text} for t in self.conversation]
        user = IMAGE_PLACEHOLDER + ("\n" + caption_prompt if caption_prompt else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": self.caption}]


def features():
    """The TFDS ``FeaturesDict`` of a record (no TensorFlow needed to write or read it)."""
    import tensorflow_datasets as tfds

    f = tfds.features
    return f.FeaturesDict(
        {
            "id": f.Text(),
            "image": f.Tensor(shape=(), dtype=np.object_),
            "caption": f.Text(),
            "conversation": f.Sequence({"role": f.Text(), "text": f.Text()}),
            "boxes": f.Tensor(shape=(None, 4), dtype=np.float32),
            "labels": f.Sequence(f.Text()),
            "more_images": f.Sequence(f.Tensor(shape=(), dtype=np.object_)),
        }
    )


def to_example(rec: Record) -> dict[str, Any]:
    """Record -> the dict TFDS serializes."""
    return {
        "id": rec.id,
        "image": rec.image,
        "caption": rec.caption,
        "conversation": {
            "role": [t.role for t in rec.conversation],
            "text": [t.text for t in rec.conversation],
        },
        "boxes": np.asarray(rec.boxes, np.float32).reshape(-1, 4),
        "labels": list(rec.labels),
        "more_images": [bytes(b) for b in rec.more_images],
    }


def parse_example(data: bytes) -> dict[str, Any]:
    """A serialized stored example -> the dict ``from_example`` takes (text fields as bytes).

    Reads the ``tf.train.Example`` proto directly: about 5x less CPU per record than TFDS' generic
    numpy decoder, which matters at thousands of images per second. Fields absent on disk are
    absent from the dict, so ``from_example`` names them as missing.
    """
    from tensorflow_datasets.proto import tf_example_pb2

    feature = tf_example_pb2.Example.FromString(data).features.feature
    ex: dict[str, Any] = {}
    for key in ("id", "image", "caption"):
        if key in feature and len(values := feature[key].bytes_list.value) == 1:
            ex[key] = values[0]
    if "conversation/role" in feature or "conversation/text" in feature:
        ex["conversation"] = {
            k: list(feature[f"conversation/{k}"].bytes_list.value) if f"conversation/{k}" in feature else []
            for k in ("role", "text")
        }
    for key in ("labels", "more_images"):  # absent in datasets built before multi-image records
        if key in feature:
            ex[key] = list(feature[key].bytes_list.value)
    if "boxes" in feature:
        boxes = np.asarray(feature["boxes"].float_list.value, np.float32)
        ex["boxes"] = boxes.reshape(-1, 4) if boxes.size % 4 == 0 else boxes  # else: bad_boxes later
    return ex


def _text(value: Any, field: str, record_id: str) -> str:
    if isinstance(value, str):
        try:  # lone surrogates (e.g. from surrogateescape) are not valid UTF-8 either
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadRecord("invalid_utf8", record_id, f"field {field}") from e
        return value
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord("invalid_utf8", record_id, f"field {field}") from e
    raise BadRecord("missing_field", record_id, f"field {field} is {type(value).__name__}")


def validate(rec: Record) -> Record:
    """Check the schema invariants; raises ``BadRecord`` naming the first violated one."""
    rid = rec.id
    if not isinstance(rec.image, (bytes, np.bytes_)) or rec.image is None:
        raise BadRecord("missing_image", rid)
    placeholders = sum(t.text.count(IMAGE_PLACEHOLDER) for t in rec.conversation)
    if len(rec.image) == 0 and not (rec.conversation and placeholders == 0 and not rec.more_images):
        raise BadRecord("zero_byte_image", rid)
    if any(len(b) == 0 for b in rec.more_images):
        raise BadRecord("zero_byte_image", rid, "an empty image in more_images")
    num_images = len(rec.images)
    if rec.conversation:
        roles = [t.role for t in rec.conversation]
        if any(r not in ROLES for r in roles):
            raise BadRecord("bad_role", rid, f"roles {roles}")
        first_user = next((i for i, r in enumerate(roles) if r != "system"), None)
        if first_user is None or roles[first_user] != "user":
            raise BadRecord("bad_role", rid, f"roles {roles}: the first non-system turn must be user")
        if not any(t.role == "assistant" and t.text.strip() for t in rec.conversation):
            raise BadRecord("empty_conversation", rid, "no assistant turn with text")
        counts = [t.text.count(IMAGE_PLACEHOLDER) for t in rec.conversation]
        if placeholders == 0 and num_images:
            raise BadRecord("no_image_placeholder", rid)
        outside = [r for r, n in zip(roles, counts, strict=True) if n and r != "user"]
        if outside or (num_images == 1 and counts[first_user] != 1 and placeholders == 1):
            raise BadRecord("misplaced_image_placeholder", rid, f"placeholder counts per turn {counts}")
        if placeholders != num_images:
            raise BadRecord("image_count_mismatch", rid, f"{placeholders} <image> for {num_images} images")
    else:
        if not rec.caption.strip():
            raise BadRecord("empty_caption", rid)
        if IMAGE_PLACEHOLDER in rec.caption:
            raise BadRecord("misplaced_image_placeholder", rid, "caption contains <image>")
        if rec.more_images:
            raise BadRecord("image_count_mismatch", rid, f"a caption for {num_images} images")
    boxes = np.asarray(rec.boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) != len(rec.labels):
        raise BadRecord("bad_boxes", rid, f"boxes shape {boxes.shape}, {len(rec.labels)} labels")
    if len(boxes) and not (np.all(np.isfinite(boxes)) and np.all(boxes[:, 2:] >= boxes[:, :2])):
        raise BadRecord("bad_boxes", rid, "non-finite box or x2 < x1 / y2 < y1")
    return rec


def from_example(ex: Mapping[str, Any]) -> Record:
    """A stored example (as ``as_data_source`` returns it) -> validated ``Record``.

    Raises ``BadRecord`` for missing fields, invalid UTF-8, empty/zero-byte parts and placeholder
    errors, so the pipeline can skip and count it.
    """
    raw_id = ex.get("id", b"?")
    rid = raw_id.decode("utf-8", "replace") if isinstance(raw_id, bytes) else str(raw_id)
    if "image" not in ex or ex["image"] is None:
        raise BadRecord("missing_image", rid)
    conv = ex.get("conversation") or {}
    roles: Sequence[Any] = conv.get("role", []) if isinstance(conv, Mapping) else []
    texts: Sequence[Any] = conv.get("text", []) if isinstance(conv, Mapping) else []
    if len(roles) != len(texts):
        raise BadRecord("missing_field", rid, "conversation roles and texts differ in length")
    turns = [
        Turn(_text(r, "conversation.role", rid), _text(t, "conversation.text", rid))
        for r, t in zip(roles, texts, strict=True)
    ]
    caption = _text(ex.get("caption", b""), "caption", rid)
    if not turns and "caption" not in ex:
        raise BadRecord("missing_field", rid, "neither caption nor conversation")
    labels = [_text(x, "labels", rid) for x in ex.get("labels", [])]
    boxes = np.asarray(ex.get("boxes", np.zeros((0, 4))), np.float32)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    more = [bytes(b) for b in ex.get("more_images", [])]
    rec = Record(rid, bytes(ex["image"]), caption, turns, boxes, labels, more)
    return validate(rec)
