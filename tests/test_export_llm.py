"""LLM export: our params -> a Hugging Face directory. Export -> import gives identical params, the
exported tensors equal the source checkpoint's (every family, scanned or not, sharded or not), and
transformers' AutoModelForCausalLM computes the JAX logits from the exported directory."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pargo_jax.convert.hf import export_llm, load_llm, save_llm
from pargo_jax.convert.tables import LazySource
from pargo_jax.param_tree import flatten
from tests.torch_refs.tiny_llm import FAMILIES, checkpoint

IDS = np.random.RandomState(0).randint(3, 128, (2, 9))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scanned"])
def test_export_equals_the_source_checkpoint(family, scan):
    _, path = checkpoint(family)
    module, variables = load_llm(path, scan_layers=scan)
    kind = "internlm2" if family == "internlm2" else ("qwen2" if family == "qwen2" else "llama")
    config, tensors = export_llm(variables["params"], module.config, kind)
    source = LazySource.from_dir(path)
    assert sorted(tensors) == sorted(source)  # every tensor, no more
    for name, x in tensors.items():
        np.testing.assert_array_equal(x, source[name], err_msg=name)
    assert config["model_type"] == kind and config["num_key_value_heads"] == module.config.num_kv_heads


@pytest.mark.parametrize("family", ["llama3", "qwen2", "smollm2", "internlm2"])
def test_saved_directory_loads_back_and_in_transformers(family, tmp_path):
    _, path = checkpoint(family)
    module, variables = load_llm(path, fused_qkv=family == "internlm2")
    kind = {"qwen2": "qwen2", "internlm2": "internlm2"}.get(family, "llama")
    out = save_llm(str(tmp_path / "llm"), variables["params"], module.config, kind, max_shard_bytes=40_000)
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))  # sharded, with an index
    again_module, again = load_llm(out, fused_qkv=family == "internlm2")
    assert again_module.config == module.config
    jax.tree.map(np.testing.assert_array_equal, again["params"], variables["params"])
    if family == "internlm2":
        return  # transformers has no InternLM2 (it needs the model's remote code)
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        want = hf(torch.tensor(IDS)).logits.numpy()
    got = np.asarray(jax.jit(module.apply)(variables, jnp.asarray(IDS)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_lora_must_be_merged_first():
    from pargo_jax.lora import merge_lora

    _, path = checkpoint("llama")
    module, variables = load_llm(path, lora_rank=2, lora_targets=r".*attn/q")
    with pytest.raises(ValueError, match="merge them first"):
        export_llm(variables["params"], module.config, "llama")
    merged = merge_lora(variables["params"], module.config)
    _, tensors = export_llm(merged, module.config, "llama")
    assert "model.layers.0.self_attn.q_proj.weight" in tensors and len(flatten(merged)) == len(tensors)
