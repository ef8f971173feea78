"""A run: ``config.model`` (+ the checkpoints it names) -> :class:`MLLMConfig`, mesh and first params,
and a run's workdir (written by :func:`save_run`, read back by :func:`load_workdir`). Training,
prediction, evaluation, export and the benchmarks all start their models here.

    mcfg = runs.model_config(config, tokenizer)        # MLLMConfig: tower, projector, LLM shapes
    parts = factory.build(mcfg, mesh)                  # module, abstract params and their shardings
    params = runs.init_params(parts, config)           # random init + pretrained parts + init_from
    run = runs.load_workdir("workdir/sft")             # a trained run: model, params, tokenizer, ...

A run's workdir is self-contained: ``config.json`` (the experiment config, with ``box_codec``, how its
text writes boxes), ``model.json`` (the resolved :class:`MLLMConfig`, so the tower / LLM checkpoints
it started from are not needed to use it), ``tokenizer/`` and ``checkpoints/``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath
from flax import linen as nn

from data_pipelines.boxes import BoxCodec
from data_pipelines.text import load_tokenizer
from pargo_jax import checkpoints, configs, sharding
from pargo_jax.convert import bert, hf, hf_blip2, hf_mae, hf_vision
from pargo_jax.convert.tables import expected_shapes
from pargo_jax.models import projectors
from pargo_jax.models.convnext import CONVNEXT_PRESETS, ConvNeXtConfig
from pargo_jax.models.factory import (
    MODEL_FILE,
    PARTS,
    ModelParts,
    build,
    model_config_from_dict,
    model_config_to_dict,
)
from pargo_jax.models.fusion import FusionConfig
from pargo_jax.models.llm import LLMConfig
from pargo_jax.models.mae import MAEConfig
from pargo_jax.models.mllm import DetailConfig, HighResConfig, MLLMConfig, VisionLanguageModel
from pargo_jax.models.vision import VisionConfig, vision_preset
from pargo_jax.param_tree import flatten, unflatten

TOKENIZER_DIR = "tokenizer"
MODEL_KEYS = {"vision", "projector", "llm", "dtype", "frozen_dtype", "high_res", "detail"}
DETAIL_KEYS = {"path", "config", "mask_ratio", "mean", "std"}
HIGH_RES_KEYS = {"path", "preset", "image_size", "fusion", "max_boxes", "roi_output", "roi_grid"}
VISION_KEYS = {"path", "format", "preset", "overrides"}
LLM_KEYS = {"path", "config", "overrides"}


# --- config.model -> MLLMConfig ----------------------------------------------------------------------
def vision_config(v: Mapping[str, Any], dtype: str) -> VisionConfig:
    """``config.model.vision``: a checkpoint (``path`` + ``format``) or a named ``preset``, then
    ``overrides`` (VisionConfig fields)."""
    configs.check_keys(v, VISION_KEYS, "config.model.vision")
    overrides = dict(v.get("overrides") or {})
    if v.get("path"):
        path = configs.require_path(v["path"], "model.vision")
        base = hf_vision.vision_config_from(path, v.get("format", "hf"), heads=overrides.get("heads"))
    else:
        base = vision_preset(v.get("preset", "tiny"))
    configs.check_keys(overrides, configs.field_names(VisionConfig), "config.model.vision.overrides")
    return base.replace(**{**overrides, "dtype": jnp.dtype(dtype)})


SCAN_FROM_LAYERS = 8  # LLMs this deep scan their layers unless told otherwise (one compiled layer)


def llm_config(m: Mapping[str, Any], dtype: str, vocab_size: int) -> LLMConfig:
    """``config.model.llm``: an HF checkpoint ``path`` or random-init ``config`` fields, then
    ``overrides``. ``vocab_size`` (the tokenizer's) is the default and the minimum; ``scan_layers``
    defaults to on from :data:`SCAN_FROM_LAYERS` layers."""
    configs.check_keys(m, LLM_KEYS, "config.model.llm")
    overrides = dict(m.get("overrides") or {})
    configs.check_keys(overrides, configs.field_names(LLMConfig), "config.model.llm.overrides")
    if m.get("path"):
        path = configs.require_path(m["path"], "model.llm")
        llm = hf.config_from_hf(hf.read_hf_config(path), **overrides)
    else:
        fields = {"vocab_size": vocab_size, **dict(m.get("config") or {}), **overrides}
        llm = configs.dataclass_from(LLMConfig, fields, "config.model.llm.config")
    llm = dataclasses.replace(llm, dtype=jnp.dtype(dtype))
    if "scan_layers" not in overrides and "scan_layers" not in (m.get("config") or {}):
        llm = dataclasses.replace(llm, scan_layers=llm.num_layers >= SCAN_FROM_LAYERS)
    if llm.vocab_size < vocab_size:
        raise ValueError(
            f"The tokenizer has {vocab_size} tokens but the LLM only {llm.vocab_size} embeddings."
        )
    return llm


def high_res_config(h: Mapping[str, Any], low_width: int, dtype: str) -> HighResConfig:
    """``config.model.high_res`` (MG-LLaVA): a ConvNeXt checkpoint ``path`` (timm / OpenCLIP) or a
    ``preset`` of :data:`CONVNEXT_PRESETS`, its ``image_size``, ``fusion`` (FusionConfig fields:
    ``mode``, ``zero_init``, ``depthwise``), ``max_boxes`` (object tokens; 0: none), ``roi_output``,
    ``roi_grid``."""
    configs.check_keys(h, HIGH_RES_KEYS, "config.model.high_res")
    size = int(h.get("image_size", 768))
    if h.get("path"):
        path = configs.require_path(h["path"], "model.high_res")
        tower = hf_vision.convnext_config_from(path, size)
    else:
        preset = h.get("preset", "convnext_large")
        if preset not in CONVNEXT_PRESETS:
            raise ValueError(
                f"config.model.high_res.preset={preset!r}; choose from {sorted(CONVNEXT_PRESETS)}."
            )
        tower = ConvNeXtConfig(**{**CONVNEXT_PRESETS[preset], "image_size": size})
    tower = dataclasses.replace(tower, dtype=dtype)
    fusion = dict(h.get("fusion") or {})
    configs.check_keys(fusion, {"mode", "zero_init", "depthwise"}, "config.model.high_res.fusion")
    return HighResConfig(
        tower=tower, fusion=FusionConfig(low_width, tower.dims[-1], dtype=dtype, **fusion),
        max_boxes=int(h.get("max_boxes", 0)), roi_output=int(h.get("roi_output", 56)),
        roi_grid=int(h.get("roi_grid", 192)),
    )  # fmt: skip


def detail_config(d: Mapping[str, Any], dtype: str) -> DetailConfig:
    """``config.model.detail`` (X-Former's MAE): an HF ViTMAE checkpoint ``path`` or random-init
    ``config`` (MAEConfig fields), the stage-1 ``mask_ratio`` and the MAE's pixel ``mean`` / ``std``."""
    configs.check_keys(d, DETAIL_KEYS, "config.model.detail")
    fields = dict(d.get("config") or {})
    configs.check_keys(fields, configs.field_names(MAEConfig), "config.model.detail.config")
    if d.get("mask_ratio") is not None:
        fields["mask_ratio"] = float(d["mask_ratio"])
    if d.get("path"):
        mae = hf_mae.mae_config(configs.require_path(d["path"], "model.detail")).replace(**fields)
    else:
        mae = configs.dataclass_from(MAEConfig, fields, "config.model.detail.config")
    pixels = {k: tuple(float(x) for x in d[k]) for k in ("mean", "std") if d.get(k)}
    return DetailConfig(mae=mae.replace(dtype=jnp.dtype(dtype)), **pixels)


def qformer_vocab(config: ml_collections.ConfigDict, given: int | None) -> int:
    """A Q-Former's vocabulary: ``model.projector.vocab_size`` when set, else its tokenizer's
    (``input.qformer_tokenizer``), else BERT-base's with ``[DEC]`` (30523)."""
    path = config.input.get("qformer_tokenizer")
    if not path:
        return int(given or 30523)
    from data_pipelines.text import load_qformer_tokenizer

    size = load_qformer_tokenizer(path).vocab_size
    if given is not None and int(given) < size:
        raise ValueError(
            f"model.projector.vocab_size={given} but input.qformer_tokenizer has {size} tokens; drop it or "
            "raise it."
        )
    return int(given or size)


def model_config(config: ml_collections.ConfigDict, tokenizer) -> MLLMConfig:
    """The :class:`MLLMConfig` of ``config.model``, the checkpoints it names, the tokenizer (vocabulary,
    image token) and ``config.input`` (pixel mean / std for on-device normalization)."""
    m = config.model
    configs.check_keys(m, MODEL_KEYS, "config.model")
    dtype = m.get("dtype", "float32")
    vision = vision_config(m.vision, dtype)
    llm = llm_config(m.llm, dtype, tokenizer.vocab_size)
    options = dict(m.projector)
    name = options.pop("name", "pargo")
    options.pop("init_from_bert", None)  # where the weights start, not the model: see init_params
    blip2 = options.pop("init_from_blip2", None)
    if blip2:  # the Q-Former's shape defaults to the checkpoint's
        hf_cfg = hf.read_hf_config(configs.require_path(blip2, "model.projector.init_from_blip2"))
        shape = dataclasses.asdict(hf_blip2.qformer_config_from_hf(hf_cfg))
        options = {**{k: v for k, v in shape.items() if k not in ("vision_width", "llm_width")}, **options}
    high_res = high_res_config(m.high_res, vision.width, dtype) if m.get("high_res") else None
    width = high_res.fusion.out_dim if high_res else vision.width
    options.update(vision_width=width, llm_width=llm.hidden_size, dtype=dtype)
    detail = detail_config(m.detail, dtype) if m.get("detail") else None
    reads_detail = projectors.reads_detail(name)
    if detail and not reads_detail:
        raise ValueError(
            f"config.model.detail (an MAE) needs a projector that reads it (xformer), not {name!r}."
        )
    if projectors.has_text_branch(name):
        options["vocab_size"] = qformer_vocab(config, options.get("vocab_size"))
    if reads_detail:
        if not detail:
            raise ValueError(f"The {name} projector fuses an MAE's tokens: set config.model.detail.")
        options.update(detail_width=detail.mae.width, decoder_width=detail.mae.decoder_width)
    projector = projectors.projector_config(name, options)
    if getattr(projector, "num_partial", 0) and vision.class_token and not vision.drop_cls:
        raise ValueError(
            f"The {vision.kind} tower puts a CLS token before its {vision.grid**2} patches, and ParGo's "
            "partial windows need patches only: set config.model.vision.overrides.drop_cls=True."
        )
    return MLLMConfig(
        vision=vision,
        projector=projector,
        llm=llm,
        image_token_id=tokenizer.image_token_id,
        pixel_mean=tuple(config.input.mean),
        pixel_std=tuple(config.input.std),
        high_res=high_res,
        detail=detail,
    )


def save_run(workdir: str, config: ml_collections.ConfigDict, mcfg: MLLMConfig, tokenizer) -> None:
    """Writes what :func:`load_workdir` needs besides the checkpoints (process 0 only)."""
    if jax.process_index() != 0:
        return
    configs.save_run_config(config, workdir)
    text = json.dumps(model_config_to_dict(mcfg), indent=2) + "\n"
    (epath.Path(workdir) / MODEL_FILE).write_text(text)
    tokenizer.save(str(epath.Path(workdir) / TOKENIZER_DIR))


# --- params ------------------------------------------------------------------------------------------
def load_pretrained(config: ml_collections.ConfigDict, shardings: Mapping[str, Any]) -> dict[str, Any]:
    """Params of the tower / LLM read from the checkpoints ``config.model`` names (on the mesh)."""
    loaded = {}
    v, llm = config.model.vision, config.model.llm
    if v.get("path"):
        fmt = v.get("format", "hf")
        load = hf_vision.load_vision if fmt == "hf" else hf_vision.load_eva02
        _, variables = load(v.path, shardings=shardings["vision_tower"], **dict(v.get("overrides") or {}))
        loaded["vision_tower"] = variables["params"]
    if llm.get("path"):
        overrides = dict(llm.get("overrides") or {})
        _, variables = hf.load_llm(llm.path, shardings=shardings["llm"], **overrides)
        loaded["llm"] = variables["params"]
    high_res = config.model.get("high_res") or {}
    if high_res.get("path"):
        _, variables = hf_vision.load_convnext(high_res["path"], int(high_res.get("image_size", 768)))
        loaded["high_res_tower"] = jax.device_put(variables["params"], shardings["high_res_tower"])
    detail = config.model.get("detail") or {}
    if detail.get("path"):
        _, variables = hf_mae.load_mae(detail["path"])
        loaded["detail_tower"] = jax.device_put(variables["params"], shardings["detail_tower"])
    return loaded


def init_params(parts: ModelParts, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A training run's first params: sharded random init (never materialized on one host) of the
    parts no checkpoint provides, the pretrained tower / LLM, then ``checkpoint.init_from``'s parts."""
    loaded = load_pretrained(config, parts.shardings)  # parts read from checkpoints are not initialized
    fresh = [k for k in parts.shardings if k not in loaded]
    init = lambda r: {k: v for k, v in nn.unbox(parts.init(r)).items() if k in fresh}
    params = jax.jit(init, out_shardings={k: parts.shardings[k] for k in fresh})(jax.random.key(config.seed))
    params.update(loaded)
    bert = config.model.projector.get("init_from_bert")
    if bert:
        path = configs.require_path(bert, "model.projector.init_from_bert")
        params["projector"] = _projector_from_bert(parts, params["projector"], path)
    blip2 = config.model.projector.get("init_from_blip2")
    if blip2:
        path = configs.require_path(blip2, "model.projector.init_from_blip2")
        params["projector"] = _projector_from_blip2(parts, params["projector"], path)
    init_from = config.checkpoint.get("init_from")
    if init_from:
        configs.require_path(init_from, "checkpoint.init_from")
        for part in config.checkpoint.get("init_from_parts", ("projector",)):
            if part not in PARTS:
                raise ValueError(f"checkpoint.init_from_parts names {part!r}; choose from {PARTS}.")
            params[part] = checkpoints.restore_subtree(
                init_from, parts.abstract_on_mesh(part), f"params/{part}"
            )
            logging.info("Initialized %s from %s.", part, init_from)
    return params


def _projector_from_bert(parts: ModelParts, fresh: dict[str, Any], path: str) -> dict[str, Any]:
    """The ``fresh`` projector params with what the release's ``init_ParGo`` takes from BERT put in."""
    taken = bert.pargo_from_bert(path, parts.mcfg.projector, expected_shapes(parts.abstract["projector"]))
    shardings = parts.shardings["projector"]
    return {**fresh, **{k: jax.device_put(v, shardings[k]) for k, v in taken.items()}}


def _projector_from_blip2(parts: ModelParts, fresh: dict[str, Any], path: str) -> dict[str, Any]:
    """The ``fresh`` projector params with the Q-Former of the HF BLIP-2 directory ``path`` put in
    (an ``xformer``'s under ``qformer/``; its fusion stays fresh)."""
    cfg = parts.mcfg.projector
    if not isinstance(cfg, projectors.QFormerConfig):
        raise ValueError("model.projector.init_from_blip2 applies to the blip2 and xformer projectors.")
    nested = isinstance(cfg, projectors.XFormerConfig)
    abstract = parts.abstract["projector"]
    taken = hf_blip2.load_qformer(path, cfg, abstract["qformer"] if nested else abstract)
    prefix = "qformer/" if nested else ""
    flat = flatten(fresh)
    for k, v in taken.items():
        flat[prefix + k] = jax.device_put(v.astype(flat[prefix + k].dtype), flat[prefix + k].sharding)
    return unflatten(flat)


# --- a trained run -----------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainedModel:
    """What :func:`load_workdir` returns: everything predict, evaluate and export need."""

    model: VisionLanguageModel
    params: Any
    mcfg: MLLMConfig
    tokenizer: Any
    config: ml_collections.ConfigDict
    step: int
    mesh: jax.sharding.Mesh
    workdir: str

    @property
    def box_codec(self) -> BoxCodec:
        """The codec the run's data wrote boxes in, and so its answers (``config.box_codec``)."""
        return BoxCodec.of_run(self.config)


def mesh_for(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    """The mesh ``config.mesh`` asks for over ``devices`` (default: all; ``num_devices`` the first N)."""
    spec = dict(config.mesh)
    num = spec.pop("num_devices", None)
    devices = list(devices if devices is not None else jax.devices())
    return sharding.make_mesh(spec, devices[:num] if num else devices)


def read_model_config(workdir: str) -> MLLMConfig:
    path = epath.Path(workdir) / MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"No {MODEL_FILE} in {workdir!r}: it is not the workdir of a training run.")
    return model_config_from_dict(json.loads(path.read_text()))


def load_workdir(
    workdir: str, step: int | None = None, mesh: jax.sharding.Mesh | None = None
) -> TrainedModel:
    """The model a run trained, with the params of checkpoint ``step`` (None: the newest) restored
    straight onto ``mesh`` (default: the run's ``config.mesh`` over this host's devices)."""
    config = configs.load_run_config(workdir)
    mcfg = read_model_config(workdir)
    directory = checkpoints.step_dir(workdir, step)
    mesh = mesh or mesh_for(config)
    parts = build(mcfg, mesh)
    params = checkpoints.restore_subtree(directory, parts.abstract_on_mesh(), "params")
    tokenizer = load_tokenizer(str(epath.Path(workdir) / TOKENIZER_DIR))
    return TrainedModel(parts.model, params, mcfg, tokenizer, config, int(directory.name), mesh, str(workdir))
