"""Vision-language projectors with one face, and the registry that names them.

Face: ``module(features (B, N, C), deterministic=...) -> tokens (B, T, D)``; its config (a frozen
dataclass with fields ``vision_width``, ``llm_width`` and ``dtype``, filled in by
``pargo_jax.runs.model_config``) answers ``num_tokens(N) -> T`` and ``flops(N) -> forward FLOPs of
one image``. A new projector is one :func:`register` call; ``config.model.projector = dict(name=...,
**fields)`` then builds it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax import linen as nn

from pargo_jax.configs import check_keys, field_names
from pargo_jax.models.projectors.blip2 import QFormer, QFormerConfig
from pargo_jax.models.projectors.c_abstractor import CAbstractor, CAbstractorConfig
from pargo_jax.models.projectors.mlp import MLPConfig, MLPProjector
from pargo_jax.models.projectors.pargo import ParGo, ParGoConfig
from pargo_jax.models.projectors.resampler import Resampler, ResamplerConfig
from pargo_jax.models.projectors.xformer import XFormer, XFormerConfig


@dataclasses.dataclass(frozen=True)
class ProjectorType:
    """A registry entry: config dataclass, module class, and fields the name fixes (``qformer``:
    ``num_partial=0``)."""

    config: type
    module: type[nn.Module]
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)


PROJECTORS: dict[str, ProjectorType] = {}


def register(name: str, config: type, module: type[nn.Module], **fixed: Any) -> None:
    """Makes ``config.model.projector.name = name`` build ``module(config(**fields, **fixed))``."""
    check_keys(fixed, field_names(config), f"the fixed fields of projector {name!r}")
    PROJECTORS[name] = ProjectorType(config, module, dict(fixed))


def projector_config(name: str, options: Mapping[str, Any]) -> Any:
    """The config of projector ``name`` from its ``options`` (unknown or fixed fields fail loudly)."""
    if name not in PROJECTORS:
        raise ValueError(f"Unknown projector {name!r}; registered: {sorted(PROJECTORS)}.")
    entry = PROJECTORS[name]
    options = dict(options)
    check_keys(options, field_names(entry.config), f"config.model.projector ({name})")
    clash = {k: v for k, v in options.items() if k in entry.fixed and v != entry.fixed[k]}
    if clash:
        raise ValueError(
            f"The {name} projector fixes {dict(entry.fixed)}; drop {sorted(clash)} or use another."
        )
    return entry.config(**{**options, **entry.fixed})


def projector_name(config: Any) -> str:
    """The registered name that builds ``config`` (the first registered for its class)."""
    for name, entry in PROJECTORS.items():
        if type(config) is entry.config and all(getattr(config, k) == v for k, v in entry.fixed.items()):
            return name
    raise ValueError(f"No registered projector has config class {type(config).__name__}.")


def has_text_branch(name: str) -> bool:
    """Whether projector ``name`` is a BLIP-2 Q-Former (``blip2``, ``xformer``): it reads captions in
    stage 1 (``input.qformer_tokenizer``)."""
    return name in PROJECTORS and issubclass(PROJECTORS[name].config, QFormerConfig)


def reads_detail(name: str) -> bool:
    """Whether projector ``name`` fuses an MAE's tokens (``xformer``: needs ``config.model.detail``)."""
    return name in PROJECTORS and issubclass(PROJECTORS[name].config, XFormerConfig)


def projector_module(config: Any) -> nn.Module:
    """The projector module for ``config``."""
    return PROJECTORS[projector_name(config)].module(config)


register("pargo", ParGoConfig, ParGo)
register("qformer", ParGoConfig, ParGo, num_partial=0)  # BLIP-2 style: global queries only
register("mlp", MLPConfig, MLPProjector)
register("resampler", ResamplerConfig, Resampler)
register("c_abstractor", CAbstractorConfig, CAbstractor)
register("blip2", QFormerConfig, QFormer)  # the real BLIP-2 Q-Former, text branch and heads included
register("xformer", XFormerConfig, XFormer)  # the Q-Former fused with an MAE (needs model.detail)

__all__ = [
    "PROJECTORS", "CAbstractor", "CAbstractorConfig", "MLPConfig", "MLPProjector", "ParGo", "ParGoConfig",
    "ProjectorType", "QFormer", "QFormerConfig", "Resampler", "ResamplerConfig", "XFormer", "XFormerConfig",
    "has_text_branch", "projector_config", "reads_detail", "projector_module", "projector_name", "register",
]  # fmt: skip
