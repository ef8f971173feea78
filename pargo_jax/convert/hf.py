"""Hugging Face decoder LLM checkpoints (safetensors) -> :class:`pargo_jax.models.llm.CausalLM`.

Supported ``model_type``: ``llama`` (Llama 2/3/3.1, SmolLM2), ``qwen2`` (Qwen2/2.5), ``internlm2`` and
``opt`` (OPTForCausalLM, e.g. facebook/opt-2.7b / 6.7b of BLIP-2; not opt-350m's ``project_in/out`` and
post-norm). Each family is a table of :class:`~pargo_jax.convert.tables.Rule`; InternLM2's fused ``wqkv``
(grouped per kv head as ``[q_0 .. q_{g-1}, k, v]``) is presented to the table as three virtual tensors
``wq``/``wk``/``wv`` by :class:`_SplitFusedQKV`, so the usual "every tensor consumed" check still holds.
A tied model's checkpoint may still hold its ``lm_head`` weight: it is accepted only when it equals the
embedding (:class:`_TiedHead`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pargo_jax.convert.tables import (
    ConversionError,
    LazySource,
    Rule,
    Transform,
    convert,
    expected_shapes,
    linear_to,
    merge_heads_in,
    split_heads_bias,
    split_heads_out,
    transpose,
)
from pargo_jax.lora import LORA_PATH_REGEX, init_lora_params
from pargo_jax.models.llm import CausalLM, LLMConfig, RopeScaling
from pargo_jax.param_tree import flat_arrays, flatten, unflatten

SUPPORTED = ("llama", "qwen2", "internlm2", "opt")
IGNORE = (r".*rotary_emb\.inv_freq",)


def _rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(theta, llama3 scaling) from a v4 (``rope_theta`` + ``rope_scaling``) or v5 (``rope_parameters``)
    config. ``dynamic`` NTK scaling (InternLM2) equals plain RoPE up to max_position_embeddings, which
    the generation length guard enforces, so it maps to no scaling."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {}) or params
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", "dynamic", None):
        return theta, None
    if kind != "llama3":
        raise ValueError(f"Unsupported rope scaling type {kind!r}; supported: default, llama3, dynamic.")
    return theta, RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _opt_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """LLMConfig fields of an OPT ``config.json`` (pre-norm, LayerNorm eps 1e-5, learned positions at
    offset 2, ReLU feed-forward, ``enable_bias`` on every projection)."""
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    proj_dim, act = hf.get("word_embed_proj_dim") or d, hf.get("activation_function", "relu")
    unsupported = {
        f"word_embed_proj_dim={proj_dim} != hidden_size={d} (project_in / project_out, as opt-350m)": (
            proj_dim != d
        ),
        "do_layer_norm_before=False (post-norm, as opt-350m)": not hf.get("do_layer_norm_before", True),
        "layer_norm_elementwise_affine=False": not hf.get("layer_norm_elementwise_affine", True),
        "_remove_final_layer_norm=True": hf.get("_remove_final_layer_norm", False),
        f"activation_function={act}": act != "relu",
        f"hidden_size={d} not a multiple of num_attention_heads={heads}": d % heads != 0,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"Unsupported opt config option(s) {bad}: this model variant is not implemented.")
    bias = bool(hf.get("enable_bias", True))
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=d,
        intermediate_size=hf["ffn_dim"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d // heads,
        rms_norm_eps=OPT_LAYER_NORM_EPS,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qkv_bias=bias,
        bias=bias,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        **LAYOUTS["opt"],
        family="opt",
    )


def config_from_hf(hf: Mapping[str, Any], **overrides) -> LLMConfig:
    """Our :class:`LLMConfig` from an HF ``config.json`` dict; ``overrides`` replace any field."""
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(f"Unsupported LLM model_type {kind!r}; supported: {', '.join(SUPPORTED)}.")
    if kind == "opt":
        return LLMConfig(**{**_opt_fields(hf), **overrides})
    unsupported = {
        "attention_bias": hf.get("attention_bias", False) and kind == "llama",
        "mlp_bias": hf.get("mlp_bias", False),
        "bias": hf.get("bias", False) and kind == "internlm2",
        "use_sliding_window": hf.get("use_sliding_window", False),
        f"hidden_act={hf.get('hidden_act')}": hf.get("hidden_act", "silu") != "silu",
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"Unsupported {kind} config option(s) {bad}: this model variant is not implemented.")
    heads = hf["num_attention_heads"]
    theta, scaling = _rope(hf)
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=kind == "qwen2",
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        family=kind,
    )
    fields.update(overrides)
    return LLMConfig(**fields)


# Our module per projection (the table's keys) and each family's HF module names.
MODULES = dict(q="attn/q", k="attn/k", v="attn/v", qkv="attn/qkv", o="attn/o", gate="mlp/gate", up="mlp/up",
               down="mlp/down", fc1="mlp/fc1", fc2="mlp/fc2")  # fmt: skip
# The architecture fields each family's checkpoints have (the rest: the LLMConfig defaults).
LAYOUTS = {"opt": dict(norm="layer", position_embedding="learned", position_offset=2, mlp="relu")}
OPT_LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which OPT does not configure


def hf_names(kind: str) -> dict[str, str]:
    """HF module names of ``kind``: ``layers`` the per-layer prefix (``<layers>.N.`` omitted for the
    per-layer ones), ``norm`` the final norm, ``pos`` learned positions."""
    if kind == "internlm2":
        return dict(
            embed="model.tok_embeddings", head="output", layers="model.layers", norm="model.norm",
            qkv="attention.wqkv", q="attention.wq", k="attention.wk", v="attention.wv", o="attention.wo",
            gate="feed_forward.w1", up="feed_forward.w3", down="feed_forward.w2", in_norm="attention_norm",
            post_norm="ffn_norm",
        )  # fmt: skip
    if kind == "opt":
        return dict(
            embed="model.decoder.embed_tokens", pos="model.decoder.embed_positions", head="lm_head",
            layers="model.decoder.layers", norm="model.decoder.final_layer_norm", q="self_attn.q_proj",
            k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj", fc1="fc1", fc2="fc2",
            in_norm="self_attn_layer_norm", post_norm="final_layer_norm",
        )  # fmt: skip
    return dict(
            embed="model.embed_tokens", head="lm_head", layers="model.layers", norm="model.norm",
            q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
            gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj", in_norm="input_layernorm",
            post_norm="post_attention_layernorm",
        )  # fmt: skip


def check_layout(kind: str, cfg: LLMConfig) -> None:
    """Raises ValueError unless ``cfg`` has the architecture of ``kind``'s checkpoints (e.g. an OPT LLM
    exported as llama)."""
    want = dict(norm="rms", position_embedding="rope", position_offset=0, mlp="swiglu", bias=False)
    want.update(LAYOUTS.get(kind, {}))
    if kind == "opt":
        want.update(num_kv_heads=cfg.num_heads, head_dim=cfg.hidden_size // cfg.num_heads, bias=cfg.qkv_bias)
    bad = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
    if bad:
        raise ValueError(f"A {kind} checkpoint has {want}; this LLM has {bad}.")


def llm_rules(kind: str, cfg: LLMConfig) -> list[Rule]:
    """The conversion table of one family; layer targets are stacked (``[{0}]``) when scanned."""
    check_layout(kind, cfg)
    names = hf_names(kind)
    esc = lambda name: name.replace(".", r"\.")
    L = rf"{esc(names['layers'])}\.(\d+)\."
    lay = (lambda dst: f"layers/{dst}[{{0}}]") if cfg.scan_layers else (lambda dst: f"layers_{{0}}/{dst}")
    qo, kvo = split_heads_out(cfg.num_heads), split_heads_out(cfg.num_kv_heads)
    if cfg.fused_qkv and kind != "internlm2":
        raise ValueError(f"fused_qkv=True needs an InternLM2 checkpoint (fused wqkv); this one is {kind}.")
    qkv = [("qkv", "attn/qkv/kernel", fused_qkv_out(cfg))] if cfg.fused_qkv else [
        ("q", "attn/q/kernel", qo),
        ("k", "attn/k/kernel", kvo),
        ("v", "attn/v/kernel", kvo),
    ]  # fmt: skip
    mlp = ("gate", "up", "down") if cfg.mlp == "swiglu" else ("fc1", "fc2")
    per_layer = qkv + [("o", "attn/o/kernel", merge_heads_in(cfg.num_heads))]
    per_layer += [(m, f"{MODULES[m]}/kernel", transpose) for m in mlp]
    norm_params = [("weight", "scale")] + ([("bias", "bias")] if cfg.norm == "layer" else [])
    for hf_norm, ours in (("in_norm", "input_norm"), ("post_norm", "post_attn_norm")):
        per_layer += [(f"{hf_norm}.{p}", f"{ours}/{q}", None) for p, q in norm_params]
    if cfg.bias:
        per_layer += [(f"{m}.bias", f"{MODULES[m]}/bias", None) for m in ("o", *mlp)]
    rules = [Rule(rf"{esc(names['embed'])}\.weight", "embed_tokens/embedding")]
    if cfg.position_embedding == "learned":
        rules.append(Rule(rf"{esc(names['pos'])}\.weight", "embed_positions/embedding"))
    rules += [Rule(rf"{esc(names['norm'])}\.{p}", f"norm/{q}") for p, q in norm_params]
    if not cfg.tie_word_embeddings:
        rules.append(Rule(rf"{names['head']}\.weight", "lm_head/kernel", transpose))
    for src, dst, fn in per_layer:
        module, _, param = src.partition(".")
        rules.append(Rule(rf"{L}{esc(names[module])}\.{param or 'weight'}", lay(dst), fn))
    if cfg.qkv_bias:
        for src, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads), ("v", cfg.num_kv_heads)):
            rules.append(
                Rule(rf"{L}{esc(names[src])}\.bias", lay(f"attn/{src}/bias"), split_heads_bias(heads))
            )
    return rules


def fused_qkv_out(cfg: LLMConfig) -> Transform:
    """torch ``wqkv`` (kv_heads * (q_per_kv + 2) * head_dim, in) -> ours (in, kv_heads, q_per_kv + 2,
    head_dim)."""
    shape = (cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads + 2, cfg.head_dim)
    return Transform(lambda x: x.T.reshape(x.shape[1], *shape), lambda x: x.reshape(x.shape[0], -1).T)


class _SplitFusedQKV(Mapping[str, np.ndarray]):
    """Presents each InternLM2 ``attention.wqkv.weight`` as virtual ``attention.w{q,k,v}.weight``.

    wqkv rows are grouped per kv head: (kv_heads, q_per_kv + 2, head_dim, hidden), the last two being
    that group's k and v; query head ``h`` belongs to kv head ``h // q_per_kv`` (HF ``repeat_kv``)."""

    def __init__(self, source: Mapping[str, np.ndarray], cfg: LLMConfig):
        self._src, self._cfg = source, cfg
        self._names: dict[str, tuple[str, str]] = {}
        for name in source:
            if name.endswith("attention.wqkv.weight"):
                for part in "qkv":
                    self._names[name.replace("wqkv", f"w{part}")] = (name, part)
            else:
                self._names[name] = (name, "")
        self._last: tuple[str, np.ndarray] | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        src, part = self._names[name]
        if not part:
            return self._src[src]
        if self._last is None or self._last[0] != src:  # one read serves q, k and v
            self._last = (src, np.asarray(self._src[src]))
        c = self._cfg
        g = c.num_heads // c.num_kv_heads
        w = self._last[1]
        if w.shape[0] != (g + 2) * c.num_kv_heads * c.head_dim:
            raise ConversionError(
                f"{src} has shape {w.shape}; expected ({(g + 2) * c.num_kv_heads * c.head_dim}, hidden) "
                f"for {c.num_heads} heads / {c.num_kv_heads} kv heads of size {c.head_dim}."
            )
        w = w.reshape(c.num_kv_heads, g + 2, c.head_dim, w.shape[-1])
        sel = {"q": w[:, :g], "k": w[:, g], "v": w[:, g + 1]}[part]
        return sel.reshape(-1, w.shape[-1])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class _TiedHead(Mapping[str, np.ndarray]):
    """``source`` without the output head's weight of a tied model, which some checkpoints still hold
    (e.g. OPT's ``lm_head.weight``): accepted only when it equals the embedding it is tied to."""

    def __init__(self, source: Mapping[str, np.ndarray], head: str, embed: str, what: str):
        keys = set(source)  # (``in`` on a lazy source would read the tensor)
        self._src, self._head, self._has_head = source, head, head in keys
        if self._has_head and embed in keys and not np.array_equal(source[head], source[embed]):
            raise ConversionError(
                f"Cannot load the {what}: {head} differs from {embed}, but the config ties them "
                "(tie_word_embeddings)."
            )

    def __getitem__(self, name: str) -> np.ndarray:
        if name == self._head:
            raise KeyError(name)
        return self._src[name]

    def __iter__(self) -> Iterator[str]:
        return (k for k in self._src if k != self._head)

    def __len__(self) -> int:
        return len(self._src) - self._has_head


def fit_sharding(s: jax.sharding.Sharding, shape: tuple[int, ...]) -> jax.sharding.Sharding:
    """``s`` with every array axis that its mesh axes do not evenly divide replicated instead (e.g. 3
    kv heads on a 2-way ``tensor`` axis), so any checkpoint loads on any mesh."""
    if not isinstance(s, jax.sharding.NamedSharding):
        return s
    spec = []
    for dim, axes in zip(shape, tuple(s.spec) + (None,) * (len(shape) - len(s.spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([s.mesh.shape[a] for a in names]))
        spec.append(axes if dim % size == 0 else None)
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*spec))


def read_hf_config(path: str) -> dict:
    """``config.json`` of a local HF directory, with one clear error when it is missing."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(
            f"No config.json in {path!r}: pass a local Hugging Face model directory "
            f"(supported model_type: {', '.join(SUPPORTED)})."
        )
    with open(cfg_file) as f:
        return json.load(f)


def load_llm(
    path: str,
    dtype: Any = np.float32,
    *,
    mesh: jax.sharding.Mesh | None = None,
    shardings: Any = None,
    scan_layers: bool = False,
    compute_dtype: Any = jnp.float32,
    lora_seed: int = 0,
    overlay: Mapping[str, np.ndarray] | None = None,
    **overrides,
) -> tuple[CausalLM, dict]:
    """Loads a local HF LLM directory into ``(CausalLM, {"params": ...})``.

    ``overlay``: tensors (HF names) that replace the directory's, e.g. an LLM a checkpoint saved
    whole; a name the directory lacks is an error like any unused tensor.
    ``dtype`` is the parameter dtype (``param_dtype``), ``compute_dtype`` the activation dtype;
    ``overrides`` set other :class:`LLMConfig` fields (e.g. ``remat_policy``, ``attention_impl``,
    ``lora_rank``/``lora_alpha``/``lora_targets``: LoRA adapters are not in the checkpoint, so they are
    freshly initialized, ``lora_a`` random from ``lora_seed`` and ``lora_b`` zero).
    With ``mesh`` each tensor is placed straight onto its logical sharding (or pass ``shardings``, a
    tree of ``NamedSharding`` matching the params); tensors are read one at a time. Raises
    ``ConversionError`` naming every unused, missing or mis-shaped tensor.
    """
    hf = read_hf_config(path)
    cfg = config_from_hf(
        hf, scan_layers=scan_layers, param_dtype=jnp.dtype(dtype), dtype=jnp.dtype(compute_dtype), **overrides
    )
    module = CausalLM(cfg)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.ones((1, 1), jnp.int32)))
    expected = expected_shapes(abstract["params"])
    lora_expected = {k: v for k, v in expected.items() if re.fullmatch(LORA_PATH_REGEX, k)}
    expected = {k: v for k, v in expected.items() if k not in lora_expected}
    place: Callable[[str, np.ndarray], Any]
    if shardings is None and mesh is not None:
        from pargo_jax.sharding import logical_shardings

        shardings = logical_shardings(abstract, mesh)["params"]
    if shardings is not None:
        flat = flatten(shardings)
        place = lambda name, x: jax.device_put(x, fit_sharding(flat[name], x.shape))
    else:
        place = lambda name, x: jnp.asarray(x)
    source: Mapping[str, np.ndarray] = LazySource.from_dir(path)
    if overlay:
        source = collections.ChainMap(dict(overlay), source)
    kind, what = hf["model_type"], f"{hf['model_type']} checkpoint at {path}"
    if kind == "internlm2" and not cfg.fused_qkv:
        source = _SplitFusedQKV(source, cfg)
    if cfg.tie_word_embeddings:
        names = hf_names(kind)
        source = _TiedHead(source, f"{names['head']}.weight", f"{names['embed']}.weight", what)
    params = convert(
        source,
        llm_rules(kind, cfg),
        expected,
        ignore=IGNORE,
        place=place,
        dtype=np.dtype(dtype),
        what=what,
    )
    if lora_expected:
        fresh = init_lora_params(lora_expected, seed=lora_seed, dtype=np.dtype(dtype))
        params = unflatten({**flatten(params), **{k: place(k, x) for k, x in fresh.items()}})
    return module, {"params": params}


# --- PEFT LoRA adapters ------------------------------------------------------------------------------
PEFT_PREFIX = "base_model.model."
ADAPTER_FILE, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def peft_overrides(adapter_config: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """LLMConfig fields of a PEFT ``adapter_config.json``: rank, alpha and the targets as our regex
    (InternLM2's ``wqkv`` -> ``fused_qkv=True``, one adapter on ``attn/qkv``)."""
    by_hf = {hf.split(".")[-1]: ours for ours, hf in hf_names(kind).items() if ours in MODULES}
    targets = adapter_config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = [t for t in targets if t not in by_hf]
    if unknown or not targets:
        raise ValueError(
            f"PEFT target_modules {targets} name no (or unknown: {unknown}) {kind} projections; "
            f"known: {sorted(by_hf)}."
        )
    ours = sorted({by_hf[t] for t in targets})
    regex = r".*(" + "|".join(MODULES[o] for o in ours) + ")"
    return dict(
        lora_rank=int(adapter_config["r"]),
        lora_alpha=float(adapter_config.get("lora_alpha", 8)),
        lora_targets=regex,
        fused_qkv="qkv" in ours,
    )


def lora_rules(kind: str, cfg: LLMConfig, expected: Mapping[str, tuple[int, ...]]) -> list[Rule]:
    """PEFT ``model.layers.N.<module>.lora_A[.default].weight`` (r, in) / ``lora_B`` (out, r) (OPT:
    ``model.decoder.layers.N``) -> our ``lora_a`` (in..., r) / ``lora_b`` (r, out...), in the shapes
    ``expected`` holds."""
    names = hf_names(kind)
    L = re.escape(names["layers"]) + r"\.(\d+)\."
    rules = []
    for mod, ours in MODULES.items():
        for ab, part in (("A", "lora_a"), ("B", "lora_b")):
            flat = f"layers/{ours}/{part}" if cfg.scan_layers else f"layers_0/{ours}/{part}"
            if flat not in expected:
                continue
            shape = expected[flat][1:] if cfg.scan_layers else expected[flat]
            target = f"layers/{ours}/{part}[{{0}}]" if cfg.scan_layers else f"layers_{{0}}/{ours}/{part}"
            pattern = L + re.escape(names[mod]) + rf"\.lora_{ab}(?:\.default)?\.weight"
            rules.append(Rule(pattern, target, linear_to(shape, len(shape) - 1 if part == "lora_a" else 1)))
    return rules


def load_peft_adapter(path: str, cfg: LLMConfig, kind: str) -> tuple[LLMConfig, dict[str, np.ndarray]]:
    """A PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) for a
    ``kind`` LLM of ``cfg``: the config with the adapter's rank / alpha / targets, and the adapter's
    params as ``{flat path: array}`` (every adapter tensor used, every adapter param filled)."""
    config_file, weights = os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_FILE)
    for f in (config_file, weights):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"No {os.path.basename(f)} in PEFT adapter directory {path!r}.")
    with open(config_file) as f:
        cfg = dataclasses.replace(cfg, **peft_overrides(json.load(f), kind))
    return cfg, peft_params(LazySource([weights]), cfg, kind, what=f"PEFT adapter {path!r}")


def peft_params(
    source: Mapping[str, np.ndarray], cfg: LLMConfig, kind: str, what: str = "PEFT adapter"
) -> dict[str, np.ndarray]:
    """PEFT LoRA tensors (names with or without ``base_model.model.``) -> ``{flat path: array}`` of the
    ``lora_a`` / ``lora_b`` params of a ``kind`` LLM of ``cfg`` (whose LoRA fields describe them)."""
    source = {k.removeprefix(PEFT_PREFIX): source[k] for k in source}
    module = CausalLM(cfg)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.ones((1, 1), jnp.int32)))
    expected = {
        k: v for k, v in expected_shapes(abstract["params"]).items() if re.fullmatch(LORA_PATH_REGEX, k)
    }
    return flatten(convert(source, lora_rules(kind, cfg, expected), expected, what=what))


def export_peft_adapter(
    params: Mapping[str, Any], cfg: LLMConfig, kind: str | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(``adapter_config.json``, PEFT tensors) of the LoRA adapters in our LLM params (nested or flat),
    for the HF base model of ``kind`` (default: the family it came from): the inverse of
    :func:`load_peft_adapter`. PEFT merges them as ``W + (lora_alpha / r) B A``, as we do."""
    from pargo_jax.convert.tables import export

    kind = kind or cfg.family
    flat = {k: v for k, v in flat_arrays(params).items() if re.fullmatch(LORA_PATH_REGEX, k)}
    if not flat:
        raise ValueError("The LLM has no LoRA adapters to export.")
    expected = {k: np.shape(v) for k, v in flat.items()}
    tensors = export(flat, lora_rules(kind, cfg, expected), what=f"{kind} LoRA adapter")
    names = hf_names(kind)
    adapted = [m for m, ours in MODULES.items() if any(k.endswith(f"{ours}/lora_a") for k in flat)]
    targets = sorted(names[m].split(".")[-1] for m in adapted)
    config = dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
        target_modules=targets, lora_dropout=0.0, bias="none", fan_in_fan_out=False, inference_mode=True,
        base_model_name_or_path=None,
    )  # fmt: skip
    return config, {PEFT_PREFIX + k: v for k, v in tensors.items()}


def save_peft_adapter(path: str, params: Mapping[str, Any], cfg: LLMConfig, kind: str | None = None) -> str:
    """Writes the LoRA adapters of our LLM params as a PEFT adapter directory (``adapter_config.json``
    + ``adapter_model.safetensors``), loadable by ``peft.PeftModel.from_pretrained`` over the base LLM
    and by :func:`load_peft_adapter`."""
    from safetensors.numpy import save_file

    config, tensors = export_peft_adapter(params, cfg, kind)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
              os.path.join(path, ADAPTER_FILE))  # fmt: skip
    return path


# --- export: our LLM -> a Hugging Face directory ----------------------------------------------------
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "internlm2": "InternLM2ForCausalLM",
    "opt": "OPTForCausalLM",
}


def hf_config(cfg: LLMConfig, kind: str) -> dict[str, Any]:
    """The ``config.json`` of ``cfg`` as a ``kind`` model (the inverse of :func:`config_from_hf`)."""
    check_layout(kind, cfg)
    if kind == "opt":
        if cfg.rms_norm_eps != OPT_LAYER_NORM_EPS:
            raise ValueError(f"OPT's LayerNorm eps is {OPT_LAYER_NORM_EPS}; this LLM has {cfg.rms_norm_eps}.")
        return dict(
            model_type=kind, architectures=[ARCHITECTURES[kind]], vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size, word_embed_proj_dim=cfg.hidden_size, ffn_dim=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            max_position_embeddings=cfg.max_position_embeddings, do_layer_norm_before=True,
            activation_function="relu", enable_bias=cfg.bias, layer_norm_elementwise_affine=True,
            tie_word_embeddings=cfg.tie_word_embeddings, torch_dtype="float32",
        )  # fmt: skip
    out = dict(
        model_type=kind,
        architectures=[ARCHITECTURES[kind]],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        torch_dtype="float32",
    )
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
    if kind == "internlm2":
        out["bias"] = False  # transformers runs InternLM2 only with its own remote code
    return out


def fuse_qkv(params: Mapping[str, np.ndarray], cfg: LLMConfig) -> dict[str, np.ndarray]:
    """Flat LLM params with each layer's q / k / v kernels joined into InternLM2's ``qkv`` layout."""
    g = cfg.num_heads // cfg.num_kv_heads
    out = dict(params)
    for key in [k for k in params if k.endswith("attn/q/kernel")]:
        q, k, v = (np.asarray(out.pop(key.replace("/q/", f"/{p}/"))) for p in "qkv")
        q = q.reshape(*q.shape[:-2], cfg.num_kv_heads, g, cfg.head_dim)
        out[key.replace("/q/", "/qkv/")] = np.concatenate([q, k[..., None, :], v[..., None, :]], axis=-2)
    return out


def export_llm(
    params: Mapping[str, Any], cfg: LLMConfig, kind: str | None = None
) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json, HF tensors) of our LLM params (nested or flat; LoRA must be merged first) in the
    layout of ``kind`` (default: the family it came from)."""
    from pargo_jax.convert.tables import export

    kind = kind or cfg.family
    flat = flat_arrays(params)
    if any(re.fullmatch(LORA_PATH_REGEX, k) for k in flat):
        raise ValueError("The LLM params hold LoRA adapters; merge them first (pargo_jax.lora.merge_lora).")
    if kind == "internlm2" and not cfg.fused_qkv:
        flat, cfg = fuse_qkv(flat, cfg), dataclasses.replace(cfg, fused_qkv=True)
    return hf_config(cfg, kind), export(flat, llm_rules(kind, cfg), what=f"{kind} LLM")


def save_llm(
    path: str,
    params: Mapping[str, Any],
    cfg: LLMConfig,
    kind: str | None = None,
    max_shard_bytes: int = 2 << 30,
) -> str:
    """Writes our LLM as a standard HF directory (``config.json``, safetensors, sharded with an index
    past ``max_shard_bytes``) that :func:`load_llm` (and, for llama / qwen2 / opt, transformers'
    ``AutoModelForCausalLM``) reads back."""
    from pargo_jax.convert.tables import save_safetensors

    config, tensors = export_llm(params, cfg, kind)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_safetensors(path, tensors, max_shard_bytes)
    return path


def unfuse_qkv(params: Mapping[str, np.ndarray], cfg: LLMConfig) -> dict[str, np.ndarray]:
    """The inverse of :func:`fuse_qkv`: each ``qkv`` kernel cut back into q / k / v kernels."""
    g = cfg.num_heads // cfg.num_kv_heads
    out = dict(params)
    for key in [k for k in params if k.endswith("attn/qkv/kernel")]:
        w = np.asarray(out.pop(key))
        out[key.replace("/qkv/", "/q/")] = w[..., :g, :].reshape(*w.shape[:-3], cfg.num_heads, cfg.head_dim)
        out[key.replace("/qkv/", "/k/")] = w[..., g, :]
        out[key.replace("/qkv/", "/v/")] = w[..., g + 1, :]
    return out
