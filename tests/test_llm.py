"""Decoder LLMs: HF import parity per family, padding, KV cache, scan, sharded load, import errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from pargo_jax import sharding
from pargo_jax.convert.hf import load_llm
from pargo_jax.convert.tables import ConversionError
from pargo_jax.models.llm import unscanned
from tests.torch_refs.tiny_llm import FAMILIES, checkpoint

IDS = np.random.RandomState(0).randint(3, 128, (2, 11))


def _hf_logits(model, ids, mask=None):
    import torch

    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kw).logits.numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family):
    ref_model, path = checkpoint(family)
    module, variables = load_llm(path)
    assert module.config.tie_word_embeddings == (family == "smollm2")
    assert module.config.qkv_bias == (family == "qwen2")
    assert (module.config.rope_scaling is not None) == (family == "llama3")
    logits = np.asarray(jax.jit(module.apply)(variables, jnp.asarray(IDS)))
    assert logits.shape == (2, 11, 128)
    np.testing.assert_allclose(logits, _hf_logits(ref_model, IDS), atol=1e-4, rtol=0)


def test_left_padding_and_kv_cache_match_unpadded():
    module, variables = load_llm(checkpoint("llama")[1])
    apply = jax.jit(module.apply)
    full = np.asarray(apply(variables, jnp.asarray(IDS)))
    # Row 1 left-padded by 4: its real tokens must give the same logits as the unpadded sequence.
    ids, mask = IDS.copy(), np.ones_like(IDS)
    ids[1, :4], mask[1, :4] = 0, 0
    padded = np.asarray(apply(variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    unpadded_row1 = np.asarray(apply(variables, jnp.asarray(IDS[1:, 4:])))
    np.testing.assert_allclose(padded[1, 4:], unpadded_row1[0], atol=1e-5)
    np.testing.assert_allclose(padded[0], full[0], atol=1e-5)
    assert np.isfinite(padded).all()
    # Same batch fed through the cache in two chunks (prefill 7, then 4) equals one padded call.
    cache = module.init_cache(2, 16)
    a, cache = apply(variables, jnp.asarray(ids[:, :7]), attention_mask=jnp.asarray(mask[:, :7]), cache=cache)
    b, cache = apply(variables, jnp.asarray(ids[:, 7:]), attention_mask=jnp.asarray(mask[:, 7:]), cache=cache)
    assert int(cache.index) == 11 and cache.mask.sum() == 22 - 4
    chunked = np.concatenate([a, b], 1)
    np.testing.assert_allclose(chunked[0], padded[0], atol=1e-5)
    np.testing.assert_allclose(chunked[1, 4:], padded[1, 4:], atol=1e-5)  # pad positions are don't-care


def test_inputs_embeds_equal_input_ids():
    module, variables = load_llm(checkpoint("smollm2")[1])
    embeds = module.apply(variables, jnp.asarray(IDS), method=module.embed)
    assert embeds.shape == (2, 11, 64)
    apply = jax.jit(module.apply)
    np.testing.assert_allclose(
        apply(variables, inputs_embeds=embeds), apply(variables, jnp.asarray(IDS)), atol=1e-6
    )
    with pytest.raises(ValueError, match="exactly one"):
        module.apply(variables, jnp.asarray(IDS), inputs_embeds=embeds)


def test_scan_layers_with_remat_equals_unscanned():
    path = checkpoint("llama3")[1]
    module, variables = load_llm(path)
    scanned, svars = load_llm(path, scan_layers=True, remat_policy="dots_with_no_batch_dims_saveable")
    assert svars["params"]["layers"]["attn"]["q"]["kernel"].shape == (2, 64, 4, 16)
    np.testing.assert_allclose(
        jax.jit(scanned.apply)(svars, jnp.asarray(IDS)),
        jax.jit(module.apply)(variables, jnp.asarray(IDS)),
        atol=1e-5,
    )
    # Gradients flow through scan + remat and agree with the unscanned model.
    loss = lambda m: lambda v: m.apply(v, jnp.asarray(IDS)).astype(jnp.float32).std()
    g_scan = jax.jit(jax.grad(loss(scanned)))(svars)["params"]["layers"]["mlp"]["down"]["kernel"][1]
    g_flat = jax.jit(jax.grad(loss(module)))(variables)["params"]["layers_1"]["mlp"]["down"]["kernel"]
    np.testing.assert_allclose(g_scan, g_flat, atol=1e-6)
    # ... and unscanned() lays the stack out as the unscanned import does, array for array.
    config, params = unscanned(scanned.config, svars["params"])
    assert not config.scan_layers and config == dataclasses.replace(scanned.config, scan_layers=False)
    assert jax.tree.structure(params) == jax.tree.structure(variables["params"])
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, variables["params"])))


def test_bf16_params_and_compute_close_to_fp32():
    module, variables = load_llm(checkpoint("qwen2")[1])
    half, hvars = load_llm(checkpoint("qwen2")[1], jnp.bfloat16, compute_dtype=jnp.bfloat16)
    assert hvars["params"]["layers_0"]["attn"]["q"]["bias"].dtype == jnp.bfloat16
    out = jax.jit(half.apply)(hvars, jnp.asarray(IDS))
    assert out.dtype == jnp.bfloat16
    ref = np.asarray(jax.jit(module.apply)(variables, jnp.asarray(IDS)))
    assert np.abs(np.asarray(out, np.float32) - ref).max() < 0.1 * np.abs(ref).max()


def test_sharded_load_matches_unsharded():
    path = checkpoint("qwen2")[1]
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))  # multi-file checkpoint
    module, variables = load_llm(path)
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    smodule, svars = load_llm(path, mesh=mesh)
    q = svars["params"]["layers_0"]["attn"]["q"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (16, 2, 16)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        out = jax.jit(smodule.apply)(svars, jnp.asarray(np.tile(IDS, (4, 1))))
    np.testing.assert_allclose(out[:2], jax.jit(module.apply)(variables, jnp.asarray(IDS)), atol=1e-5)
    # An axis its mesh axes cannot divide (1 kv head on tensor=2) is replicated instead of failing.
    _, tied = load_llm(checkpoint("smollm2")[1], mesh=mesh)
    k = tied["params"]["layers_0"]["attn"]["k"]["kernel"]
    assert k.shape == (64, 1, 16) and k.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, None)


# --- errors ----------------------------------------------------------------------------------------
def _edited_copy(tmp_path, edit):
    """Copy of the single-file llama checkpoint with its tensors edited by ``edit(dict)``."""
    from safetensors.numpy import load_file, save_file

    src = checkpoint("llama")[1]
    dst = str(tmp_path / "ckpt")
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


def test_error_missing_tensor(tmp_path):
    path = _edited_copy(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ConversionError, match=r"not filled: layers_1/mlp/up/kernel"):
        load_llm(path)


def test_error_extra_tensor(tmp_path):
    path = _edited_copy(tmp_path, lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ConversionError, match=r"unused tensor\(s\).*model\.extra\.weight"):
        load_llm(path)


def test_error_wrong_shape(tmp_path):
    path = _edited_copy(tmp_path, lambda t: t.update({"model.norm.weight": np.ones(65, np.float32)}))
    with pytest.raises(ConversionError, match=r"norm/scale: model\.norm\.weight has shape \(65,\)"):
        load_llm(path)


def test_error_unknown_model_type_and_missing_dir(tmp_path):
    path = str(tmp_path / "m")
    shutil.copytree(checkpoint("llama")[1], path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**cfg, "model_type": "gpt2"}, f)
    with pytest.raises(ValueError, match=r"'gpt2'.*supported: llama, qwen2, internlm2"):
        load_llm(path)
    with pytest.raises(FileNotFoundError, match=r"No config\.json in .*nowhere"):
        load_llm(str(tmp_path / "nowhere"))
    os.remove(os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(FileNotFoundError, match="No safetensors weights"):
        load_llm(path)
