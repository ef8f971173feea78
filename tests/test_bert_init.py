"""``model.projector.init_from_bert``: what the release's ``init_ParGo`` takes from BERT, tensor by
tensor against transformers' BertModel (random weights), the rest left new; both file layouts
(BertModel safetensors; BertForPreTraining ``pytorch_model.bin`` with ``bert.`` and ``cls.`` keys, as
bert-small ships)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from data_pipelines.text import load_tokenizer
from pargo_jax import runs, sharding
from pargo_jax.models import factory
from tests.demo import demo_config

# The demo ParGo's width: hidden 64, 4 heads, 2 layers, 64 positions.
BERT = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96, vocab_size=50)


def tiny_bert(path: str, *, pretraining: bool = False, **overrides) -> dict[str, np.ndarray]:
    """A random BERT saved to ``path``; returns its BertModel tensors (no ``bert.`` prefix)."""
    from transformers import BertConfig, BertForPreTraining, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(**{**BERT, "max_position_embeddings": 80, **overrides})
    model = (BertForPreTraining if pretraining else BertModel)(cfg)
    with torch.no_grad():  # non-trivial LayerNorms and biases, so a wrong mapping shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=not pretraining)
    state = model.state_dict()
    return {k.removeprefix("bert."): v.numpy() for k, v in state.items()}


def init_projector(shapes_dir: str, bert_dir: str | None, **overrides) -> dict[str, np.ndarray]:
    config = demo_config(shapes_dir, 1, **{**overrides, "model.projector.init_from_bert": bert_dir})
    tok = load_tokenizer(os.path.join(shapes_dir, "shapes_tokenizer"))
    mesh = runs.mesh_for(config)
    with sharding.mesh_context(mesh):
        parts = factory.build(runs.model_config(config, tok), mesh)
        params = runs.init_params(parts, config)
    return {k: np.asarray(v) for k, v in params["projector"].items()}


@pytest.mark.parametrize(
    "pretraining", [False, True], ids=["BertModel-safetensors", "BertForPreTraining-bin"]
)
def test_pargo_takes_what_init_pargo_takes_from_bert(shapes_dir, tmp_path, pretraining):
    bert = tiny_bert(str(tmp_path / "bert"), pretraining=pretraining)
    p = init_projector(shapes_dir, str(tmp_path / "bert"), **{"model.projector.init": "bert"})
    lin = lambda name: bert[name].T  # torch Linear (out, in) -> our (in, out)
    np.testing.assert_array_equal(
        p["position_embeddings"], bert["embeddings.position_embeddings.weight"][:64]
    )
    np.testing.assert_array_equal(p["embed_norm_scale"], bert["embeddings.LayerNorm.weight"])
    np.testing.assert_array_equal(p["embed_norm_bias"], bert["embeddings.LayerNorm.bias"])
    for i in range(2):
        layer = f"encoder.layer.{i}.attention."
        for j, proj in enumerate(("query", "key", "value")):
            np.testing.assert_array_equal(p["self_qkv_kernel"][i, j], lin(layer + f"self.{proj}.weight"))
            np.testing.assert_array_equal(p["self_qkv_bias"][i, j], bert[layer + f"self.{proj}.bias"])
        np.testing.assert_array_equal(p["self_out_kernel"][i], lin(layer + "output.dense.weight"))
        np.testing.assert_array_equal(p["self_out_bias"][i], bert[layer + "output.dense.bias"])
        np.testing.assert_array_equal(p["self_norm_scale"][i], bert[layer + "output.LayerNorm.weight"])
        np.testing.assert_array_equal(p["self_norm_bias"][i], bert[layer + "output.LayerNorm.bias"])
    # New, as in the release: queries, cross-attention, the query FFN, llm_proj (normal 0.02, zero bias).
    for name in (
        "query_tokens",
        "cross_q_kernel",
        "cross_kv_kernel",
        "fc1_kernel",
        "fc2_kernel",
        "llm_proj_kernel",
    ):
        assert abs(p[name].std() - 0.02) < 0.004, name
    for name in ("cross_q_bias", "fc1_bias", "llm_proj_bias"):
        assert not p[name].any(), name
    np.testing.assert_array_equal(p["ffn_norm_scale"], 1.0)
    # The text FFN (intermediate / output) is BERT's, not ParGo's: fc1 is not it.
    assert (
        p["fc1_kernel"].shape[-1] == 128 and bert["encoder.layer.0.intermediate.dense.weight"].shape[0] == 96
    )


def test_random_init_differs_and_bad_berts_are_named(shapes_dir, tmp_path):
    tiny_bert(str(tmp_path / "bert"))
    with_bert = init_projector(shapes_dir, str(tmp_path / "bert"))
    without = init_projector(shapes_dir, None)
    assert not np.array_equal(with_bert["self_qkv_kernel"], without["self_qkv_kernel"])
    np.testing.assert_array_equal(with_bert["fc1_kernel"], without["fc1_kernel"])  # same seed, untouched
    tiny_bert(str(tmp_path / "wide"), hidden_size=128)
    with pytest.raises(ValueError, match=r"hidden_size=128 \(ParGo: 64\)"):
        init_projector(shapes_dir, str(tmp_path / "wide"))
    tiny_bert(str(tmp_path / "short"), max_position_embeddings=32)
    with pytest.raises(ValueError, match="has 32 positions; ParGo needs max_positions=64"):
        init_projector(shapes_dir, str(tmp_path / "short"))
    with pytest.raises(FileNotFoundError, match="init_from_bert path"):
        init_projector(shapes_dir, str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="applies to the BERT-shaped projectors"):
        init_projector(shapes_dir, str(tmp_path / "bert"), **{"model.projector": {"name": "mlp"}})
