"""Box codec: pixel boxes <-> the text a grounding model reads and writes.

Formats (all written as ``[x1,y1,x2,y2]``):
  * ``norm3``   floats in [0, 1] with 3 decimals (GroundingGPT / Shikra): ``[0.125,0.250,0.500,0.875]``
  * ``int1000`` integers in [0, 1000] (Qwen-VL style grid): ``[125,250,500,875]``
  * ``pixel``   integer pixels: ``[16,32,64,112]``

Frames: ``original`` measures coordinates on the original ``width x height`` image; ``square``
measures them on the image padded (centred, integer offset) to a ``max(w, h)`` square, which is what
the model sees after the ``letterbox`` resize (LLaVA / ParGo ``expand2square``): the same
:func:`data_pipelines.frame.square_frame` as the pixels.

A codec is recorded as ``{"format": ..., "frame": ...}`` (:meth:`BoxCodec.as_dict`): by a dataset whose
text holds boxes (``box_codec.json``, :func:`data_pipelines.builders.read_box_codec`), by a run
(``config.box_codec``) and by an export (``generation_config.json``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines.frame import square_frame

FORMATS = ("norm3", "int1000", "pixel")
FRAMES = ("square", "original")
_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
BOX_RE = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")


@dataclasses.dataclass(frozen=True)
class BoxCodec:
    """Encode/decode ``[x1, y1, x2, y2]`` pixel boxes of a ``width x height`` image as text."""

    fmt: str = "norm3"
    frame: str = "square"

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"Unknown box format {self.fmt!r}; use one of {FORMATS}.")
        if self.frame not in FRAMES:
            raise ValueError(f"Unknown box frame {self.frame!r}; use one of {FRAMES}.")

    def __str__(self) -> str:
        return f"{self.fmt}/{self.frame}"

    def as_dict(self) -> dict[str, str]:
        """``{"format": fmt, "frame": frame}``: how datasets, runs and exports record the codec."""
        return {"format": self.fmt, "frame": self.frame}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "the box codec") -> BoxCodec:
        """The codec of an :meth:`as_dict` mapping (a missing key takes the default); other keys fail
        naming ``where``."""
        unknown = sorted(set(d) - {"format", "frame"})
        if unknown:
            raise ValueError(f"Unknown key(s) {unknown} in {where}; a box codec is dict(format=, frame=).")
        return cls(d.get("format", cls.fmt), d.get("frame", cls.frame))

    @classmethod
    def of_run(cls, config) -> BoxCodec:
        """A run's codec, ``config.box_codec = dict(format=, frame=)``: the text boxes its data, its answers
        and its evaluators use (norm3 / square for a run saved before the field existed). A wrong key or
        value is a ``ConfigError``."""
        from pargo_jax.configs import ConfigError

        given = config.get("box_codec") or {}
        try:
            return cls.from_dict(given.to_dict() if hasattr(given, "to_dict") else dict(given))
        except ValueError as e:
            raise ConfigError(f"config.box_codec: {e}") from e

    def _frame(self, width: float, height: float) -> tuple[float, float, float, float]:
        """(offset_x, offset_y, scale_x, scale_y) mapping original pixels into the frame's [0, 1]."""
        if width <= 0 or height <= 0:
            raise ValueError(f"Image size {width}x{height} is not positive; pass the real image size.")
        if self.frame == "original":
            return 0.0, 0.0, float(width), float(height)
        side = max(round(width), round(height))  # pixel sizes: the letterbox frame at full resolution
        ox, oy = square_frame(round(width), round(height), side, "letterbox").offset
        return float(ox), float(oy), float(side), float(side)

    def to_unit(self, box: Sequence[float], width: float, height: float) -> np.ndarray:
        """Pixel box -> [0, 1] coordinates in this codec's frame (clipped)."""
        ox, oy, sx, sy = self._frame(width, height)
        x1, y1, x2, y2 = (float(v) for v in box)
        unit = np.array([(x1 + ox) / sx, (y1 + oy) / sy, (x2 + ox) / sx, (y2 + oy) / sy])
        return np.clip(unit, 0.0, 1.0)

    def from_unit(self, unit: Sequence[float], width: float, height: float) -> np.ndarray:
        """[0, 1] frame coordinates -> pixel box of the original image."""
        ox, oy, sx, sy = self._frame(width, height)
        u = np.asarray(unit, np.float64)
        return np.array([u[0] * sx - ox, u[1] * sy - oy, u[2] * sx - ox, u[3] * sy - oy])

    def encode(self, box: Sequence[float], width: float, height: float) -> str:
        """Pixel box of a ``width x height`` image -> text like ``[0.125,0.250,0.500,0.875]``."""
        u = self.to_unit(box, width, height)
        if self.fmt == "norm3":
            return "[" + ",".join(f"{v:.3f}" for v in u) + "]"
        if self.fmt == "int1000":
            return "[" + ",".join(str(int(round(v * 1000))) for v in u) + "]"
        _, _, sx, sy = self._frame(width, height)
        px = [u[0] * sx, u[1] * sy, u[2] * sx, u[3] * sy]
        return "[" + ",".join(str(int(round(v))) for v in px) + "]"

    def decode(self, text: str, width: float, height: float) -> np.ndarray:
        """The first box in ``text`` -> pixel box of the original image; ValueError if none."""
        boxes = self.decode_all(text, width, height)
        if not boxes:
            raise ValueError(f"No [x1,y1,x2,y2] box found in {text[:80]!r}; expected {self.fmt} text.")
        return boxes[0]

    def decode_all(self, text: str, width: float, height: float) -> list[np.ndarray]:
        """Every ``[a,b,c,d]`` box in ``text`` -> pixel boxes of the original image."""
        out = []
        _, _, sx, sy = self._frame(width, height)
        for m in BOX_RE.finditer(text):
            v = np.array([float(g) for g in m.groups()])
            if self.fmt == "int1000":
                v = v / 1000.0
            elif self.fmt == "pixel":
                v = v / np.array([sx, sy, sx, sy])
            out.append(self.from_unit(v, width, height))
        return out

    def tolerance(self, width: float, height: float) -> float:
        """Largest pixel error one encode/decode round trip can introduce."""
        _, _, sx, sy = self._frame(width, height)
        step = {"norm3": 1e-3, "int1000": 1e-3, "pixel": 1.0 / max(sx, sy)}[self.fmt]
        return 0.5 * step * max(sx, sy) + 1e-6


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0
