"""Random weights for torch references, so that parity tests exercise every tensor."""

from __future__ import annotations

import torch
from torch import nn


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (LayerNorms too), so parity tests exercise every tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.5 if "LayerNorm" in name or "ln_vision" in name else 0.05
            offset = 1.0 if name.endswith("weight") and ("LayerNorm" in name or "ln_vision" in name) else 0.0
            p.copy_(offset + scale * torch.randn(p.shape, generator=g))
    return module
