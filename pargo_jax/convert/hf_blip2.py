"""Import the Q-Former of a local HF BLIP-2 directory into :class:`pargo_jax.models.projectors.blip2.QFormer`.

    cfg = qformer_config_from_hf(read_hf_config(path), llm_width=4096)
    abstract = jax.eval_shape(QFormer(cfg).init, jax.random.key(0), jnp.zeros((1, 257, cfg.vision_width)))
    params = load_qformer(path, cfg, abstract["params"])     # {"layer_0/self_qkv_kernel": array, ...}

Two layouts load (``model_type`` ``blip-2``): ``Blip2ForImageTextRetrieval`` (stage 1: ``query_tokens``,
``embeddings.*``, ``qformer.*`` with the text feed-forwards, ``vision_projection``,
``text_projection``, ``itm_head``) and ``Blip2ForConditionalGeneration`` / ``Blip2Model`` (stage 2:
``query_tokens``, ``qformer.*`` without the text branch, ``language_projection``). Every tensor is
accounted for: ``vision_model.post_layernorm`` is BLIP-2's ``ln_vision`` and becomes ours; the rest of
``vision_model.*`` and all of ``language_model.*`` belong to the tower / LLM loaders and are counted
and skipped. Our params that the checkpoint does not hold stay at their init and are named in one
log line: the LM head (LAVIS ``Qformer.cls``, which HF never has), ``temp`` (LAVIS has it, HF does
not), ``llm_proj`` of a retrieval checkpoint and the text branch (word / position embeddings, text
feed-forwards, ITC / ITM heads) of a generation checkpoint. A group of params is taken when the
checkpoint has any of its tensors, and then all of them must be there: a missing, unexpected or
mis-shaped tensor is one :class:`~pargo_jax.convert.tables.ConversionError` naming every one.

The tower itself (``vision_model.*`` but ``post_layernorm``) loads with
:func:`pargo_jax.convert.hf_vision.load_vision` as ``kind="blip2"``, its output being what ``ln_vision``
takes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import logging

from pargo_jax.configs import check_keys, field_names
from pargo_jax.convert.tables import (
    ConversionError,
    LazySource,
    Rule,
    TorchSource,
    Transform,
    convert,
    expected_shapes,
    read_torch_file,
    reshape,
    transpose,
)
from pargo_jax.models.projectors.blip2 import QFormerConfig
from pargo_jax.param_tree import flatten

MODEL_TYPE = "blip-2"
# Source tensors other loaders own (the tower, the LLM) or fixed buffers: counted, skipped.
SKIPPED = (r"vision_model\.(?!post_layernorm\.).*", r"language_model\..*", r"embeddings\.position_ids")
# Our params no HF checkpoint holds (LAVIS's Qformer.cls LM head and temp): always left at init.
NEVER_IN_HF = ("lm_dense_kernel", "lm_dense_bias", "lm_norm_scale", "lm_norm_bias", "lm_bias", "temp")
# Optional groups: taken (all of them) when the checkpoint has any of their tensors.
OPTIONAL = {
    "text branch": re.compile(
        r"word_embeddings|position_embeddings|layer_\d+/text_.*|vision_proj_.*|text_proj_.*|itm_head_.*"
    ),
    "llm_proj": re.compile(r"llm_proj_.*"),
}


def _linear(src: str, ours: str, kernel: Transform | None = transpose) -> dict[str, tuple[str, Any]]:
    """torch Linear ``src.weight`` / ``src.bias`` -> ``{ours}_kernel`` / ``{ours}_bias``."""
    return {f"{src}.weight": (f"{ours}_kernel", kernel), f"{src}.bias": (f"{ours}_bias", None)}


def _norm(src: str, ours: str) -> dict[str, tuple[str, Any]]:
    return {f"{src}.weight": (f"{ours}_scale", None), f"{src}.bias": (f"{ours}_bias", None)}


def qformer_table(cfg: QFormerConfig) -> dict[str, tuple[str, Transform | None]]:
    """Every HF BLIP-2 tensor name our Q-Former reads -> (our param path, transform); stacked parts
    carry their index (``layer_0/self_qkv_kernel[1]`` = the key)."""
    queries = (cfg.num_queries, cfg.hidden)
    table = {
        "query_tokens": ("query_tokens", reshape((1, *queries), queries)),
        **_norm("vision_model.post_layernorm", "ln_vision"),
        "embeddings.word_embeddings.weight": ("word_embeddings", None),
        "embeddings.position_embeddings.weight": ("position_embeddings", None),
        **_norm("qformer.layernorm", "embed_norm"),
        **_linear("vision_projection", "vision_proj"),
        **_linear("text_projection", "text_proj"),
        **_linear("itm_head", "itm_head"),
        **_linear("language_projection", "llm_proj"),
    }  # fmt: skip
    for i in range(cfg.layers):
        src, dst = f"qformer.encoder.layer.{i}.", f"layer_{i}/"
        for j, name in enumerate(("query", "key", "value")):
            table[f"{src}attention.attention.{name}.weight"] = (f"{dst}self_qkv_kernel[{j}]", transpose)
            table[f"{src}attention.attention.{name}.bias"] = (f"{dst}self_qkv_bias[{j}]", None)
        table |= _linear(f"{src}attention.output.dense", f"{dst}self_out")
        table |= _norm(f"{src}attention.output.LayerNorm", f"{dst}self_norm")
        if cfg.has_cross_attention(i):
            cross = f"{src}crossattention."
            table |= _linear(f"{cross}attention.query", f"{dst}cross_q")
            for j, name in enumerate(("key", "value")):
                table[f"{cross}attention.{name}.weight"] = (f"{dst}cross_kv_kernel[{j}]", transpose)
                table[f"{cross}attention.{name}.bias"] = (f"{dst}cross_kv_bias[{j}]", None)
            table |= _linear(f"{cross}output.dense", f"{dst}cross_out")
            table |= _norm(f"{cross}output.LayerNorm", f"{dst}cross_norm")
        for kind, suffix in (("query", "_query"), ("text", "")):
            table |= _linear(f"{src}intermediate{suffix}.dense", f"{dst}{kind}_fc1")
            table |= _linear(f"{src}output{suffix}.dense", f"{dst}{kind}_fc2")
            table |= _norm(f"{src}output{suffix}.LayerNorm", f"{dst}{kind}_ffn_norm")
    return table


def _hf_sections(hf: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    if hf.get("model_type") != MODEL_TYPE:
        raise ValueError(
            f"Not a BLIP-2 checkpoint: model_type is {hf.get('model_type')!r}, expected {MODEL_TYPE!r} "
            "(Blip2ForImageTextRetrieval, Blip2ForConditionalGeneration or Blip2Model)."
        )
    return (dict(hf.get(k) or {}) for k in ("qformer_config", "vision_config", "text_config"))


def qformer_config_from_hf(hf: Mapping[str, Any], **overrides) -> QFormerConfig:
    """:class:`QFormerConfig` of a BLIP-2 ``config.json`` dict; absent keys take transformers'
    defaults. ``overrides``: QFormerConfig fields (``llm_width`` of a retrieval checkpoint, whose
    ``text_config`` is a placeholder; ``dtype``, ``dropout``, ...). ``vision_eps`` is the vision
    config's ``layer_norm_eps``, which HF's ``post_layernorm`` (our ``ln_vision``) uses."""
    check_keys(overrides, field_names(QFormerConfig), "the Q-Former overrides (QFormerConfig fields)")
    qf, vision, text = _hf_sections(hf)
    act = qf.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"BLIP-2 qformer_config.hidden_act={act!r}; the Q-Former supports 'gelu' (exact).")
    fields = dict(
        num_queries=hf.get("num_query_tokens", 32),
        hidden=qf.get("hidden_size", 768),
        heads=qf.get("num_attention_heads", 12),
        layers=qf.get("num_hidden_layers", 12),
        mlp_dim=qf.get("intermediate_size", 3072),
        cross_attention_freq=qf.get("cross_attention_frequency", 2),
        vision_width=vision.get("hidden_size", qf.get("encoder_hidden_size", 1408)),
        llm_width=text.get("hidden_size", text.get("d_model", 2560)),
        vocab_size=qf.get("vocab_size", 30522),
        max_positions=qf.get("max_position_embeddings", 512),
        embed_dim=hf.get("image_text_hidden_size", 256),
        eps=qf.get("layer_norm_eps", 1e-12),
        vision_eps=vision.get("layer_norm_eps", 1e-6),
    )
    return QFormerConfig(**{**fields, **overrides})


def read_blip2(path: str) -> tuple[dict, Mapping[str, np.ndarray]]:
    """(config.json, tensors) of a local HF BLIP-2 directory (safetensors, or ``pytorch_model.bin``
    with the torch extra); a directory of another ``model_type`` is one ValueError."""
    from pargo_jax.convert.hf import read_hf_config

    hf = read_hf_config(path)
    _hf_sections(hf)
    if any(f.endswith(".safetensors") for f in os.listdir(path)):
        return hf, LazySource.from_dir(path)
    if os.path.exists(bin_file := os.path.join(path, "pytorch_model.bin")):
        return hf, TorchSource(read_torch_file(bin_file))
    raise FileNotFoundError(f"No safetensors or pytorch_model.bin in the BLIP-2 directory {path!r}.")


def _short(names) -> str:
    """Param names with layer indices folded (``layer_*/text_fc1_kernel``), sorted, comma-joined."""
    return ", ".join(sorted({re.sub(r"^layer_\d+/", "layer_*/", n) for n in names}))


def load_qformer(path: str, cfg: QFormerConfig, shapes_or_abstract: Mapping) -> dict[str, np.ndarray]:
    """``{param path: array}`` (``param_dtype``) of a :class:`QFormer` of ``cfg`` from the BLIP-2
    directory ``path``, for the params the checkpoint holds (see the module docstring); the others
    are absent from the result (keep their init) and named in one log line. ``shapes_or_abstract``:
    ``{path: shape}`` or the (abstract, possibly boxed) param tree of the model."""
    hf, source = read_blip2(path)
    what = f"BLIP-2 checkpoint {path!r}"
    ours = qformer_config_from_hf(hf)
    keys = ("num_queries", "hidden", "heads", "layers", "mlp_dim", "cross_attention_freq", "vision_width")
    differ = [
        f"{k}={getattr(ours, k)} (model: {getattr(cfg, k)})"
        for k in keys
        if getattr(ours, k) != getattr(cfg, k)
    ]
    if differ:
        raise ValueError(f"The {what} does not fit this Q-Former: {', '.join(differ)}.")
    shapes = _shapes(shapes_or_abstract)
    table = qformer_table(cfg)
    param = lambda target: target.split("[")[0]
    in_checkpoint = {param(table[n][0]) for n in source if n in table}
    groups = {name: rx for name, rx in OPTIONAL.items() if any(rx.fullmatch(p) for p in in_checkpoint)}

    def taken(p: str) -> bool:
        optional = [name for name, rx in OPTIONAL.items() if rx.fullmatch(p)]
        return p not in NEVER_IN_HF and all(name in groups for name in optional)

    expected = {p: s for p, s in shapes.items() if taken(p)}
    absent = sorted(n for n, (target, _) in table.items() if param(target) in expected and n not in source)
    rules = [Rule(re.escape(n), target, tf) for n, (target, tf) in table.items()]
    problems = [f"{len(absent)} tensor(s) missing: {', '.join(absent)}"] if absent else []
    try:
        params = convert(
            source, rules, expected, ignore=SKIPPED, dtype=np.dtype(jnp.dtype(cfg.param_dtype)), what=what
        )
    except ConversionError as e:
        problems.append(str(e).removeprefix(f"Cannot load the {what}: "))
    if problems:
        raise ConversionError(f"Cannot load the {what}: " + " | ".join(problems))
    skipped_re = [re.compile(p) for p in SKIPPED]
    skipped = sum(any(p.fullmatch(n) for p in skipped_re) for n in source)
    logging.info(
        "BLIP-2 Q-Former from %s: %d params loaded, %d tower / LLM tensors skipped; left at init (not in "
        "the checkpoint): %s.", path, len(expected), skipped, _short(set(shapes) - set(expected)) or "none",
    )  # fmt: skip
    return flatten(params)


def _shapes(shapes_or_abstract: Mapping) -> dict[str, tuple[int, ...]]:
    flat = flatten(shapes_or_abstract)
    if all(isinstance(v, tuple) for v in flat.values()):
        return {k: tuple(v) for k, v in flat.items()}
    return expected_shapes(shapes_or_abstract)
