"""MG-LLaVA's Conv-Gate fusion in plain torch, written from its formula (NCHW convolutions, torch's
own GELU and Linear), with the four modes of the release's fuse_model.py."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DualPathFusion(nn.Module):
    def __init__(self, low_dim: int, high_dim: int, mode: str = "gate_sum"):
        super().__init__()
        self.mode = mode
        self.slow_conv = nn.Conv2d(high_dim, high_dim, 1)
        self.slow_proj = nn.Conv2d(high_dim, low_dim, 1)
        self.fast_conv = nn.Conv2d(low_dim, low_dim, 7, padding=3, groups=low_dim)
        self.fast_proj = nn.Conv2d(low_dim, low_dim, 1)
        self.gate = nn.Sequential(nn.Linear(2 * low_dim, low_dim // 2), nn.GELU(), nn.Linear(low_dim // 2, 1))

    def forward(self, low, high):  # low (B, N, d), high (B, C, h, w)
        b, n, d = low.shape
        if self.mode == "concat":
            return torch.cat([low, high.flatten(2).transpose(1, 2)], -1)
        h = self.slow_proj(F.gelu(self.slow_conv(high))).flatten(2).transpose(1, 2)
        side = math.isqrt(n)
        grid = low.transpose(1, 2).reshape(b, d, side, side)
        low = (grid + self.fast_proj(F.gelu(self.fast_conv(grid)))).flatten(2).transpose(1, 2)
        if self.mode == "conv_concat":
            return torch.cat([low, h], -1)
        g = torch.tanh(self.gate(torch.cat([low, h], -1).mean(1)))[:, None]
        return low + g * h if self.mode == "gate_sum" else torch.cat([low, g * h], -1)
