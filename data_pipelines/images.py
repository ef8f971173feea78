"""Image decode, resize and normalization (PIL + numpy).

The resize modes and their geometry live in :mod:`data_pipelines.frame` (one layout shared with the
boxes). Decoding follows the references: full-resolution JPEG decoding unless ``jpeg_draft`` asks for
PIL's reduced-scale decode, and transparency handled per mode (:data:`ALPHA_ON_WHITE`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFile

from data_pipelines.frame import CLIP_MEAN, CLIP_STD, RESIZE_MODES, fill_color, square_frame
from data_pipelines.schema import BadRecord

__all__ = [  # CLIP_MEAN / CLIP_STD / RESIZE_MODES re-exported from data_pipelines.frame
    "ALPHA_ON_WHITE", "CLIP_MEAN", "CLIP_STD", "RESIZE_MODES", "Normalizer", "decode", "load", "resize",
    "size", "to_array",
]  # fmt: skip
# Modes whose reference composites a PNG's alpha channel on white: the ParGo release's MME dataset
# pastes an RGBA PNG on white with its alpha as the mask (an LA or palette PNG, whose split() has no 4th
# band, and any other format just go through convert("RGB"), dropping transparency). LLaVA (letterbox)
# always calls convert("RGB").
ALPHA_ON_WHITE = ("bug_compatible_448_crop",)
ImageFile.LOAD_TRUNCATED_IMAGES = False  # truncated files must fail, not be silently padded grey


def decode(
    data: bytes, record_id: str = "?", *, draft: int | None = None, alpha_on_white: bool = False
) -> Image.Image:
    """Encoded bytes -> RGB PIL image; raises ``BadRecord`` (zero_byte_image / bad_image).

    ``draft``: decode a JPEG at a reduced scale (PIL ``draft``) keeping both sides >= ``draft``
    (faster, but not the pixels the references see). ``alpha_on_white``: an RGBA PNG is composited on
    white (the ParGo release); otherwise transparency is dropped by ``convert("RGB")``.
    """
    if data is None or len(data) == 0:
        raise BadRecord("zero_byte_image", record_id)
    try:
        img = Image.open(io.BytesIO(data))
        if draft and img.format == "JPEG":
            img.draft("RGB", (draft, draft))
        img.load()
        if alpha_on_white and img.format == "PNG" and img.mode == "RGBA":
            img = _on_white(img)
        elif img.mode != "RGB":
            img = img.convert("RGB")
    except Exception as e:  # PIL raises many types on hostile bytes (OSError, SyntaxError, struct.error...)
        raise BadRecord("bad_image", record_id, f"{type(e).__name__}: {e}") from e
    if img.width == 0 or img.height == 0:
        raise BadRecord("bad_image", record_id, "image has zero width or height")
    return img


def _on_white(img: Image.Image) -> Image.Image:
    """An RGBA image pasted on a white RGB canvas with its alpha channel as the mask."""
    out = Image.new("RGB", img.size, (255, 255, 255))
    out.paste(img, mask=img.getchannel("A"))
    return out


def size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels ((1, 1) if unreadable: the
    image stage reports the record)."""
    try:
        return Image.open(io.BytesIO(data)).size
    except Exception:  # noqa: BLE001 - any decoder error; decode() names it later
        return 1, 1


def resize(img: Image.Image, size: int, mode: str, mean: Sequence[float] = CLIP_MEAN) -> Image.Image:
    """Resize to ``size x size`` by ``mode`` (:func:`data_pipelines.frame.square_frame`), padding with
    the mean colour (:func:`data_pipelines.frame.fill_color`)."""
    frame = square_frame(img.width, img.height, size, mode)
    if img.size != frame.content:
        img = img.resize(frame.content, Image.BICUBIC)
    if frame.content != (frame.side, frame.side):
        canvas = Image.new("RGB", (frame.side, frame.side), fill_color(mean))
        canvas.paste(img, frame.offset)
        img = canvas
    if frame.zoom != 1:
        return img.resize((size, size), Image.BICUBIC)
    return img.crop((0, 0, size, size)) if frame.side > size else img


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
    *,
    jpeg_draft: bool = False,
) -> Image.Image:
    """Decode + resize as training, ``predict`` and ``evaluate`` feed the model (``jpeg_draft``: the
    reduced-scale JPEG decode, see :func:`decode`)."""
    img = decode(data, record_id, draft=size if jpeg_draft else None, alpha_on_white=mode in ALPHA_ON_WHITE)
    return resize(img, size, mode, mean)
