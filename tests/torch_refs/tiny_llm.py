"""Tiny random Hugging Face decoder checkpoints (torch CPU, float32) for LLM import/generation tests.

``checkpoint(family)`` returns ``(torch reference model, local directory)``, built once per process:

  llama      Llama, GQA 4 heads / 2 kv heads
  llama3     + llama3 ("Llama 3.1") RoPE scaling, theta 5e5
  qwen2      Qwen2 with q/k/v biases, saved as sharded safetensors with an index
  smollm2    Llama with tied input/output embeddings, 1 kv head
  internlm2  the ``llama`` weights rewritten in InternLM2 layout (fused ``wqkv`` grouped per kv head as
             [q x q_per_kv, k, v], ``tok_embeddings``, ``wo``, ``w1/w3/w2``, ``output``, ...), two
             shards; transformers ships no InternLM2, so its reference is the Llama model itself
"""

from __future__ import annotations

import functools
import json
import os
import tempfile

import numpy as np

FAMILIES = ("llama", "llama3", "qwen2", "smollm2", "internlm2")
COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


@functools.cache
def _root() -> str:
    return tempfile.mkdtemp(prefix="tiny_llm_")


def _randomize(model, seed: int):
    """Larger-than-default random weights (and non-trivial norms/biases) so every mapping matters and
    next-token distributions are peaked enough for exact greedy/beam comparisons."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(0.15 * noise if p.ndim > 1 else (1 + 0.1 * noise if p.abs().sum() > 0 else 0.1 * noise))
    return model.eval()


@functools.cache
def checkpoint(family: str):
    """(torch model, directory) for ``family`` in :data:`FAMILIES`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    path = os.path.join(_root(), family)
    if family == "llama":
        model = _randomize(LlamaForCausalLM(LlamaConfig(**COMMON)), 0)
    elif family == "llama3":
        rope = dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=16,
        )  # fmt: skip
        model = _randomize(LlamaForCausalLM(LlamaConfig(**COMMON, rope_parameters=rope)), 1)
    elif family == "qwen2":
        model = _randomize(Qwen2ForCausalLM(Qwen2Config(**COMMON, rope_theta=1e6)), 2)
        model.save_pretrained(path, max_shard_size="100KB")
        return model, path
    elif family == "smollm2":
        cfg = LlamaConfig(**{**COMMON, "num_key_value_heads": 1}, tie_word_embeddings=True)
        model = _randomize(LlamaForCausalLM(cfg), 3)
    elif family == "internlm2":
        model, _ = checkpoint("llama")
        write_internlm2(model, path)
        return model, path
    else:
        raise ValueError(f"unknown family {family!r}")
    model.save_pretrained(path)
    return model, path


def write_internlm2(llama_model, path: str) -> None:
    """Writes ``llama_model``'s weights as an InternLM2 checkpoint (2 safetensors shards + index)."""
    from safetensors.numpy import save_file

    c = llama_model.config
    heads, kv, d = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    g = heads // kv
    sd = {k: v.detach().numpy() for k, v in llama_model.state_dict().items()}
    out = {
        "model.tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "model.norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(c.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"model.layers.{i}."
        wq = sd[p + "self_attn.q_proj.weight"].reshape(kv, g, d, -1)
        wk = sd[p + "self_attn.k_proj.weight"].reshape(kv, 1, d, -1)
        wv = sd[p + "self_attn.v_proj.weight"].reshape(kv, 1, d, -1)
        out[q + "attention.wqkv.weight"] = np.concatenate([wq, wk, wv], 1).reshape(-1, c.hidden_size)
        out[q + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[q + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[q + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[q + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[q + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    os.makedirs(path, exist_ok=True)
    names = sorted(out)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2]}
    shards["model-00002-of-00002.safetensors"] = names[len(names) // 2 :]
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: np.ascontiguousarray(out[k]) for k in keys}, os.path.join(path, file))
        weight_map.update({k: file for k in keys})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config = dict(
        model_type="internlm2",
        architectures=["InternLM2ForCausalLM"],
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        hidden_act="silu",
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=10000.0,
        rope_scaling=None,
        bias=False,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def edit_checkpoint(src: str, dst: str, edits: dict) -> None:
    """Copies the HF directory ``src`` to ``dst`` with ``edits[name](array) -> array`` applied to the
    named tensors (shards and index kept)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    for f in os.listdir(dst):
        if f.endswith(".safetensors"):
            tensors = load_file(os.path.join(dst, f))
            hit = {
                k: np.ascontiguousarray(edits[k](v)).astype(v.dtype) for k, v in tensors.items() if k in edits
            }
            if hit:
                save_file({**tensors, **hit}, os.path.join(dst, f))
