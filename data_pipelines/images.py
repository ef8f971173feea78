"""Image decode, resize and normalization (PIL + numpy).

Resize modes (output is always ``size x size``):
  * ``squash``    resize to the square, ignoring aspect ratio.
  * ``letterbox`` pad to a centred square with the normalization mean colour, then resize
                  (LLaVA / ParGo ``expand2square``); padding becomes exactly 0 after normalization.
  * ``pad``       resize the longer side to ``size`` keeping aspect, place at the top-left and pad
                  the bottom/right with the mean colour (pix2seq / OWL-ViT style).
  * ``bug_compatible_448_crop``  what the ParGo release's MME evaluation feeds its 336 px tower:
                  ``resize_and_pad`` onto a centred ``4/3 * size`` (448) square in the mean colour
                  (``int(255 * m)``), then the top-left ``size`` crop of it (its ``split_into_patches``
                  keeps one 336 patch). Only to reproduce released numbers; ``letterbox`` is the clean one.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFile

from data_pipelines.schema import BadRecord

RESIZE_MODES = ("letterbox", "squash", "pad", "bug_compatible_448_crop")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ImageFile.LOAD_TRUNCATED_IMAGES = False  # truncated files must fail, not be silently padded grey


def decode(data: bytes, record_id: str = "?", *, min_size: int | None = None) -> Image.Image:
    """Encoded bytes -> RGB PIL image; raises ``BadRecord`` (zero_byte_image / bad_image).

    ``min_size`` lets JPEG decode at a reduced scale (``draft``) while keeping both sides >= it.
    """
    if data is None or len(data) == 0:
        raise BadRecord("zero_byte_image", record_id)
    try:
        img = Image.open(io.BytesIO(data))
        if min_size and img.format == "JPEG":
            img.draft("RGB", (min_size, min_size))
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
    except Exception as e:  # PIL raises many types on hostile bytes (OSError, SyntaxError, struct.error...)
        raise BadRecord("bad_image", record_id, f"{type(e).__name__}: {e}") from e
    if img.width == 0 or img.height == 0:
        raise BadRecord("bad_image", record_id, "image has zero width or height")
    return img


def size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels ((1, 1) if unreadable: the
    image stage reports the record)."""
    try:
        return Image.open(io.BytesIO(data)).size
    except Exception:  # noqa: BLE001 - any decoder error; decode() names it later
        return 1, 1


def mean_color(mean: Sequence[float]) -> tuple[int, int, int]:
    """Normalization mean in [0, 1] -> the uint8 RGB fill colour."""
    return tuple(int(round(255 * m)) for m in mean)  # type: ignore[return-value]


def resize(img: Image.Image, size: int, mode: str, mean: Sequence[float] = CLIP_MEAN) -> Image.Image:
    """Resize to ``size x size`` by ``mode`` (see module docstring)."""
    if mode == "squash":
        return img.resize((size, size), Image.BICUBIC)
    fill = mean_color(mean)
    w, h = img.size
    if mode == "letterbox":
        if w != h:
            side = max(w, h)
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(img, ((side - w) // 2, (side - h) // 2))
            img = canvas
        return img.resize((size, size), Image.BICUBIC)
    if mode == "bug_compatible_448_crop":
        big = size * 4 // 3
        ratio = min(big / w, big / h)
        nw, nh = int(w * ratio), int(h * ratio)
        canvas = Image.new("RGB", (big, big), tuple(int(255 * m) for m in mean))
        canvas.paste(img.resize((nw, nh), Image.BICUBIC), ((big - nw) // 2, (big - nh) // 2))
        return canvas.crop((0, 0, size, size))
    if mode == "pad":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (size, size), fill)
        canvas.paste(img.resize((nw, nh), Image.BICUBIC), (0, 0))
        return canvas
    raise ValueError(f"Unknown resize mode {mode!r}; use one of {RESIZE_MODES}.")


class Normalizer:
    """uint8 HWC -> float32 ``(x / 255 - mean) / std`` with one fused multiply-add."""

    def __init__(self, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean {mean} / std {std} must be 3 values each with std > 0.")
        self.scale = (1.0 / (255.0 * np.asarray(std, np.float64))).astype(np.float32)
        self.offset = (-np.asarray(mean, np.float64) / np.asarray(std, np.float64)).astype(np.float32)

        self._rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, img: Image.Image | np.ndarray) -> np.ndarray:
        arr = np.asarray(img, dtype=np.uint8)
        h, w, c = arr.shape
        if c != 3:
            raise ValueError(f"Expected an RGB image (H, W, 3), got shape {arr.shape}; convert it to RGB.")
        # per-row tiled scale/offset: numpy's inner loop then runs over W*3 values, not 3 (~3x faster)
        if w not in self._rows:
            self._rows[w] = (np.tile(self.scale, w), np.tile(self.offset, w))
        scale, offset = self._rows[w]
        out = np.empty((h, w * 3), np.float32)
        np.multiply(arr.reshape(h, w * 3), scale, out=out)
        out += offset
        return out.reshape(h, w, 3)


def to_array(img: Image.Image) -> np.ndarray:
    """The uint8 ``(H, W, C)`` pixels of an RGB / RGBA / L image: ``np.asarray(img)`` in one pass.

    ``np.asarray`` goes through ``Image.tobytes``, which packs the pixels in 64 KiB pieces and joins
    them (a second copy); one piece the size of the image is ~1.6x faster at 384 px (0.27 vs 0.46 ms).
    """
    channels = {"RGB": 3, "RGBA": 4, "L": 1}.get(img.mode)
    get_encoder = getattr(Image, "_getencoder", None)  # private in PIL: fall back if it ever goes
    if channels is None or get_encoder is None or img.width == 0 or img.height == 0:
        return np.asarray(img)
    img.load()
    encoder = get_encoder(img.mode, "raw", img.mode)
    try:
        encoder.setimage(img.im, (0, 0, *img.size))
        _, status, data = encoder.encode(img.width * img.height * channels)
    finally:
        encoder.cleanup()
    if status != 1:  # not done in one piece: never expected, but stay correct
        return np.asarray(img)
    shape = (img.height, img.width, channels) if channels > 1 else (img.height, img.width)
    return np.frombuffer(data, np.uint8).reshape(shape)


def load(
    data: bytes,
    size: int,
    mode: str,
    mean: Sequence[float] = CLIP_MEAN,
    record_id: str = "?",
) -> Image.Image:
    """Decode + resize: the raw per-image work the benchmark compares the pipeline against."""
    return resize(decode(data, record_id, min_size=size), size, mode, mean)
