"""The model's square input frame: the pixel normalization constants, and where each resize mode puts
an image. One source for the pixels (:func:`data_pipelines.images.resize`), detector boxes
(:func:`data_pipelines.detections.transform_boxes`), the box text codec
(:class:`data_pipelines.boxes.BoxCodec`) and the defaults of the input and model configs.

Resize modes (output is always ``size x size``; offsets are integers, as PIL pastes and the references
compute them, so an odd padding puts the extra pixel at the bottom / right):
  * ``squash``    scale to the square, ignoring aspect ratio.
  * ``letterbox`` pad to a centred ``max(w, h)`` square at the original resolution, then scale it
                  (LLaVA's ``expand2square``).
  * ``pad``       scale the longer side to ``size``, image at the top left (pix2seq / OWL-ViT style).
  * ``bug_compatible_448_crop``  the ParGo release's MME input for its 336 px tower: scale to fit a
                  ``4/3 * size`` (448) square, centred (``resize_and_pad``), then its top-left ``size``
                  crop (``split_into_patches`` keeps one 336 patch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the default pixel mean / std everywhere
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # MAE's (and timm's) pixel mean / std
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("letterbox", "squash", "pad", "bug_compatible_448_crop")


@dataclasses.dataclass(frozen=True)
class SquareFrame:
    """How a resize mode lays out a ``width x height`` image: scaled to ``content`` pixels, pasted at
    ``offset`` on a ``side x side`` canvas, the canvas scaled by ``zoom`` (``letterbox``: pads first,
    then scales), and the top-left ``size x size`` of the result kept."""

    width: int
    height: int
    content: tuple[int, int]
    offset: tuple[int, int]
    side: int
    zoom: float

    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, offset) over ``[x1, y1, x2, y2]``: original pixels -> canvas pixels."""
        scale = np.array([self.content[0] / self.width, self.content[1] / self.height] * 2)
        return scale, np.array(list(self.offset) * 2, np.float64)

    def to_input(self, boxes: np.ndarray) -> np.ndarray:
        """``(..., 4)`` ``[x1, y1, x2, y2]`` pixels of the original image -> pixels of the input."""
        scale, offset = self._affine()
        return (np.asarray(boxes, np.float64) * scale + offset) * self.zoom

    def from_input(self, boxes: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_input`."""
        scale, offset = self._affine()
        return (np.asarray(boxes, np.float64) / self.zoom - offset) / scale


def centred(outer: int, inner: int) -> int:
    """Left / top padding that centres ``inner`` pixels in ``outer`` (floor, as the references)."""
    return (outer - inner) // 2


def square_frame(width: int, height: int, size: int, mode: str) -> SquareFrame:
    """The layout of resize ``mode`` (module docstring) for a ``width x height`` image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"Image size {width}x{height} is not positive; pass the real image size.")

    def frame(content: tuple[int, int], side: int, zoom: float = 1.0) -> SquareFrame:
        offset = (centred(side, content[0]), centred(side, content[1]))
        return SquareFrame(width, height, content, offset, side, zoom)

    if mode == "squash":
        return frame((size, size), size)
    if mode == "letterbox":
        side = max(width, height)
        return frame((width, height), side, size / side)
    if mode == "pad":
        scale = size / max(width, height)
        content = (max(1, round(width * scale)), max(1, round(height * scale)))
        return SquareFrame(width, height, content, (0, 0), size, 1.0)
    if mode == "bug_compatible_448_crop":
        big = size * 4 // 3
        ratio = min(big / width, big / height)
        return frame((int(width * ratio), int(height * ratio)), big)
    raise ValueError(f"Unknown resize mode {mode!r}; use one of {RESIZE_MODES}.")


def fill_color(mean: Sequence[float]) -> tuple[int, int, int]:
    """Normalization mean in [0, 1] -> the uint8 RGB padding colour, ``int(255 * m)`` as LLaVA's
    ``expand2square`` call and the ParGo release take it (so padding is within 1/255 of the mean)."""
    return tuple(int(255 * m) for m in mean)  # type: ignore[return-value]
