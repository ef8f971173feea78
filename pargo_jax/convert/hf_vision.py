"""Import vision towers: HF SigLIP / CLIP / BLIP-2 directories and timm / EVA-CLIP EVA02 state dicts.

    module, variables = load_vision("/ckpt/siglip-so400m-patch14-384", feature_layer=-2)
    module, variables = load_eva02("/ckpt/pargo.bin", prefix="visual_encoder.", mesh=mesh)
    features = module.apply(variables, pixels)          # (B, tokens, width)

Mappings are tables of :class:`~pargo_jax.convert.tables.Rule`. Tensors are read lazily one at a
time, transformed, cast to ``dtype`` and placed straight onto their target sharding (from the
module's logical axis names) when ``mesh`` or ``shardings`` is given. Every source tensor of the tower
must be consumed (or be a known non-feature tensor: pooling heads, text tower, RoPE buffers, the
layers after ``feature_layer``, an unused final norm) and every parameter filled, else
:class:`~pargo_jax.convert.tables.ConversionError` lists the names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pargo_jax.configs import check_keys, field_names
from pargo_jax.convert.tables import (
    LazySource,
    Rule,
    TorchSource,
    conv_oihw_to_hwio,
    convert,
    expected_shapes,
    merge_heads_in,
    read_torch_file,
    reshape,
    split_heads_bias,
    split_heads_out,
    transpose,
)
from pargo_jax.models.vision import VisionConfig, VisionTower
from pargo_jax.param_tree import flat_arrays, flatten
from pargo_jax.sharding import logical_shardings

HF_MODEL_TYPES = (
    "siglip",
    "siglip_vision_model",
    "clip",
    "clip_vision_model",
    "blip-2",
    "blip_2_vision_model",
)
_HF_FAMILIES = {"blip-2": "blip2", "blip_2_vision_model": "blip2"}  # else model_type's first word
_HF_DEFAULTS = {  # transformers' VisionConfig defaults, for config.json files that omit fields.
    "siglip": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=16,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    ),
    "clip": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    ),
    "blip2": dict(
        hidden_size=1408,
        intermediate_size=6144,
        num_hidden_layers=39,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
    ),
}
_HF_ACTS = {
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
}
EVA_PREFIXES = ("visual_encoder.", "module.visual_encoder.", "visual.trunk.", "visual.", "")


# --- rule tables -----------------------------------------------------------------------------------
def hf_rules(heads: int) -> list[Rule]:
    """HF ``SiglipVisionModel`` / ``CLIPVisionModel`` / ``Blip2VisionModel`` names (without
    ``vision_model.``; BLIP-2's fused ``qkv`` split beforehand by :class:`_SplitQKV`) -> our params."""
    L = r"encoder\.layers\.(\d+)\."
    # Import-only aliases for BLIP-2: its (1, 1, C) / (1, N, C) tables and attention output name (the
    # class-embedding alias comes first: it also flattens CLIP's (C,) one).
    blip2 = [
        Rule(r"embeddings\.class_embedding", "cls_token", reshape((1, 1, -1), (-1,)), exported=False),
        Rule(
            r"embeddings\.position_embedding",
            "pos_embed",
            reshape(lambda x: (1, *x.shape), lambda x: x.shape[-2:]),
            exported=False,
        ),
        Rule(
            L + r"self_attn\.projection\.weight",
            "blocks/attn/out/kernel[{0}]",
            merge_heads_in(heads),
            exported=False,
        ),
        Rule(L + r"self_attn\.projection\.bias", "blocks/attn/out/bias[{0}]", exported=False),
    ]
    return blip2 + [
        Rule(r"embeddings\.patch_embedding\.weight", "patch_embed/kernel", conv_oihw_to_hwio),
        Rule(r"embeddings\.patch_embedding\.bias", "patch_embed/bias"),
        Rule(r"embeddings\.class_embedding", "cls_token"),
        Rule(r"embeddings\.position_embedding\.weight", "pos_embed"),
        Rule(r"pre_layrnorm\.weight", "pre_norm/scale"),
        Rule(r"pre_layrnorm\.bias", "pre_norm/bias"),
        Rule(r"post_layernorm\.weight", "final_norm/scale"),
        Rule(r"post_layernorm\.bias", "final_norm/bias"),
        Rule(L + r"layer_norm([12])\.weight", "blocks/norm{1}/scale[{0}]"),
        Rule(L + r"layer_norm([12])\.bias", "blocks/norm{1}/bias[{0}]"),
        Rule(L + r"self_attn\.([qkv])_proj\.weight", "blocks/attn/{1}/kernel[{0}]", split_heads_out(heads)),
        Rule(L + r"self_attn\.([qkv])_proj\.bias", "blocks/attn/{1}/bias[{0}]", split_heads_bias(heads)),
        Rule(L + r"self_attn\.out_proj\.weight", "blocks/attn/out/kernel[{0}]", merge_heads_in(heads)),
        Rule(L + r"self_attn\.out_proj\.bias", "blocks/attn/out/bias[{0}]"),
        Rule(L + r"mlp\.(fc[12])\.weight", "blocks/mlp/{1}/kernel[{0}]", transpose),
        Rule(L + r"mlp\.(fc[12])\.bias", "blocks/mlp/{1}/bias[{0}]"),
    ]


def eva02_rules(heads: int, naming: str = "timm") -> list[Rule]:
    """timm ``Eva`` names and the original EVA-CLIP aliases (``q_bias``, ``inner_attn_ln``, ``w1``,
    ``w2``, ``ffn_ln``, ``w3``) -> our params; both import, ``naming`` ("timm" | "evaclip") is the one
    exported. A fused ``attn.qkv.weight`` is split beforehand."""
    B = r"blocks\.(\d+)\."
    timm = naming == "timm"
    alias = lambda t, orig: f"(?:{t}|{orig})" if timm else f"(?:{orig}|{t})"
    return [
        Rule(r"patch_embed\.proj\.weight", "patch_embed/kernel", conv_oihw_to_hwio),
        Rule(r"patch_embed\.proj\.bias", "patch_embed/bias"),
        Rule(r"cls_token", "cls_token", reshape((1, 1, -1), (-1,))),
        Rule(r"pos_embed", "pos_embed", reshape(lambda x: (1, *x.shape), lambda x: x.shape[-2:])),
        Rule(r"norm\.weight", "final_norm/scale"),
        Rule(r"norm\.bias", "final_norm/bias"),
        Rule(B + r"norm([12])\.weight", "blocks/norm{1}/scale[{0}]"),
        Rule(B + r"norm([12])\.bias", "blocks/norm{1}/bias[{0}]"),
        Rule(B + r"attn\.([qkv])_proj\.weight", "blocks/attn/{1}/kernel[{0}]", split_heads_out(heads)),
        Rule(
            B + r"attn\.([qv])_proj\.bias",
            "blocks/attn/{1}/bias[{0}]",
            split_heads_bias(heads),
            exported=timm,
        ),
        Rule(
            B + r"attn\.([qv])_bias", "blocks/attn/{1}/bias[{0}]", split_heads_bias(heads), exported=not timm
        ),
        Rule(B + rf"attn\.{alias('norm', 'inner_attn_ln')}\.weight", "blocks/attn/norm/scale[{0}]"),
        Rule(B + rf"attn\.{alias('norm', 'inner_attn_ln')}\.bias", "blocks/attn/norm/bias[{0}]"),
        Rule(B + r"attn\.proj\.weight", "blocks/attn/out/kernel[{0}]", merge_heads_in(heads)),
        Rule(B + r"attn\.proj\.bias", "blocks/attn/out/bias[{0}]"),
        *(
            Rule(B + rf"mlp\.{alias(t, orig)}\.{w}", f"blocks/mlp/{ours}/{p}[{{0}}]", tf)
            for t, orig, ours in (("fc1_g", "w1", "gate"), ("fc1_x", "w2", "up"), ("fc2", "w3", "down"))
            for w, p, tf in (("weight", "kernel", transpose), ("bias", "bias", None))
        ),
        Rule(B + rf"mlp\.{alias('norm', 'ffn_ln')}\.weight", "blocks/mlp/norm/scale[{0}]"),
        Rule(B + rf"mlp\.{alias('norm', 'ffn_ln')}\.bias", "blocks/mlp/norm/bias[{0}]"),
    ]


class _View(Mapping[str, Any]):
    """The tensors of ``base`` whose name starts with ``prefix`` (removed), minus those fully matching a
    ``drop`` pattern: parts of the checkpoint the built tower deliberately does not use."""

    def __init__(self, base: Mapping[str, Any], prefix: str = "", drop: tuple[str, ...] = ()):
        self._base, self._prefix = base, prefix
        dropped = [re.compile(p) for p in drop]
        self._keys = [
            k[len(prefix) :]
            for k in base
            if k.startswith(prefix) and not any(p.fullmatch(k[len(prefix) :]) for p in dropped)
        ]

    def __getitem__(self, name: str):
        return self._base[self._prefix + name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class _SplitQKV(Mapping[str, Any]):
    """Exposes each fused ``X.attn.qkv.weight`` (3*C, C) / ``.bias`` (3*C,) as
    ``X.attn.{q,k,v}_proj.weight`` / ``.bias``."""

    _FUSED = re.compile(r"(.*attn\.)qkv\.(weight|bias)")

    def __init__(self, base: Mapping[str, Any]):
        self._base = base
        self._virtual: dict[str, tuple[str, int]] = {}
        self._keys: list[str] = []
        for k in base:
            m = self._FUSED.fullmatch(k)
            if m is None:
                self._keys.append(k)
                continue
            for i, part in enumerate("qkv"):
                name = f"{m.group(1)}{part}_proj.{m.group(2)}"
                self._virtual[name] = (k, i)
                self._keys.append(name)

    def __getitem__(self, name: str):
        if name in self._virtual:
            fused, i = self._virtual[name]
            return np.split(np.asarray(self._base[fused]), 3, axis=0)[i]
        return self._base[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


# --- shared loading --------------------------------------------------------------------------------
def _load(
    cfg: VisionConfig,
    source: Mapping[str, Any],
    rules: list[Rule],
    ignore: list[str],
    dtype,
    mesh: jax.sharding.Mesh | None,
    shardings,
    what: str,
) -> tuple[VisionTower, dict]:
    module = VisionTower(cfg)
    pixels = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), pixels)
    if shardings is None and mesh is not None:
        shardings = logical_shardings(abstract, mesh)["params"]
    if shardings is None:
        place = lambda path, x: jax.device_put(x)
    elif isinstance(shardings, jax.sharding.Sharding):
        place = lambda path, x: jax.device_put(x, shardings)
    else:
        flat = flatten(shardings)
        place = lambda path, x: jax.device_put(x, flat[path])
    params = convert(
        source,
        rules,
        expected_shapes(abstract["params"]),
        ignore=ignore,
        place=place,
        dtype=np.dtype(dtype),
        what=what,
    )
    return module, {"params": params}


def _dropped_layers(prefix: str, cfg: VisionConfig) -> list[str]:
    """Patterns of the blocks after ``feature_layer`` (not built, so not loaded)."""
    return [rf"{prefix}{i}\..*" for i in range(cfg.num_blocks, cfg.depth)]


def _options(cfg: VisionConfig, dtype, compute_dtype, options: dict) -> VisionConfig:
    check_keys(options, field_names(VisionConfig), "the vision options (VisionConfig fields)")
    return cfg.replace(
        **{"param_dtype": dtype, "dtype": compute_dtype if compute_dtype is not None else dtype, **options}
    )


# --- Hugging Face SigLIP / CLIP ----------------------------------------------------------------------
def hf_vision_config(path: str) -> VisionConfig:
    """:class:`VisionConfig` from a local HF directory's ``config.json`` (full or vision-only model)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"Vision checkpoint directory {path!r} does not exist; pass a local Hugging Face directory "
            "with config.json and *.safetensors."
        )
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"No config.json in {path!r}; expected a Hugging Face model directory.")
    with open(cfg_file) as f:
        raw = json.load(f)
    model_type = raw.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"Unsupported vision model_type {model_type!r} in {cfg_file}; supported: {HF_MODEL_TYPES} "
            "(EVA02 state dicts load with load_eva02)."
        )
    family = _HF_FAMILIES.get(model_type, model_type.split("_")[0])
    vc = (raw.get("vision_config") or {}) if model_type in ("siglip", "clip", "blip-2") else raw
    vc = {**_HF_DEFAULTS[family], **{k: v for k, v in vc.items() if v is not None}}
    if vc["hidden_act"] not in _HF_ACTS:
        raise ValueError(
            f"Unsupported hidden_act {vc['hidden_act']!r} in {cfg_file}; supported: {sorted(_HF_ACTS)}."
        )
    return VisionConfig(
        kind=family,
        image_size=int(vc["image_size"]),
        patch_size=int(vc["patch_size"]),
        width=int(vc["hidden_size"]),
        depth=int(vc["num_hidden_layers"]),
        heads=int(vc["num_attention_heads"]),
        mlp_dim=int(vc["intermediate_size"]),
        layer_norm_eps=float(vc["layer_norm_eps"]),
        act=_HF_ACTS[vc["hidden_act"]],
    )


def load_vision(
    path: str,
    dtype=np.float32,
    *,
    mesh: jax.sharding.Mesh | None = None,
    shardings=None,
    compute_dtype=None,
    **options,
) -> tuple[VisionTower, dict]:
    """Loads a SigLIP / CLIP / BLIP-2 vision tower from a local HF directory (``config.json`` + single
    or sharded safetensors; full CLIP / SigLIP / BLIP-2 checkpoints keep the tower under
    ``vision_model.``; BLIP-2's ``post_layernorm`` is the Q-Former's ``ln_vision``, see
    :mod:`pargo_jax.convert.hf_blip2`).

    ``dtype``: parameter dtype (also the compute dtype unless ``compute_dtype``). ``mesh``: place each
    parameter on the sharding given by its logical axis names; or pass ``shardings`` (a tree like the
    params, or one Sharding). ``options``: :class:`VisionConfig` fields, e.g. ``feature_layer=-2``,
    ``final_norm=False``, ``drop_cls=True``, ``remat=True``.
    Returns ``(module, {"params": ...})``."""
    cfg = _options(hf_vision_config(path), dtype, compute_dtype, options)
    files = LazySource.from_dir(path)
    # Full CLIP/SigLIP: the text tower, projections and logit scale live outside ``vision_model.``.
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in files) else ""
    drop = _dropped_layers(r"encoder\.layers\.", cfg)
    if not cfg.apply_final_norm:
        drop.append(r"post_layernorm\..*")
    source = _View(files, prefix, tuple(drop))
    if cfg.kind == "blip2":
        source = _SplitQKV(source)
    ignore = [r"head\..*"]  # SigLIP's attention-pooling head: not part of the token features
    return _load(
        cfg,
        source,
        hf_rules(cfg.heads),
        ignore,
        dtype,
        mesh,
        shardings,
        what=f"{cfg.kind} checkpoint {path!r}",
    )


# --- EVA02 (timm / EVA-CLIP) -----------------------------------------------------------------------
def _read_state(path_or_state: str | Mapping[str, Any], what: str = "EVA02") -> Mapping[str, Any]:
    if isinstance(path_or_state, Mapping):
        return TorchSource(path_or_state)
    path = str(path_or_state)
    if os.path.isdir(path):
        return LazySource.from_dir(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{what} checkpoint {path!r} does not exist; pass a .safetensors / .bin / .pth state dict file, "
            "a directory with safetensors, or a state dict."
        )
    if path.endswith(".safetensors"):
        return LazySource([path])
    return TorchSource(read_torch_file(path))


def eva02_config(source: Mapping[str, Any], heads: int | None = None) -> VisionConfig:
    """Infers an EVA02 :class:`VisionConfig` from (prefix-stripped) state-dict shapes; ``heads``
    defaults to width // 64 (every released EVA02 uses 64-wide heads)."""
    need = ("pos_embed", "cls_token", "patch_embed.proj.weight", "blocks.0.norm1.weight")
    missing = [n for n in need if n not in source]
    if missing:
        raise ValueError(f"Not an EVA02 state dict: missing {missing} (after the prefix).")
    pos = np.asarray(source["pos_embed"]).shape
    patch = np.asarray(source["patch_embed.proj.weight"]).shape[-1]
    width, grid = pos[-1], math.isqrt(pos[-2] - 1)
    depth = 1 + max(int(m.group(1)) for k in source if (m := re.match(r"blocks\.(\d+)\.", k)))
    gate = next(
        (f"blocks.0.mlp.{n}.weight" for n in ("fc1_g", "w1") if f"blocks.0.mlp.{n}.weight" in source), None
    )
    if gate is None:
        raise ValueError("Only SwiGLU EVA02 towers (blocks.*.mlp.fc1_g / w1) are supported.")
    has = lambda *names: any(f"blocks.0.{n}.weight" in source for n in names)
    return VisionConfig(
        kind="eva02",
        image_size=grid * patch,
        patch_size=patch,
        width=width,
        depth=depth,
        heads=heads or width // 64,
        mlp_dim=np.asarray(source[gate]).shape[0],
        layer_norm_eps=1e-6,
        attn_norm=has("attn.norm", "attn.inner_attn_ln"),
        mlp_norm=has("mlp.norm", "mlp.ffn_ln"),
    )


def _eva02_tower(
    path_or_state_dict: str | Mapping[str, Any], prefix: str | None, heads: int | None, rope_ref_grid: int
) -> tuple[Mapping[str, Any], str, VisionConfig]:
    """(the tower's tensors without prefix, the prefix, the config they define). ``prefix`` None:
    auto-detect ``visual_encoder.`` (official ParGo checkpoint), ``visual.trunk.``, ``visual.`` or none.
    Without a final ``norm`` in the checkpoint the config's output is the last block's."""
    state = _read_state(path_or_state_dict)
    if prefix is None:
        prefix = next((p for p in EVA_PREFIXES if f"{p}pos_embed" in state), "")
    tower = _View(state, prefix)
    cfg = eva02_config(tower, heads).replace(rope_ref_grid=rope_ref_grid)
    if "norm.weight" not in tower:
        cfg = cfg.replace(final_norm=False)
    return tower, prefix, cfg


def vision_config_from(path: str, fmt: str = "hf", heads: int | None = None) -> VisionConfig:
    """The :class:`VisionConfig` a checkpoint defines: ``fmt="hf"`` (SigLIP / CLIP directory) or
    ``"eva02"`` (timm / EVA-CLIP / official ParGo state dict, prefix auto-detected; ``heads`` as in
    :func:`load_eva02`)."""
    if fmt == "hf":
        return hf_vision_config(path)
    if fmt == "eva02":
        return _eva02_tower(path, None, heads, 16)[2]
    raise ValueError(f"model.vision.format={fmt!r} is unknown; use 'hf' or 'eva02'.")


def load_eva02(
    path_or_state_dict: str | Mapping[str, Any],
    dtype=np.float32,
    *,
    prefix: str | None = None,
    heads: int | None = None,
    rope_ref_grid: int = 16,
    mesh: jax.sharding.Mesh | None = None,
    shardings=None,
    compute_dtype=None,
    **options,
) -> tuple[VisionTower, dict]:
    """Loads an EVA02-CLIP tower from a timm / EVA-CLIP state dict (file, directory or mapping).

    ``prefix``: the tower's name prefix (None: auto-detect ``visual_encoder.`` as in the official
    ParGo checkpoint, ``visual.trunk.``, ``visual.`` or none); tensors outside it are not read. The
    shape comes from the tensors; ``heads`` defaults to width // 64, ``rope_ref_grid`` to timm's 16.
    Without a final ``norm`` in the checkpoint the output is the last block's (``final_norm=False``).
    Other arguments as in :func:`load_vision`."""
    tower, prefix, base = _eva02_tower(path_or_state_dict, prefix, heads, rope_ref_grid)
    cfg = _options(base, dtype, compute_dtype, options)
    drop = _dropped_layers(r"blocks\.", cfg)
    if not cfg.apply_final_norm:
        drop.append(r"norm\.(?:weight|bias)")
    source = _SplitQKV(_View(tower, "", tuple(drop)))
    # Classifier / pooling head and fixed RoPE buffers (EVA-CLIP saves them): not tower weights.
    ignore = [r"head\..*", r"fc_norm\..*", r"(?:.*\.)?rope\..*"]
    what = f"EVA02 state dict (prefix {prefix!r})"
    return _load(cfg, source, eva02_rules(cfg.heads), ignore, dtype, mesh, shardings, what=what)


# --- export ----------------------------------------------------------------------------------------
_ACT_NAMES = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}
_KIND_ACTS = {"siglip": "gelu_tanh", "clip": "quick_gelu"}


def export_vision(
    params: Mapping[str, Any], cfg: VisionConfig
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(HF ``config.json``, tensors in transformers v5's names) of a SigLIP / CLIP tower: the blocks it
    runs (``num_hidden_layers`` = those up to ``feature_layer``), so its features are the HF model's
    ``hidden_states[-1]`` (with ``post_layernorm`` when ``cfg.apply_final_norm``; identity weights are
    written when the tower has none, as HF requires them)."""
    from pargo_jax.convert.tables import export

    if cfg.kind == "eva02":
        return _export_eva02(params, cfg)
    if cfg.kind not in _KIND_ACTS:
        raise ValueError(f"Only SigLIP / CLIP towers export to an HF vision directory, not {cfg.kind!r}.")
    tensors = export(flat_arrays(params), hf_rules(cfg.heads), what=f"{cfg.kind} tower")
    for name, value in (("weight", 1.0), ("bias", 0.0)):
        tensors.setdefault(f"post_layernorm.{name}", np.full((cfg.width,), value, np.float32))
    config = dict(
        model_type=f"{cfg.kind}_vision_model",
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_blocks,
        num_attention_heads=cfg.heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_act=_ACT_NAMES[cfg.act or _KIND_ACTS[cfg.kind]],
        num_channels=3,
    )
    if cfg.kind == "siglip":
        config["vision_use_head"] = False
    return config, tensors


def _export_eva02(params: Mapping[str, Any], cfg: VisionConfig) -> tuple[dict, dict[str, np.ndarray]]:
    """(tower config of the exported ``modeling_pargo.Eva02Tower``, timm-named tensors) of an EVA02
    tower: the blocks it runs, its final ``norm`` only when applied."""
    from pargo_jax.convert.tables import export

    if cfg.activation != "swiglu":
        raise ValueError(f"The exported EVA02 tower runs SwiGLU, not {cfg.activation!r}.")
    tensors = export(flat_arrays(params), eva02_rules(cfg.heads), what="EVA02 tower")
    config = dict(
        model_type="eva02", hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_blocks, num_attention_heads=cfg.heads, image_size=cfg.image_size,
        patch_size=cfg.patch_size, layer_norm_eps=cfg.layer_norm_eps, attn_norm=cfg.attn_norm,
        mlp_norm=cfg.mlp_norm, rope_ref_grid=cfg.rope_ref_grid,
    )  # fmt: skip
    return config, tensors


def save_vision(path: str, params: Mapping[str, Any], cfg: VisionConfig) -> str:
    """The tower in its source format: an HF ``SiglipVisionModel`` / ``CLIPVisionModel`` directory
    (see :func:`export_vision`), or for EVA02 a timm-named ``model.safetensors`` state dict."""
    from pargo_jax.convert.tables import export, save_safetensors

    os.makedirs(path, exist_ok=True)
    if cfg.kind == "eva02":
        flat = flat_arrays(params)
        save_safetensors(path, export(flat, eva02_rules(cfg.heads), what="EVA02 tower"))
        return path
    config, tensors = export_vision(params, cfg)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_safetensors(path, tensors)
    return path


# --- ConvNeXt (timm / OpenCLIP ``visual.trunk.``) -------------------------------------------------------
def convnext_rules() -> list[Rule]:
    """timm ``ConvNeXt`` names -> :class:`pargo_jax.models.convnext.ConvNeXt` params."""
    S, B = r"stages\.(\d+)\.", r"stages\.(\d+)\.blocks\.(\d+)\."
    wb = lambda src, dst, t=None: [Rule(src + r"\.weight", dst + "/" + ("kernel" if t else "scale"), t),
                                   Rule(src + r"\.bias", dst + "/bias")]  # fmt: skip
    return [
        *wb(r"stem\.0", "stem_conv", conv_oihw_to_hwio),
        *wb(r"stem\.1", "stem_norm"),
        *wb(S + r"downsample\.0", "stages_{0}_downsample_norm"),
        *wb(S + r"downsample\.1", "stages_{0}_downsample_conv", conv_oihw_to_hwio),
        *wb(B + r"conv_dw", "stages_{0}_blocks_{1}_conv_dw", conv_oihw_to_hwio),
        *wb(B + r"norm", "stages_{0}_blocks_{1}_norm"),
        *wb(B + r"mlp\.fc1", "stages_{0}_blocks_{1}_fc1", transpose),
        *wb(B + r"mlp\.fc2", "stages_{0}_blocks_{1}_fc2", transpose),
        Rule(B + r"gamma", "stages_{0}_blocks_{1}_gamma"),
    ]


def convnext_config(source: Mapping[str, Any], image_size: int = 768):
    """The :class:`ConvNeXtConfig` of a timm-named ConvNeXt state dict: dims from the stem and the
    downsampling convolutions, depths from the blocks."""
    from pargo_jax.models.convnext import ConvNeXtConfig

    blocks: dict[int, set[int]] = {}
    for name in source:
        if m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", name):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if "stem.0.weight" not in source or not blocks:
        raise ValueError("Not a timm ConvNeXt state dict: no stem.0.weight / stages.*.blocks.* tensors.")
    stages = range(len(blocks))
    dims = tuple(int(source[f"stages.{k}.blocks.0.gamma"].shape[0]) for k in stages)
    return ConvNeXtConfig(depths=tuple(len(blocks[k]) for k in stages), dims=dims, image_size=image_size)


def convnext_config_from(path: str, image_size: int = 768):
    """The :class:`ConvNeXtConfig` of a timm / OpenCLIP ConvNeXt checkpoint file or directory (shapes
    only; torch files are memory-mapped)."""
    files = _read_state(path, "ConvNeXt")
    prefix = "visual.trunk." if any(k.startswith("visual.trunk.") for k in files) else ""
    return convnext_config(_View(files, prefix), image_size)


def load_convnext(path_or_state: str | Mapping[str, Any], image_size: int = 768, dtype=np.float32):
    """(ConvNeXt module, {"params": ...}) from a timm ConvNeXt (``stages.*``, ``head.*`` ignored) or an
    OpenCLIP model whose tower is ``visual.trunk.*`` (the rest of the OpenCLIP model is not read): a
    ``.safetensors`` / ``.bin`` / ``.pth`` file, a safetensors directory, or a state dict."""
    from pargo_jax.models.convnext import ConvNeXt

    files = _read_state(path_or_state, "ConvNeXt")
    prefix = "visual.trunk." if any(k.startswith("visual.trunk.") for k in files) else ""
    source = _View(files, prefix)
    cfg = dataclasses.replace(convnext_config(source, image_size), dtype=np.dtype(dtype).name)
    module = ConvNeXt(cfg)
    pixels = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), pixels)
    params = convert(
        source, convnext_rules(), expected_shapes(abstract["params"]), ignore=[r"head\..*", r"norm_pre\..*"],
        dtype=np.dtype(dtype), what=f"ConvNeXt checkpoint ({len(source)} tensors)",
    )  # fmt: skip
    return module, {"params": params}
