"""Import the official ParGo projector checkpoint (ln_vision -> ParGo BERT -> llm_proj).

The release loads its checkpoint with ``strict=False`` and so silently skips a renamed projector;
this loader accounts for every tensor: projector tensors are converted, the text-branch tensors
the release deletes are ignored by name, tensors of the other components (``visual_encoder.*``,
``llm_model.*``) are left for their own loaders, and anything else is an error listing every name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from pargo_jax.convert.tables import (
    ConversionError,
    Rule,
    TorchSource,
    convert,
    expected_shapes,
    export,
    read_torch_file,
    reshape,
    transpose,
)
from pargo_jax.models.projectors.pargo import ParGo, ParGoConfig

PROJECTOR_PREFIXES = ("ParGo.", "Q_former.", "Qformer.")
OTHER_COMPONENTS = ("visual_encoder.", "llm_model.")
_LAYER = r"bert\.encoder\.layer\.(\d+)\."
# Text-branch tensors the release deletes before loading (word embeddings, MLM head, text FFNs).
TEXT_BRANCH = (
    r"bert\.embeddings\.word_embeddings\.weight",
    r"bert\.embeddings\.position_ids",
    r"cls\..*",
    _LAYER + r"intermediate\.dense\.(weight|bias)",
    _LAYER + r"output\.(dense|LayerNorm)\.(weight|bias)",
)


_BATCH_AXIS = reshape(lambda x: (1, *x.shape), lambda x: x.shape[-2:])  # query_tokens (1, Q, H) <-> (Q, H)


def projector_rules() -> list[Rule]:
    """The table: official projector tensor name (after the prefix) -> our ParGo param."""
    attn = {"attention": "self", "crossattention": "cross"}
    rules = [
        Rule(r"ln_vision\.weight", "ln_vision_scale"),
        Rule(r"ln_vision\.bias", "ln_vision_bias"),
        Rule(r"query_tokens", "query_tokens", _BATCH_AXIS),
        Rule(r"llm_proj\.weight", "llm_proj_kernel", transpose),
        Rule(r"llm_proj\.bias", "llm_proj_bias"),
        Rule(r"bert\.embeddings\.position_embeddings\.weight", "position_embeddings"),
        Rule(r"bert\.embeddings\.LayerNorm\.weight", "embed_norm_scale"),
        Rule(r"bert\.embeddings\.LayerNorm\.bias", "embed_norm_bias"),
        Rule(_LAYER + r"crossattention\.self\.query\.weight", "cross_q_kernel[{0}]", transpose),
        Rule(_LAYER + r"crossattention\.self\.query\.bias", "cross_q_bias[{0}]"),
    ]
    for i, proj in enumerate(("query", "key", "value")):
        rules += [
            Rule(_LAYER + rf"attention\.self\.{proj}\.weight", f"self_qkv_kernel[{{0}}][{i}]", transpose),
            Rule(_LAYER + rf"attention\.self\.{proj}\.bias", f"self_qkv_bias[{{0}}][{i}]"),
        ]
    for i, proj in enumerate(("key", "value")):
        rules += [
            Rule(
                _LAYER + rf"crossattention\.self\.{proj}\.weight", f"cross_kv_kernel[{{0}}][{i}]", transpose
            ),
            Rule(_LAYER + rf"crossattention\.self\.{proj}\.bias", f"cross_kv_bias[{{0}}][{i}]"),
        ]
    for src, ours in attn.items():
        rules += [
            Rule(_LAYER + rf"{src}\.output\.dense\.weight", f"{ours}_out_kernel[{{0}}]", transpose),
            Rule(_LAYER + rf"{src}\.output\.dense\.bias", f"{ours}_out_bias[{{0}}]"),
            Rule(_LAYER + rf"{src}\.output\.LayerNorm\.weight", f"{ours}_norm_scale[{{0}}]"),
            Rule(_LAYER + rf"{src}\.output\.LayerNorm\.bias", f"{ours}_norm_bias[{{0}}]"),
        ]
    return rules + [
        Rule(_LAYER + r"intermediate_query\.dense\.weight", "fc1_kernel[{0}]", transpose),
        Rule(_LAYER + r"intermediate_query\.dense\.bias", "fc1_bias[{0}]"),
        Rule(_LAYER + r"output_query\.dense\.weight", "fc2_kernel[{0}]", transpose),
        Rule(_LAYER + r"output_query\.dense\.bias", "fc2_bias[{0}]"),
        Rule(_LAYER + r"output_query\.LayerNorm\.weight", "ffn_norm_scale[{0}]"),
        Rule(_LAYER + r"output_query\.LayerNorm\.bias", "ffn_norm_bias[{0}]"),
    ]


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Tensors of a ``.safetensors`` file or a torch pickle (``.bin``/``.pth``/``.pt``) as numpy.

    Torch pickles wrapped as ``{"state_dict": ...}`` or ``{"model": ...}`` are unwrapped."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Checkpoint {path!r} does not exist.")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    if not path.endswith((".bin", ".pth", ".pt")):
        raise ValueError(f"Checkpoint {path!r}: expected a .safetensors, .bin, .pth or .pt file.")
    source = TorchSource(read_torch_file(path))
    widen = lambda x: x.astype(np.float32) if x.dtype.name == "bfloat16" else x
    return {k: widen(source[k]) for k in source}


def _canonical(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """Strips ``module.`` and the projector prefix; splits off other components' tensors."""
    ours, others, text = {}, [], []
    text_re = [re.compile(p) for p in TEXT_BRANCH]
    for name, value in state.items():
        key = name.removeprefix("module.")
        if key.startswith(OTHER_COMPONENTS):
            others.append(name)
            continue
        for prefix in PROJECTOR_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                if any(p.fullmatch(key) for p in text_re):
                    text.append(name)
                    key = None
                break
        if key is not None:
            ours[key] = value
    return ours, others, text


def infer_config(
    state: Mapping[str, np.ndarray], *, num_partial: int, num_heads: int | None, **overrides
) -> ParGoConfig:
    """ParGoConfig from tensor shapes: H, L, P+G, C_vision, D_llm, FFN width, position rows."""
    required = (
        "query_tokens",
        "ln_vision.weight",
        "llm_proj.weight",
        "bert.embeddings.position_embeddings.weight",
    )
    missing = [k for k in required if k not in state]
    if missing:
        raise ConversionError(
            f"Not a ParGo projector checkpoint: missing {', '.join(missing)} (after stripping the "
            f"prefixes 'module.' and {', '.join(PROJECTOR_PREFIXES)})."
        )
    num_queries, hidden = state["query_tokens"].shape[-2:]
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(_LAYER, k))}
    if not layer_ids:
        raise ConversionError("The checkpoint has no bert.encoder.layer.* tensors.")
    layers = max(layer_ids) + 1
    no_cross = [
        i for i in range(layers) if f"bert.encoder.layer.{i}.crossattention.self.query.weight" not in state
    ]
    if no_cross:
        raise ConversionError(
            f"Layers {no_cross} have no cross-attention (cross_attention_freq > 1); the released model "
            "has cross-attention in every layer and only that layout is supported."
        )
    ffn = state.get("bert.encoder.layer.0.intermediate_query.dense.weight")
    heads = num_heads or hidden // 64
    if num_partial > num_queries:
        raise ValueError(f"num_partial={num_partial} exceeds the checkpoint's {num_queries} queries.")
    return ParGoConfig(
        num_partial=num_partial,
        num_global=num_queries - num_partial,
        hidden=hidden,
        heads=heads,
        layers=layers,
        mlp_dim=ffn.shape[0] if ffn is not None else 4 * hidden,
        vision_width=state["ln_vision.weight"].shape[0],
        llm_width=state["llm_proj.weight"].shape[0],
        max_positions=state["bert.embeddings.position_embeddings.weight"].shape[0],
        **overrides,
    )


def load_projector(
    path: str, num_heads: int | None = None, *, num_partial: int = 288, dtype=np.float32, **overrides
) -> tuple[ParGo, dict]:
    """``(module, variables)`` with ``module.apply(variables, features)`` mapping raw tower features
    (B, N, C_vision) to (B, P+G, D_llm) like the official ln_vision -> ParGo -> llm_proj.

    ``num_heads`` defaults to H // 64; ``num_partial`` cannot be read from weights (released: 288).
    ``overrides`` set other ParGoConfig fields (``impl``, ``cpp``, ``dtype``, ...)."""
    module, params, counts = _projector(read_state_dict(path), num_partial, num_heads, dtype, overrides, path)
    logging.info(
        "Loaded ParGo projector from %s: %d tensors converted, %d text-branch tensors ignored, "
        "%d tower/LLM tensors left for their loaders.",
        path,
        *counts,
    )
    return module, {"params": params}


def _projector(state, num_partial, num_heads, dtype, overrides, path):
    """(ParGo, params, (converted, text-branch, other components) counts) of a checkpoint's tensors."""
    ours, others, text = _canonical(state)
    config = infer_config(ours, num_partial=num_partial, num_heads=num_heads, **overrides)
    module = ParGo(config)
    features = jax.ShapeDtypeStruct((1, max(config.num_partial, 1), config.vision_width), np.float32)
    abstract = jax.eval_shape(module.init, jax.random.key(0), features)
    expected = expected_shapes(abstract["params"])
    params = convert(ours, projector_rules(), expected, dtype=dtype, what=f"ParGo checkpoint {path!r}")
    return module, params, (len(ours), len(text), len(others))


# --- the whole official model ----------------------------------------------------------------------
LLM_PREFIX = "llm_model."
RELEASED_LORA_ALPHA = 512.0  # configs/MMEBench_interLM2-7B.json: lora_r 256, lora_alpha 512 on wqkv


def _llm_tensors(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The checkpoint's LLM tensors in HF names: (base weights, PEFT LoRA tensors). PEFT wraps the model
    as ``base_model.model.`` and a LoRA-wrapped Linear keeps its weight as ``<name>.base_layer.weight``."""
    base, lora = {}, {}
    for key, value in state.items():
        name = key.removeprefix("module.")
        if not name.startswith(LLM_PREFIX):
            continue
        name = name.removeprefix(LLM_PREFIX).removeprefix("base_model.model.")
        if ".lora_" in name:
            lora[name] = value
        else:
            base[name.replace(".base_layer.", ".")] = value
    return base, lora


def load_model(
    checkpoint: str,
    llm_path: str,
    *,
    num_partial: int = 288,
    num_heads: int | None = None,
    vision_heads: int | None = None,
    lora_alpha: float = RELEASED_LORA_ALPHA,
    image_token_id: int = 0,
    dtype=np.float32,
    scan_layers: bool = False,
    **projector_overrides,
):
    """The official ParGo model, runnable: ``(VisionLanguageModel, {"params": ...})``.

    EVA02 from ``visual_encoder.*`` (last block, no final norm, CLS dropped), ParGo with ``ln_vision``
    and ``llm_proj`` (as :func:`load_projector`), and the LLM from ``llm_path`` (config, weights)
    with any LLM weights the checkpoint saved put over it and the checkpoint's LoRA
    (``llm_model.base_model.model.*.lora_A/B``, r from the tensors, ``lora_alpha`` as released)
    merged into the weights. Every tensor is accounted for: converted, or a text-branch tensor the
    release deletes; anything else is an error listing it. ``image_token_id``: the id a caller puts at
    the image positions (the release splices embeddings at ``<ImageHere>``, not a vocabulary token).
    """
    import dataclasses

    from pargo_jax.convert import hf, hf_vision
    from pargo_jax.lora import merge_lora
    from pargo_jax.models.mllm import MLLMConfig, VisionLanguageModel
    from pargo_jax.param_tree import flatten, unflatten

    state = {k.removeprefix("module."): v for k, v in read_state_dict(checkpoint).items()}
    tower, tower_vars = hf_vision.load_eva02(
        state, dtype, prefix="visual_encoder.", heads=vision_heads, drop_cls=True, final_norm=False
    )
    projector, proj_params, (n_proj, n_text, _) = _projector(
        state, num_partial, num_heads, dtype, projector_overrides, checkpoint
    )
    base, lora = _llm_tensors(state)
    kind = hf.read_hf_config(llm_path)["model_type"]
    llm, llm_vars = hf.load_llm(
        llm_path, dtype, overlay=base, fused_qkv=kind == "internlm2", scan_layers=scan_layers
    )
    llm_cfg, llm_params = llm.config, llm_vars["params"]
    if lora:
        modules = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora})
        rank = next(v.shape[0] for n, v in lora.items() if ".lora_A" in n)
        peft = dict(r=rank, lora_alpha=lora_alpha, target_modules=modules)
        lora_cfg = dataclasses.replace(llm_cfg, **hf.peft_overrides(peft, kind))
        adapters = hf.peft_params(lora, lora_cfg, kind, what=f"LoRA of {checkpoint!r}")
        llm_params = merge_lora(unflatten({**flatten(llm_params), **adapters}), lora_cfg)
    vision_width = tower.config.width
    if projector.config.vision_width != vision_width or projector.config.llm_width != llm_cfg.hidden_size:
        raise ConversionError(
            f"{checkpoint!r}: ParGo maps {projector.config.vision_width} -> {projector.config.llm_width} but "
            f"the tower is {vision_width} wide and the LLM {llm_cfg.hidden_size}."
        )
    from data_pipelines.images import CLIP_MEAN, CLIP_STD

    mcfg = MLLMConfig(tower.config, projector.config, llm_cfg, image_token_id, CLIP_MEAN, CLIP_STD)
    logging.info(
        "Loaded the official ParGo model from %s + %s: EVA02 tower, %d projector tensors (%d text-branch "
        "ignored), %d LLM weights over %s, %d LoRA tensors merged.",
        checkpoint, llm_path, n_proj, n_text, len(base), llm_path, len(lora),
    )  # fmt: skip
    params = {"vision_tower": tower_vars["params"], "projector": proj_params, "llm": llm_params}
    return VisionLanguageModel(mcfg), {"params": params}


def to_official_state_dict(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our projector params -> the official state dict (``ln_vision``, ``query_tokens``,
    ``ParGo.bert...``, ``llm_proj``), loadable by the released PyTorch model with ``strict=True``
    once its deleted text-branch modules are dropped. The inverse of :func:`load_projector`'s table."""
    out = export(params, projector_rules(), what="ParGo projector")
    return {("ParGo." if k.startswith("bert.") else "") + k: v for k, v in out.items()}


def to_official_checkpoint(mcfg, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A model the release can run (EVA02 tower, ParGo released with raster windows over one crop, an
    InternLM2 LLM) as the release's whole-model state dict: ``visual_encoder.*`` in EVA-CLIP names,
    ``ln_vision`` / ``query_tokens`` / ``ParGo.bert.*`` / ``llm_proj``, and the LLM under PEFT's
    ``llm_model.base_model.model.`` (``wqkv`` as ``base_layer``; a LoRA the model was trained with is
    merged first, so the release's own LoRA starts at its identity init). ValueError names why a model
    does not fit. :func:`load_model` reads it back to the same params."""
    from pargo_jax.convert import hf, hf_vision
    from pargo_jax.lora import merged
    from pargo_jax.param_tree import flat_arrays

    v, p, llm = mcfg.vision, mcfg.projector, mcfg.llm
    why = [
        f"the tower is {v.kind}, the release runs EVA02" if v.kind != "eva02" else "",
        "the projector is not ParGo" if not isinstance(p, ParGoConfig) else "",
        f"the LLM is {llm.family}, the release runs InternLM2" if llm.family != "internlm2" else "",
    ]
    if isinstance(p, ParGoConfig):
        why += [
            f"cpp={p.cpp!r}" if p.cpp != "released" else "",
            f"layout={p.layout!r}" if p.layout != "raster" else "",
            f"num_crops={p.num_crops}" if p.num_crops != 1 else "",
        ]
    why = [w for w in why if w]
    if why:
        raise ValueError("not a model the official release can run: " + "; ".join(why))
    out = {f"visual_encoder.{k}": x for k, x in export(
        flat_arrays(params["vision_tower"]), hf_vision.eva02_rules(v.heads, "evaclip"), what="EVA02 tower"
    ).items()}  # fmt: skip
    out.update(to_official_state_dict(flat_arrays(params["projector"])))
    llm_params, llm = merged(params["llm"], llm)
    _, tensors = hf.export_llm(llm_params, llm, "internlm2")
    for name, x in tensors.items():
        peft = name.replace("attention.wqkv.weight", "attention.wqkv.base_layer.weight")
        out[f"{LLM_PREFIX}base_model.model.{peft}"] = x
    return out
