"""Synthetic "shapes" dataset: small coloured shapes at known positions, plus its own tokenizer.

Every image holds 1-4 small shapes (side 1/8 to 1/4 of the image) on a dark background; each
(colour, shape) pair appears at most once, so "the red circle" always names one object. Splits:

  * ``pretrain``  captions listing every shape and its position: in reading order ("a red circle at
                  the top left, ..."), or in half of them by shape ("a circle in red at the top left,
                  ..."), which asks for the colour of a named shape;
  * ``sft``       3-turn conversations: colour / shape / count / position QA and grounding
                  (``[x1,y1,x2,y2]`` in 0-1 with 3 decimals, and the reverse "what is at [box]?");
  * ``eval``      held-out single-question conversations of the same kinds (own random stream);
  * ``val``       held-out captions (own random stream): stage 1's validation loss.

``variant="fine"`` (128 px by default) asks for fine detail: 5-8 smaller shapes (side 1/16 to 1/10
of the image) and a 2-digit number in a 3 x 5-pixel font drawn at scale 2, with three more kinds: reading
the number (OCR), the colour of the k-th shape from the left, and whether one small shape is left of
another. Everything is a pure function of (seed, split, index, variant). ``build()`` writes the TFDS
ArrayRecord dataset ``data_dir/shapes/1.0.0`` (its ``box_codec.json``: ``CODEC``, norm3 / square) and a
word-level tokenizer in ``data_dir/shapes_tokenizer`` (vocabulary derived from the generator's
templates, so it is also a pure function of this file).
"""

from __future__ import annotations

import collections
import io
import json
import os
import random
import re
import time
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines.boxes import BoxCodec
from data_pipelines.builders import ConverterBuilder, format_summary
from data_pipelines.schema import IMAGE_PLACEHOLDER, Record, Turn

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "cyan": (40, 205, 215),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond")
PLURAL = {s: s + "s" for s in SHAPES}
POSITIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
CAPTION_SPLITS = ("pretrain", "val")
MAX_SHAPES = 4
CODEC = BoxCodec("norm3", "square")

QUESTIONS = {
    "colour": "what colour is the {shape}?",
    "shape": "what shape is the {color} object?",
    "count": "how many shapes are there?",
    "count_color": "how many {color} shapes are there?",
    "count_shape": "how many {plural} are there?",
    "position": "where is the {color} {shape}?",
    "ground": "give the bounding box of the {color} {shape}.",
    "refer": "what is at {box}?",
}
# The fine variant's extra kinds.
FINE_QUESTIONS = {
    "digit": "what number is written in the image?",
    "kth": "what colour is the {ordinal} shape from the left?",
    "relation": "is the {color} {shape} left of the {color2} {shape2}?",
}
ORDINALS = ("first", "second", "third")
# A training turn (never scored): the colours of the leftmost shapes in order, the k-th question's answers.
ORDER_QUESTION = "what colour are the first {count} shapes from the left?"
YES_NO = ("yes", "no")
FINE_CAPTION = " the number {text} is written at the {position}."
# Caption words by what they name (the perplexity evaluator's ``groups``: teacher-forced accuracy on
# each kind of detail): the count opens a caption, the fine variant's number is written in digits.
CAPTION_FIELDS = {
    "colour": tuple(COLORS), "shape": SHAPES, "count": NUMBERS, "digit": tuple("0123456789"),
    "position": tuple(sorted({w for row in POSITIONS for p in row for w in p.split()})),
}  # fmt: skip
VARIANTS = ("basic", "fine")
# 3 x 5 pixel digits, rows top to bottom, drawn at scale 2 in TEXT_COLOR (not a shape colour).
DIGIT_FONT = {
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "001", "001", "001"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
}  # fmt: skip
DIGIT_SCALE = 2
TEXT_COLOR = (200, 200, 200)
ANSWERS = {"refer": "{article} {color} {shape}."}
CAPTION = "{count} {noun}: {items}."
CAPTION_ITEM = "{article} {color} {shape} at the {position}"
CAPTION_ITEM_BY_SHAPE = "a {shape} in {color} at the {position}"
ARTICLES = ("a", "an")
CAPTION_AND = " and "
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", IMAGE_PLACEHOLDER, "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ------------------------------------------------------------------------------------------------
# Scene generation
# ------------------------------------------------------------------------------------------------
def _rng(seed: int, split: str, index: int) -> random.Random:
    """Python's Mersenne Twister seeded from (seed, split, index): stable across platforms/versions."""
    return random.Random(f"shapes/{seed}/{split}/{index}")


def _position(box, image_size: int) -> str:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    third = image_size / 3
    return POSITIONS[min(2, int(cy // third))][min(2, int(cx // third))]


def _apart(a, b) -> bool:
    """Boxes (x1, y1, x2, y2) at least 1 px apart."""
    return a[0] > b[2] or a[2] < b[0] or a[1] > b[3] or a[3] < b[1]


def sample_scene(
    rng: random.Random, image_size: int, variant: str = "basic", occupied: tuple = ()
) -> list[dict[str, Any]]:
    """Non-overlapping objects (1..MAX_SHAPES; the fine variant 5..8 smaller ones), clear of the
    ``occupied`` boxes: colour, shape, pixel box, position word."""
    fine = variant == "fine"
    n = rng.randint(5, 8) if fine else rng.randint(1, MAX_SHAPES)
    pairs = rng.sample(range(len(COLORS) * len(SHAPES)), n)
    if fine:
        lo, hi = max(4, image_size // 16), max(5, image_size // 10)
    else:
        lo, hi = max(4, image_size // 8), max(5, image_size // 4)
    objects: list[dict[str, Any]] = []
    for p in pairs:
        color, shape = list(COLORS)[p // len(SHAPES)], SHAPES[p % len(SHAPES)]
        for _ in range(50):  # rejection sampling for a free spot (1 px gap)
            s = rng.randint(lo, hi)
            x, y = rng.randint(0, image_size - s), rng.randint(0, image_size - s)
            box = (x, y, x + s, y + s)
            if all(_apart(box, o["box"]) for o in objects) and all(_apart(box, b) for b in occupied):
                break
        else:
            continue
        article = ARTICLES[color[0] in "aeiou"]
        objects.append({"color": color, "shape": shape, "box": box, "position": _position(box, image_size),
                        "article": article})  # fmt: skip
    return objects


def sample_number(rng: random.Random, image_size: int) -> dict[str, Any]:
    """A 2-digit number for the fine variant: text, its pixel box, position word, and each digit's
    box (``digits``: [(char, box)])."""
    text = str(rng.randint(10, 99))
    w, h = 3 * DIGIT_SCALE, 5 * DIGIT_SCALE
    width = len(text) * w + (len(text) - 1) * DIGIT_SCALE
    x, y = rng.randint(0, image_size - width), rng.randint(0, image_size - h)
    digits = [
        (c, (x + i * (w + DIGIT_SCALE), y, x + i * (w + DIGIT_SCALE) + w, y + h)) for i, c in enumerate(text)
    ]
    box = (x, y, x + width, y + h)
    return {"text": text, "box": box, "position": _position(box, image_size), "digits": digits}


def draw_scene(
    objects: list[dict[str, Any]], image_size: int, background: int, number: dict[str, Any] | None = None
) -> bytes:
    """PNG bytes of the scene (lossless, so fine detail survives), with ``number`` drawn if given."""
    img = Image.new("RGB", (image_size, image_size), (background, background, background + 10))
    d = ImageDraw.Draw(img)
    for o in objects:
        x1, y1, x2, y2 = o["box"]
        c, xy = COLORS[o["color"]], (x1, y1, x2 - 1, y2 - 1)
        if o["shape"] == "circle":
            d.ellipse(xy, fill=c)
        elif o["shape"] == "square":
            d.rectangle(xy, fill=c)
        elif o["shape"] == "triangle":
            d.polygon([((x1 + x2 - 1) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=c)
        else:
            mx, my = (x1 + x2 - 1) / 2, (y1 + y2 - 1) / 2
            d.polygon([(mx, y1), (x2 - 1, my), (mx, y2 - 1), (x1, my)], fill=c)
    for char, (x1, y1, _, _) in number["digits"] if number else ():
        for r, row in enumerate(DIGIT_FONT[char]):
            for col, bit in enumerate(row):
                if bit == "1":
                    x, y = x1 + col * DIGIT_SCALE, y1 + r * DIGIT_SCALE
                    d.rectangle((x, y, x + DIGIT_SCALE - 1, y + DIGIT_SCALE - 1), fill=TEXT_COLOR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def reading_order(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Objects top to bottom, then left to right, by box centre: the order captions list them in, so
    that the next object a caption names is a function of the image."""
    return sorted(objects, key=lambda o: (o["box"][1] + o["box"][3], o["box"][0] + o["box"][2]))


def shape_order(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Objects by shape, then colour (in ``SHAPES`` and ``COLORS`` order)."""
    return sorted(objects, key=lambda o: (SHAPES.index(o["shape"]), list(COLORS).index(o["color"])))


def caption(objects: list[dict[str, Any]], number: dict | None = None, by_shape: bool = False) -> str:
    """Every object and its position, in reading order, or ``by_shape`` (the shape named before its
    colour, so the caption asks for a named shape's colour), then the fine variant's number."""
    if by_shape:
        items = [CAPTION_ITEM_BY_SHAPE.format(**o) for o in shape_order(objects)]
    else:
        items = [CAPTION_ITEM.format(**o) for o in reading_order(objects)]
    joined = items[0] if len(items) == 1 else ", ".join(items[:-1]) + CAPTION_AND + items[-1]
    text = CAPTION.format(
        count=NUMBERS[len(objects)], noun="shape" if len(objects) == 1 else "shapes", items=joined
    )
    return text + FINE_CAPTION.format(**number) if number else text


def _centre_x(o: dict[str, Any]) -> float:
    return (o["box"][0] + o["box"][2]) / 2


def order_question(objects: list[dict[str, Any]], count: int) -> tuple[str, str]:
    """(question, answer): the colours of the ``count`` leftmost objects (fewer if the scene has
    fewer), left to right by box centre."""
    leftmost = sorted(objects, key=_centre_x)[:count]
    return ORDER_QUESTION.format(count=NUMBERS[len(leftmost)]), ", ".join(o["color"] for o in leftmost) + "."


def _fine_question(kind: str, objects, rng: random.Random, number) -> tuple[str, str] | None:
    """A question of a fine-variant ``kind``, or None when the scene cannot ask it unambiguously."""
    cx = _centre_x
    if kind == "digit":
        return FINE_QUESTIONS["digit"], number["text"]
    if kind == "kth":
        xs = sorted(objects, key=cx)
        gaps = [cx(b) - cx(a) for a, b in zip(xs, xs[1:])] + [float("inf")]
        clear = [
            k for k in range(min(len(ORDINALS), len(xs))) if gaps[k] >= 2 and (k == 0 or gaps[k - 1] >= 2)
        ]
        if not clear:
            return None
        k = rng.choice(clear)
        return FINE_QUESTIONS["kth"].format(ordinal=ORDINALS[k]), xs[k]["color"]
    pairs = [(a, b) for a in objects for b in objects if a is not b and abs(cx(a) - cx(b)) >= 4]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    q = FINE_QUESTIONS["relation"].format(
        color=a["color"], shape=a["shape"], color2=b["color"], shape2=b["shape"]
    )
    return q, YES_NO[cx(a) > cx(b)]


def question(
    kind: str, objects: list[dict[str, Any]], rng: random.Random, size: int, number: dict | None = None
) -> tuple[str, str]:
    """One (question, answer) pair of ``kind`` about the scene (``number``: the fine variant's)."""
    if kind in FINE_QUESTIONS:
        asked = _fine_question(kind, objects, rng, number)
        if asked:
            return asked
        kind = "count"  # nothing unambiguous to ask
    o = rng.choice(objects)
    shape_counts = collections.Counter(x["shape"] for x in objects)
    color_counts = collections.Counter(x["color"] for x in objects)
    box = CODEC.encode(o["box"], size, size) if kind in ("ground", "refer") else ""
    fields = dict(o, plural=PLURAL[o["shape"]], box=box)
    if kind == "colour" and shape_counts[o["shape"]] != 1:
        kind = "position"  # ambiguous: more than one object of this shape
    if kind == "shape" and color_counts[o["color"]] != 1:
        kind = "position"
    if kind == "count_color":
        fields["color"] = rng.choice(list(COLORS))
    if kind == "count_shape":
        fields["shape"] = rng.choice(SHAPES)
        fields["plural"] = PLURAL[fields["shape"]]
    answer = {
        "colour": o["color"],
        "shape": o["shape"],
        "count": NUMBERS[len(objects)],
        "count_color": NUMBERS[color_counts[fields["color"]]],
        "count_shape": NUMBERS[shape_counts[fields["shape"]]],
        "position": o["position"],
        "ground": fields["box"],
        "refer": ANSWERS["refer"].format(**o),
    }[kind]
    return QUESTIONS[kind].format(**fields), answer


# The question kinds the eval split reports: counting questions are one kind.
KINDS = {"colour": "colour", "shape": "shape", "count": "count", "count_color": "count",
         "count_shape": "count", "position": "position", "ground": "ground", "refer": "refer",
         "digit": "digit", "kth": "kth", "relation": "relation"}  # fmt: skip


def _question_patterns() -> list[tuple[str, re.Pattern]]:
    words = {
        "shape": "|".join(SHAPES), "color": "|".join(COLORS), "plural": "|".join(PLURAL.values()),
        "box": r"\[[^\]]*\]", "ordinal": "|".join(ORDINALS),
    }  # fmt: skip
    words.update(shape2=words["shape"], color2=words["color"])
    out = []
    for kind, template in {**QUESTIONS, **FINE_QUESTIONS}.items():
        parts = re.split(r"\{(\w+)\}", template)  # text, field, text, ...
        rx = "".join(re.escape(p) if i % 2 == 0 else f"(?:{words[p]})" for i, p in enumerate(parts))
        out.append((kind, re.compile(rx)))
    return out


_PATTERNS = _question_patterns()


def question_kind(text: str) -> str | None:
    """The kind (a key of ``KINDS``) of a generated question, or None if it is not one of ours."""
    text = text.replace(IMAGE_PLACEHOLDER, "").strip()
    return next((kind for kind, rx in _PATTERNS if rx.fullmatch(text)), None)


def make_scene(
    split: str, index: int, *, seed: int = 0, image_size: int = 64, variant: str = "basic"
) -> tuple[random.Random, list[dict[str, Any]], dict[str, Any] | None, bytes]:
    """Scene ``index`` of ``split``, a pure function of its arguments: (its random stream, left where
    the questions continue it; objects; the fine variant's number or None; PNG bytes)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {VARIANTS}.")
    fine = variant == "fine"
    rng = _rng(seed, split if not fine else f"fine/{split}", index)
    number = sample_number(rng, image_size) if fine else None
    objects = sample_scene(rng, image_size, variant, occupied=(number["box"],) if fine else ())
    return rng, objects, number, draw_scene(objects, image_size, rng.randint(15, 69), number)


def make_record(
    split: str, index: int, *, seed: int = 0, image_size: int = 64, variant: str = "basic"
) -> Record:
    """The record ``index`` of ``split``: a pure function of its arguments."""
    fine = variant == "fine"
    rng, objects, number, image = make_scene(split, index, seed=seed, image_size=image_size, variant=variant)
    boxes = np.array([o["box"] for o in objects], np.float32).reshape(-1, 4)
    labels = [f"{o['color']} {o['shape']}" for o in objects]
    rid = f"shapes/{split}/{index}"
    if split in CAPTION_SPLITS:
        text = caption(objects, number, by_shape=rng.random() < 0.5)
        return Record(rid, image, caption=text, boxes=boxes, labels=labels)
    num_turns = 3 if split == "sft" else 1
    kinds = rng.sample(list(QUESTIONS) + (list(FINE_QUESTIONS) if fine else []), num_turns)
    turns: list[Turn] = []
    for t, kind in enumerate(kinds):
        q, a = question(kind, objects, rng, image_size, number)
        turns += [Turn("user", (IMAGE_PLACEHOLDER + "\n" if t == 0 else "") + q), Turn("assistant", a)]
    return Record(rid, image, conversation=turns, boxes=boxes, labels=labels)


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------
def _pre_tokenizer():
    from tokenizers import pre_tokenizers as pt

    return pt.Sequence(
        [
            pt.Split("\n", behavior="isolated"),
            pt.Metaspace(replacement="\u2581", prepend_scheme="never", split=True),
            pt.Punctuation("isolated"),
            pt.Digits(individual_digits=True),
        ]
    )


def vocabulary() -> list[str]:
    """Every piece the generator's text can pre-tokenize into (deterministic order)."""
    texts = list(QUESTIONS.values()) + list(ANSWERS.values()) + [CAPTION, CAPTION_AND]
    texts += [CAPTION_ITEM, CAPTION_ITEM_BY_SHAPE]
    texts += list(FINE_QUESTIONS.values()) + [FINE_CAPTION, ORDER_QUESTION] + list(ORDINALS) + list(YES_NO)
    texts += list(COLORS) + list(SHAPES) + list(PLURAL.values()) + list(NUMBERS)
    texts += [p for row in POSITIONS for p in row] + list(ARTICLES) + ["system", "user", "assistant"]
    texts += ["shape", "shapes"]
    words: set[str] = set()
    for t in texts:
        words.update(re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", " ", t)))
    words.update(re.findall(r"[A-Za-z]+", " ".join(texts)))
    punct = list("[](){}.,:;?!'\"-+/")
    pieces = {"\u2581", "\n"} | set(punct) | set("0123456789")
    pieces |= words | {"\u2581" + w for w in words}
    return sorted(pieces)


def make_tokenizer():
    """(tokenizers.Tokenizer, tokenizer_config dict) for the shapes vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for piece in vocabulary():
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "image_token": IMAGE_PLACEHOLDER,
        "additional_special_tokens": [IMAGE_PLACEHOLDER, "<|im_start|>", "<|im_end|>", "</s>"],
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    return tok, config


def write_tokenizer(path: str) -> str:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` into ``path``; returns ``path``."""
    tok, config = make_tokenizer()
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return path


# ------------------------------------------------------------------------------------------------
# Builder
# ------------------------------------------------------------------------------------------------
class ShapesBuilder(ConverterBuilder, skip_registration=True):
    """Synthetic shapes: captions (pretrain), QA + grounding (sft), held-out QA (eval); boxes in
    ``CODEC``."""

    name = "shapes"

    def __init__(
        self, *, image_size=64, num_pretrain=2000, num_sft=2000, num_eval=200, num_val=200, seed=0,
        variant="basic", **kw,
    ):  # fmt: skip
        self.image_size, self.seed, self.variant = image_size, seed, variant
        self.sizes = {"pretrain": num_pretrain, "sft": num_sft, "eval": num_eval, "val": num_val}
        super().__init__(box_codec=CODEC, **kw)

    def _split_names(self):
        return [s for s, n in self.sizes.items() if n > 0]

    def _count(self, split):
        return self.sizes[split]

    def _items(self, split):
        return ((split, i) for i in range(self.sizes[split]))

    def _convert(self, item):
        split, index = item
        return make_record(split, index, seed=self.seed, image_size=self.image_size, variant=self.variant)


def build(
    data_dir: str,
    *,
    image_size: int = 64,
    num_pretrain: int = 2000,
    num_sft: int = 2000,
    num_eval: int = 200,
    num_val: int = 200,
    seed: int = 0,
    variant: str = "basic",
    num_workers: int = 2,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the shapes dataset and its tokenizer under ``data_dir``; returns paths and accounting.

    Returns ``{"name": "shapes", "data_dir", "tokenizer": <dir>, "summary": {...}, "seconds"}``.
    """
    t0 = time.perf_counter()
    params = dict(
        image_size=image_size, num_pretrain=num_pretrain, num_sft=num_sft, num_eval=num_eval,
        num_val=num_val, seed=seed, variant=variant,
    )  # fmt: skip
    builder = ShapesBuilder(data_dir=data_dir, num_workers=num_workers, progress=progress, **params)
    summary = builder.build()
    tokenizer = write_tokenizer(os.path.join(data_dir, "shapes_tokenizer"))
    with open(os.path.join(data_dir, STAMP), "w") as f:
        json.dump(dict(params, generator=GENERATOR), f, sort_keys=True)
    return {
        "name": "shapes",
        "data_dir": data_dir,
        "tokenizer": tokenizer,
        "summary": summary,
        "seconds": time.perf_counter() - t0,
    }


def ensure(data_dir: str, **kwargs) -> dict[str, Any]:
    """``build(data_dir, **kwargs)`` unless a build with the same arguments by this ``GENERATOR`` is there.

    Returns the same keys as ``build`` (``summary`` is None and ``seconds`` 0 when reused).
    """
    params = dict(
        image_size=64, num_pretrain=2000, num_sft=2000, num_eval=200, num_val=200, seed=0, variant="basic"
    )
    unknown = set(kwargs) - set(params) - {"num_workers", "progress"}
    if unknown:
        raise TypeError(f"Unknown shapes.ensure arguments {sorted(unknown)}; use {sorted(params)}.")
    params.update({k: v for k, v in kwargs.items() if k in params})
    stamp = os.path.join(data_dir, STAMP)
    tokenizer = os.path.join(data_dir, "shapes_tokenizer")
    if os.path.exists(stamp) and os.path.exists(os.path.join(tokenizer, "tokenizer.json")):
        with open(stamp) as f:
            if json.load(f) == dict(params, generator=GENERATOR):
                return {
                    "name": "shapes",
                    "data_dir": data_dir,
                    "tokenizer": tokenizer,
                    "summary": None,
                    "seconds": 0.0,
                }
    return build(data_dir, **dict(kwargs, **params))


STAMP = "shapes_build.json"  # the build's arguments and GENERATOR: ensure() reuses a build when they match
GENERATOR = 3  # bumped when what a build writes changes (2: captions by shape, 3: box_codec.json)
ASSET_TOKENIZER = os.path.join(os.path.dirname(__file__), "assets", "shapes_tokenizer")


def main(argv: list[str]) -> None:
    """``python -m data_pipelines.shapes [DATA_DIR]`` (see also ``data_pipelines.build``)."""
    out = build(argv[1] if len(argv) > 1 else "/tmp/shapes_data", progress=True)
    print(format_summary("shapes", out["summary"]), f"\n{out['seconds']:.1f}s, tokenizer: {out['tokenizer']}")


if __name__ == "__main__":
    from pargo_jax import launcher

    launcher.run(main)
