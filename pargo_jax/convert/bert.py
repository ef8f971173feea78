"""ParGo initialized from a BERT checkpoint, as the release's ``init_ParGo`` does.

The release builds its projector with ``BertLMHeadModel.from_pretrained(bert_type)`` (bert-small) and
then drops the text branch, so what it keeps from BERT is: the position embeddings and embedding
LayerNorm, and per layer the self-attention (query, key, value) with its output dense + LayerNorm.
Everything else is new, with BERT's initializer (normal 0.02, zero biases, unit LayerNorms): the
queries, ``ln_vision``, cross-attention (BERT has none), the query FFN (``intermediate_query`` /
``output_query``: not in BERT) and ``llm_proj``. BERT tensors ParGo has no use for (word and
token-type embeddings, the text FFNs, pooler, MLM / NSP heads) are counted and skipped; any other
tensor is an error, so a non-BERT directory cannot pass silently.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np
from absl import logging

from pargo_jax.convert import official
from pargo_jax.convert.tables import ConversionError, LazySource, TorchSource, convert, read_torch_file
from pargo_jax.models.projectors.pargo import ParGoConfig

# Our ParGo params that BERT provides (all of them, for every layer).
FROM_BERT = (
    "position_embeddings",
    "embed_norm_scale",
    "embed_norm_bias",
    "self_qkv_kernel",
    "self_qkv_bias",
    "self_out_kernel",
    "self_out_bias",
    "self_norm_scale",
    "self_norm_bias",
)
_LAYER = r"encoder\.layer\.\d+\."
UNUSED = (
    r"embeddings\.(word_embeddings|token_type_embeddings)\.weight",
    r"embeddings\.position_ids",
    _LAYER + r"(intermediate|output)\.(dense|LayerNorm)\.(weight|bias)",
    r"pooler\..*",
    r"cls\..*",
)


def read_bert(path: str) -> tuple[dict, Mapping[str, np.ndarray]]:
    """(config.json, tensors without the ``bert.`` prefix) of a local HF BERT directory (safetensors,
    or ``pytorch_model.bin`` with the torch extra)."""
    from pargo_jax.convert.hf import read_hf_config

    cfg = read_hf_config(path)
    if cfg.get("model_type") != "bert":
        raise ValueError(
            f"model.projector.init_from_bert={path!r} is a {cfg.get('model_type')!r} model, not BERT."
        )
    if any(f.endswith(".safetensors") for f in os.listdir(path)):
        source: Mapping[str, np.ndarray] = LazySource.from_dir(path)
    elif os.path.exists(bin_file := os.path.join(path, "pytorch_model.bin")):
        source = TorchSource(read_torch_file(bin_file))
    else:
        raise FileNotFoundError(f"No model.safetensors or pytorch_model.bin in BERT directory {path!r}.")
    return cfg, {k.removeprefix("bert."): source[k] for k in source}


def pargo_from_bert(
    path: str, cfg: ParGoConfig, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """``{param name: array}`` for the :data:`FROM_BERT` params of a ParGo of ``cfg`` (whose param
    ``shapes`` are given), read from the BERT directory ``path``. Hidden size, heads and layers must
    agree; BERT needs at least ``max_positions`` position rows, of which the first are taken."""
    if not isinstance(cfg, ParGoConfig):
        raise ValueError(
            "model.projector.init_from_bert applies to the BERT-shaped projectors (pargo, qformer), "
            f"not {type(cfg).__name__}."
        )
    bert, tensors = read_bert(path)
    want = {"hidden_size": cfg.hidden, "num_attention_heads": cfg.heads, "num_hidden_layers": cfg.layers}
    wrong = [f"{k}={bert.get(k)} (ParGo: {v})" for k, v in want.items() if bert.get(k) != v]
    if wrong:
        raise ValueError(
            f"BERT {path!r} does not fit this ParGo: {', '.join(wrong)}; set model.projector.hidden / heads "
            "/ layers to the BERT's."
        )
    rows = bert.get("max_position_embeddings", 0)
    if rows < cfg.max_positions:
        raise ValueError(
            f"BERT {path!r} has {rows} positions; ParGo needs max_positions={cfg.max_positions}."
        )
    unused_re = [re.compile(p) for p in UNUSED]
    taken, unused = {}, 0
    for name, value in tensors.items():
        if any(p.fullmatch(name) for p in unused_re):
            unused += 1
            continue
        if name == "embeddings.position_embeddings.weight":
            value = np.asarray(value)[: cfg.max_positions]
        taken["bert." + name] = value
    rules = [r for r in official.projector_rules() if r.target.split("[")[0] in FROM_BERT]
    expected = {k: shapes[k] for k in FROM_BERT}
    try:
        params = convert(taken, rules, expected, dtype=np.float32, what=f"BERT checkpoint {path!r}")
    except ConversionError as e:
        raise ConversionError(f"{e} (BERT's own unused tensors: {UNUSED})") from None
    logging.info(
        "ParGo from BERT %s: %d tensors taken, %d text-branch tensors unused.", path, len(taken), unused
    )
    return params
