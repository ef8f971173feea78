"""Plain numpy references written from the published definitions (torchvision does not load next to
the pinned CPU torch): ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` and
``torchvision.ops.roi_align(aligned=False, sampling_ratio=-1)`` (``roi_align_kernel.cpp``), loop by loop."""

from __future__ import annotations

import math

import numpy as np


def upsample_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) -> (size, size, C), align_corners=False (source index clamped at 0, as torch)."""
    h, w, _ = x.shape
    out = np.zeros((size, size, x.shape[2]), np.float64)
    for oy in range(size):
        sy = max((oy + 0.5) * h / size - 0.5, 0.0)
        y0 = int(sy)
        y1, ly = min(y0 + 1, h - 1), sy - y0
        for ox in range(size):
            sx = max((ox + 0.5) * w / size - 0.5, 0.0)
            x0 = int(sx)
            x1, lx = min(x0 + 1, w - 1), sx - x0
            out[oy, ox] = ((1 - ly) * (1 - lx) * x[y0, x0] + (1 - ly) * lx * x[y0, x1]
                           + ly * (1 - lx) * x[y1, x0] + ly * lx * x[y1, x1])  # fmt: skip
    return out


def _bilinear(f: np.ndarray, y: float, x: float) -> np.ndarray:
    h, w, _ = f.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(f.shape[2])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * f[y0, x0] + (1 - ly) * lx * f[y0, x1]
            + ly * (1 - lx) * f[y1, x0] + ly * lx * f[y1, x1])  # fmt: skip


def roi_align(f: np.ndarray, box, output_size: int, spatial_scale: float) -> np.ndarray:
    """(H, W, C) feature map, one box (x1, y1, x2, y2) -> (output_size, output_size, C)."""
    x1, y1, x2, y2 = (v * spatial_scale for v in box)
    roi_w, roi_h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    bin_h, bin_w = roi_h / output_size, roi_w / output_size
    gh, gw = math.ceil(roi_h / output_size), math.ceil(roi_w / output_size)
    out = np.zeros((output_size, output_size, f.shape[2]))
    for ph in range(output_size):
        for pw in range(output_size):
            acc = np.zeros(f.shape[2])
            for iy in range(gh):
                y = y1 + ph * bin_h + (iy + 0.5) * bin_h / gh
                for ix in range(gw):
                    x = x1 + pw * bin_w + (ix + 0.5) * bin_w / gw
                    acc += _bilinear(f, y, x)
            out[ph, pw] = acc / max(gh * gw, 1)
    return out


def roi_align_mean(maps: list[np.ndarray], boxes: np.ndarray, image_size: int, output_size: int, grid: int):
    """MG-LLaVA's object features, materialized: every map upsampled to grid x grid, concatenated on
    channels, RoIAlign per box, averaged over the bins. maps: [(B, H_k, W_k, C_k)]; boxes (B, M, 4)."""
    b, m = boxes.shape[:2]
    out = []
    for i in range(b):
        full = np.concatenate([upsample_bilinear(f[i].astype(np.float64), grid) for f in maps], -1)
        out.append(
            [roi_align(full, boxes[i, j], output_size, grid / image_size).mean((0, 1)) for j in range(m)]
        )
    return np.asarray(out)
