"""Import HF ``ViTMAEForPreTraining`` directories into :class:`pargo_jax.models.mae.MAE`.

    module, variables = load_mae("/ckpt/vit-mae-base", norm_pix_loss=True)
    out = module.apply(variables, pixels, noise)          # MAEOutput: loss, logits, mask, ids_restore
    save_mae("/tmp/my-mae", variables["params"], module.config)   # and back: an HF directory

Both transformers v5's module names (``vit.layers.N.attention.q_proj``, ``mlp.fc1``) and the v4 names
of the released checkpoints (``vit.encoder.layer.N.attention.attention.query``, ``intermediate.dense``,
``output.dense``, ``decoder.decoder_layers.N``) import, as does what v5's ``save_pretrained`` writes:
v4 names with the decoder blocks under ``decoder.decoder_encoder.layer.N``.

Every tensor is accounted for: the two fixed position tables (``vit.embeddings.position_embeddings``,
``decoder.decoder_pos_embed``) must equal the 2-D sin-cos tables the model computes (a model built
fresh by transformers v5 leaves them zero, so its directory is refused), every other tensor fills
exactly one parameter, and anything missing or left over raises
:class:`~pargo_jax.convert.tables.ConversionError` naming it. :func:`save_mae` reads the table
backwards and writes the released checkpoints' names and both sin-cos tables.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pargo_jax.configs import check_keys, field_names
from pargo_jax.convert.hf_vision import _ACT_NAMES, _HF_ACTS
from pargo_jax.convert.tables import (
    ConversionError,
    LazySource,
    Rule,
    conv_oihw_to_hwio,
    convert,
    expected_shapes,
    export,
    merge_heads_in,
    reshape,
    save_safetensors,
    split_heads_bias,
    split_heads_out,
    transpose,
)
from pargo_jax.models.mae import MAE, MAEConfig, sincos_pos_embed
from pargo_jax.param_tree import flat_arrays

# HF ViTMAEConfig key -> MAEConfig field (absent keys keep MAEConfig's defaults, which are HF's).
_HF_FIELDS = {
    "image_size": "image_size",
    "patch_size": "patch_size",
    "num_channels": "num_channels",
    "hidden_size": "width",
    "num_hidden_layers": "depth",
    "num_attention_heads": "heads",
    "intermediate_size": "mlp_dim",
    "decoder_hidden_size": "decoder_width",
    "decoder_num_hidden_layers": "decoder_depth",
    "decoder_num_attention_heads": "decoder_heads",
    "decoder_intermediate_size": "decoder_mlp_dim",
    "layer_norm_eps": "layer_norm_eps",
    "mask_ratio": "mask_ratio",
    "norm_pix_loss": "norm_pix_loss",
}
POS_TABLES = {  # fixed (not learned) tensors: name -> which width's table they hold
    "vit.embeddings.position_embeddings": "width",
    "decoder.decoder_pos_embed": "decoder_width",
}


def _block_rules(layers: str, dst: str, heads: int) -> list[Rule]:
    """One stack of HF ``ViTMAELayer`` s (``layers`` matches the prefix before the index) -> the
    scanned :class:`~pargo_jax.models.vision.Block` s at ``dst``. The v4 names of the released
    checkpoints export (every transformers version loads them); v5's module names import as aliases."""
    L = layers + r"(\d+)\."
    at = lambda ours: f"{dst}/{ours}[{{0}}]"
    wb = lambda src, ours, w_tf, b_tf=None, **kw: [
        Rule(L + src + r"\.weight", at(f"{ours}/kernel"), w_tf, **kw),
        Rule(L + src + r"\.bias", at(f"{ours}/bias"), b_tf, **kw),
    ]
    qkv = (split_heads_out(heads), split_heads_bias(heads))
    norms = [
        Rule(L + r"layernorm_before\.weight", at("norm1/scale")),
        Rule(L + r"layernorm_before\.bias", at("norm1/bias")),
        Rule(L + r"layernorm_after\.weight", at("norm2/scale")),
        Rule(L + r"layernorm_after\.bias", at("norm2/bias")),
    ]
    v4 = [  # the released checkpoints' names: what save_mae writes
        *(
            r
            for q, old in (("q", "query"), ("k", "key"), ("v", "value"))
            for r in wb(rf"attention\.attention\.{old}", f"attn/{q}", *qkv)
        ),
        *wb(r"attention\.output\.dense", "attn/out", merge_heads_in(heads)),
        *wb(r"intermediate\.dense", "mlp/fc1", transpose),
        *wb(r"output\.dense", "mlp/fc2", transpose),
    ]
    v5 = [
        *(r for q in "qkv" for r in wb(rf"attention\.{q}_proj", f"attn/{q}", *qkv, exported=False)),
        *wb(r"attention\.o_proj", "attn/out", merge_heads_in(heads), exported=False),
        *wb(r"mlp\.fc1", "mlp/fc1", transpose, exported=False),
        *wb(r"mlp\.fc2", "mlp/fc2", transpose, exported=False),
    ]
    return norms + v4 + v5


def mae_rules(cfg: MAEConfig) -> list[Rule]:
    """HF ``ViTMAEForPreTraining`` names -> :class:`MAE` params (the fixed position tables excluded)."""
    token = reshape((1, 1, -1), (-1,))
    return [
        Rule(
            r"vit\.embeddings\.patch_embeddings\.projection\.weight",
            "encoder/patch_embed/kernel",
            conv_oihw_to_hwio,
        ),
        Rule(r"vit\.embeddings\.patch_embeddings\.projection\.bias", "encoder/patch_embed/bias"),
        Rule(r"vit\.embeddings\.cls_token", "encoder/cls_token", token),
        *_block_rules(r"vit\.(?:encoder\.layer|layers)\.", "encoder/blocks", cfg.heads),
        Rule(r"vit\.layernorm\.weight", "encoder/norm/scale"),
        Rule(r"vit\.layernorm\.bias", "encoder/norm/bias"),
        Rule(r"decoder\.decoder_embed\.weight", "decoder/embed/kernel", transpose),
        Rule(r"decoder\.decoder_embed\.bias", "decoder/embed/bias"),
        Rule(r"decoder\.mask_token", "decoder/mask_token", token),
        *_block_rules(r"decoder\.decoder_(?:layers|encoder\.layer)\.", "decoder/blocks", cfg.decoder_heads),
        Rule(r"decoder\.decoder_norm\.weight", "decoder/norm/scale"),
        Rule(r"decoder\.decoder_norm\.bias", "decoder/norm/bias"),
        Rule(r"decoder\.decoder_pred\.weight", "decoder/pred/kernel", transpose),
        Rule(r"decoder\.decoder_pred\.bias", "decoder/pred/bias"),
    ]


def mae_config(path: str) -> MAEConfig:
    """:class:`MAEConfig` from a local HF ``vit_mae`` directory's ``config.json``."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"No config.json in {path!r}; expected a Hugging Face ViTMAE directory.")
    with open(cfg_file) as f:
        raw = json.load(f)
    if raw.get("model_type") != "vit_mae":
        raise ValueError(f"{cfg_file} has model_type {raw.get('model_type')!r}, expected 'vit_mae'.")
    if not raw.get("qkv_bias", True):
        raise ValueError(f"{cfg_file}: qkv_bias=false is not supported (every MAE release has q/k/v biases).")
    act = raw.get("hidden_act", "gelu")
    if act not in _HF_ACTS:
        raise ValueError(f"Unsupported hidden_act {act!r} in {cfg_file}; supported: {sorted(_HF_ACTS)}.")
    sizes = [raw[k] for k in ("image_size", "patch_size") if isinstance(raw.get(k), list)]
    if any(len(set(s)) != 1 for s in sizes):
        raise ValueError(f"{cfg_file}: only square images and patches are supported, got {sizes}.")
    fields = {ours: raw[hf] for hf, ours in _HF_FIELDS.items() if raw.get(hf) is not None}
    fields = {k: v[0] if isinstance(v, list) else v for k, v in fields.items()}
    return MAEConfig(**fields, act=_HF_ACTS[act])


def _check_pos_tables(source: Mapping[str, Any], cfg: MAEConfig, what: str) -> None:
    """The checkpoint's fixed position tables must be present and equal the sin-cos tables."""
    problems = []
    for name, width in POS_TABLES.items():
        want = sincos_pos_embed(cfg.grid, getattr(cfg, width))
        if name not in source:
            problems.append(f"{name} is missing")
            continue
        got = np.asarray(source[name], np.float32)
        if got.shape[-2:] != want.shape or not np.allclose(got.reshape(want.shape), want, atol=1e-5):
            problems.append(f"{name} {got.shape} is not the fixed 2-D sin-cos table {(1, *want.shape)}")
    if problems:
        raise ConversionError(f"Cannot load the {what}: " + "; ".join(problems))


def load_mae(path: str, dtype=np.float32, *, compute_dtype=None, **options) -> tuple[MAE, dict]:
    """Loads a local HF ``ViTMAEForPreTraining`` directory (``config.json`` + safetensors).

    ``dtype``: parameter dtype (also the compute dtype unless ``compute_dtype``); ``options``:
    :class:`MAEConfig` fields overriding the checkpoint's, e.g. ``mask_ratio``, ``norm_pix_loss``.
    Returns ``(module, {"params": ...})``."""
    check_keys(options, field_names(MAEConfig), "the MAE options (MAEConfig fields)")
    base = mae_config(path)
    cfg = base.replace(param_dtype=dtype, dtype=dtype if compute_dtype is None else compute_dtype, **options)
    source = LazySource.from_dir(path)
    what = f"ViTMAE checkpoint {path!r}"
    _check_pos_tables(source, base, what)
    module = MAE(cfg)
    pixels = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
    noise = jax.ShapeDtypeStruct((1, cfg.num_patches), jnp.float32)
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), pixels, noise)
    params = convert(
        source, mae_rules(cfg), expected_shapes(abstract["params"]),
        ignore=[re.escape(n) for n in POS_TABLES], place=lambda _, x: jax.device_put(x),
        dtype=np.dtype(dtype), what=what,
    )  # fmt: skip
    return module, {"params": params}


def save_mae(path: str, params: Mapping[str, Any], cfg: MAEConfig) -> str:
    """Writes :class:`MAE` ``params`` (unboxed) as an HF ``ViTMAEForPreTraining`` directory at ``path``:
    ``config.json`` (every ``ViTMAEConfig`` field, ``mask_ratio`` and ``norm_pix_loss`` included) and
    ``model.safetensors`` in the released checkpoints' names, with the two fixed position tables the
    model computes. :func:`load_mae` reads back the same params; transformers computes the same
    outputs. Returns ``path``."""
    if cfg.act not in _ACT_NAMES:
        raise ValueError(f"MAE act {cfg.act!r} has no HF name; supported: {sorted(_ACT_NAMES)}.")
    tensors = export(flat_arrays(params), mae_rules(cfg), what="MAE")
    for name, width in POS_TABLES.items():
        tensors[name] = sincos_pos_embed(cfg.grid, getattr(cfg, width))[None]
    config = {hf: getattr(cfg, ours) for hf, ours in _HF_FIELDS.items()}
    config.update(
        model_type="vit_mae", architectures=["ViTMAEForPreTraining"], hidden_act=_ACT_NAMES[cfg.act],
        qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.02,
        dtype="float32",
    )  # fmt: skip
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_safetensors(path, {k: np.asarray(v, np.float32) for k, v in tensors.items()})
    return path
