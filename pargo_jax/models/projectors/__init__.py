"""Vision-language projectors with one face: ``module(features (B, N, C)) -> tokens (B, T, D)`` and
``module.config.num_tokens(N) -> T``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import linen as nn

from pargo_jax.models.projectors.mlp import MLPConfig, MLPProjector
from pargo_jax.models.projectors.pargo import ParGo, ParGoConfig

PROJECTORS = ("pargo", "qformer", "mlp")


def build_projector(name: str, options: Mapping[str, Any] | None = None) -> nn.Module:
    """``pargo`` (partial + global queries), ``qformer`` (ParGo with no partial queries) or ``mlp``."""
    options = dict(options or {})
    if name == "pargo":
        return ParGo(ParGoConfig(**options))
    if name == "qformer":
        if options.setdefault("num_partial", 0) != 0:
            raise ValueError("The qformer projector has no partial queries; drop num_partial or use 'pargo'.")
        options.setdefault("num_global", 32)
        return ParGo(ParGoConfig(**options))
    if name == "mlp":
        return MLPProjector(MLPConfig(**options))
    raise ValueError(f"Unknown projector {name!r}; choose one of {PROJECTORS}.")


__all__ = ["PROJECTORS", "MLPConfig", "MLPProjector", "ParGo", "ParGoConfig", "build_projector"]
