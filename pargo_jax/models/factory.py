"""The model of an :class:`MLLMConfig`: its module, abstract params and their shardings on a mesh, and
the config as JSON (a run's ``model.json``). Nothing here reads a checkpoint or an experiment config:
:mod:`pargo_jax.runs` turns ``config.model`` into an :class:`MLLMConfig` and params.

    parts = factory.build(mcfg, mesh)                  # module, abstract params and their shardings
    d = factory.model_config_to_dict(mcfg)             # JSON-ready; model_config_from_dict reads it back
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from pargo_jax import configs, sharding
from pargo_jax.models import projectors
from pargo_jax.models.convnext import ConvNeXtConfig
from pargo_jax.models.fusion import FusionConfig
from pargo_jax.models.llm import LLMConfig, RopeScaling
from pargo_jax.models.mae import MAEConfig
from pargo_jax.models.mllm import DetailConfig, HighResConfig, MLLMConfig, VisionLanguageModel
from pargo_jax.models.vision import VisionConfig

MODEL_FILE = "model.json"  # where a run keeps model_config_to_dict's JSON
PARTS = ("vision_tower", "projector", "llm", "high_res_tower", "fusion", "box_projector", "detail_tower")


# --- MLLMConfig <-> model.json ----------------------------------------------------------------------
def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, (jnp.dtype, np.dtype, type)):
        return jnp.dtype(value).name
    return value


def _fields(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    """JSON values back to dataclass field values: lists -> tuples, dtype names -> dtypes."""
    out = {}
    for k, v in d.items():
        if k in ("dtype", "param_dtype"):
            v = jnp.dtype(v)
        elif isinstance(v, list):
            v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        out[k] = v
    configs.check_keys(out, configs.field_names(cls), f"{MODEL_FILE} ({cls.__name__})")
    return out


def model_config_to_dict(mcfg: MLLMConfig) -> dict[str, Any]:
    d = _plain(mcfg)
    d["projector"] = {"name": projectors.projector_name(mcfg.projector), **d["projector"]}
    return d


def model_config_from_dict(d: Mapping[str, Any]) -> MLLMConfig:
    d = dict(d)
    proj = dict(d.pop("projector"))
    entry = projectors.PROJECTORS[proj.pop("name")]
    llm = _fields(LLMConfig, d.pop("llm"))
    if llm.get("rope_scaling"):
        llm["rope_scaling"] = RopeScaling(**llm["rope_scaling"])
    high_res = d.pop("high_res", None)
    if high_res:
        high_res = dict(high_res)
        tower = ConvNeXtConfig(**_fields(ConvNeXtConfig, high_res.pop("tower")))
        fusion = FusionConfig(**_fields(FusionConfig, high_res.pop("fusion")))
        high_res = HighResConfig(tower=tower, fusion=fusion, **_fields(HighResConfig, high_res))
    detail = d.pop("detail", None)
    if detail:
        detail = dict(detail)
        mae = MAEConfig(**_fields(MAEConfig, detail.pop("mae")))
        detail = DetailConfig(mae=mae, **_fields(DetailConfig, detail))
    return MLLMConfig(
        vision=VisionConfig(**_fields(VisionConfig, d.pop("vision"))),
        projector=entry.config(**_fields(entry.config, proj)),
        llm=LLMConfig(**llm),
        high_res=high_res,
        detail=detail,
        **_fields(MLLMConfig, d),
    )


# --- module, abstract params, shardings -------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelParts:
    """A model before it has weights: ``init(rng)`` gives boxed random params; ``abstract`` is the
    unboxed param tree of ``jax.ShapeDtypeStruct``; ``shardings`` its NamedShardings on the mesh."""

    mcfg: MLLMConfig
    model: VisionLanguageModel
    init: Callable[[jax.Array], Any]
    abstract: Any
    shardings: Any

    def abstract_on_mesh(self, part: str | None = None) -> Any:
        """``abstract`` (or one part of it) with each leaf's sharding set, for restoring."""
        tree, shards = (self.abstract, self.shardings) if part is None else (
            self.abstract[part], self.shardings[part]
        )  # fmt: skip
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shards)


def example_inputs(mcfg: MLLMConfig, batch: int = 1, seq: int = 8) -> dict[str, jax.ShapeDtypeStruct]:
    size = mcfg.image_size
    out = {
        "image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
        "input_ids": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
        "attention_mask": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
    }
    if mcfg.high_res and mcfg.high_res.max_boxes:
        out["boxes"] = jax.ShapeDtypeStruct((batch, mcfg.high_res.max_boxes, 4), jnp.float32)
    return out


def build(mcfg: MLLMConfig, mesh: jax.sharding.Mesh) -> ModelParts:
    """The module of ``mcfg`` and its params' shapes and shardings on ``mesh`` (nothing materialized)."""
    model = VisionLanguageModel(mcfg)
    inputs = example_inputs(mcfg)

    def init(rng):
        x = {k: jnp.zeros(s.shape, s.dtype) for k, s in inputs.items()}
        return model.init(rng, x["image"], x["input_ids"], x["attention_mask"], boxes=x.get("boxes"))[
            "params"
        ]

    boxed = jax.eval_shape(init, jax.random.key(0))
    with nn.logical_axis_rules(sharding.LOGICAL_RULES):
        shardings = sharding.logical_shardings(boxed, mesh)
    abstract = jax.eval_shape(lambda r: nn.unbox(init(r)), jax.random.key(0))
    return ModelParts(mcfg, model, init, abstract, shardings)
