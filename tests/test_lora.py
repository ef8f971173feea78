"""LoRA adapters on CausalLM projections: identity at init, merge parity (scanned and not), targeting,
and HF import with fresh adapters."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from pargo_jax.lora import lora_param_count, merge_lora
from pargo_jax.models.layers import path_matches
from pargo_jax.models.llm import CausalLM, LLMConfig
from pargo_jax.param_tree import flatten, unflatten

BASE = LLMConfig(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4
)
IDS = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 5)))


def _init(cfg):
    return nn.unbox(CausalLM(cfg).init(jax.random.key(0), IDS))


def _perturb(params):
    flat = flatten(params)
    keys = jax.random.split(jax.random.key(1), len(flat))
    return unflatten(
        {
            k: v + 0.3 * jax.random.normal(kk, v.shape) if k.endswith(("lora_a", "lora_b")) else v
            for kk, (k, v) in zip(keys, flat.items())
        }
    )


def test_lora_path_matches_suffixes():
    assert path_matches(r"layers_\d+/attn/(q|v)", "llm/layers_1/attn/q")
    assert path_matches(r"layers_\d+/attn/(q|v)", ("layers_0", "attn", "v"))
    assert not path_matches(r"layers_\d+/attn/(q|v)", "layers_0/attn/k")
    assert not path_matches(r"attn/q", "layers_0/attn/qq")


@pytest.mark.parametrize("scan", [False, True])
def test_merge_matches_unmerged(scan):
    lora_cfg = dataclasses.replace(
        BASE, scan_layers=scan, lora_rank=3, lora_alpha=6.0, lora_targets=r".*attn/(q|v|o)|.*mlp/down"
    )
    base_cfg = dataclasses.replace(BASE, scan_layers=scan)
    variables = _init(lora_cfg)
    flat = flatten(variables["params"])
    adapted = sorted({k.rsplit("/", 1)[0] for k in flat if "lora" in k})
    layers = ["layers"] if scan else ["layers_0", "layers_1"]
    targets = ("attn/o", "attn/q", "attn/v", "mlp/down")
    assert adapted == sorted(f"{lay}/{m}" for lay in layers for m in targets)
    assert all(np.all(v == 0) for k, v in flat.items() if k.endswith("lora_b"))

    # b = 0: the adapted model equals the base model on the same base weights.
    base_params = merge_lora(variables["params"], lora_cfg)
    assert lora_param_count(base_params) == 0 and set(flatten(base_params)) == set(
        flatten(_init(base_cfg)["params"])
    )
    lora_apply, base_apply = jax.jit(CausalLM(lora_cfg).apply), jax.jit(CausalLM(base_cfg).apply)
    lora_logits = lora_apply(variables, IDS)
    base_logits = base_apply({"params": base_params}, IDS)
    np.testing.assert_allclose(lora_logits, base_logits, atol=1e-6)

    # Trained adapters: merged weights in a rank-0 model give the same logits.
    trained = {"params": _perturb(variables["params"])}
    lora_logits = lora_apply(trained, IDS)
    merged = base_apply({"params": merge_lora(trained["params"], lora_cfg)}, IDS)
    assert np.abs(lora_logits - base_logits).max() > 1e-3  # the adapters matter
    np.testing.assert_allclose(lora_logits, merged, atol=1e-5)

    d, f = BASE.hidden_size, BASE.intermediate_size
    qd, kvd = BASE.num_heads * BASE.head_dim, BASE.num_kv_heads * BASE.head_dim
    per_layer = 3 * ((d + qd) + (d + kvd) + (qd + d) + (f + d))
    assert lora_param_count(variables) == 2 * per_layer


def test_lora_logical_axes():
    cfg = dataclasses.replace(BASE, scan_layers=True, lora_rank=2, lora_targets=r".*attn/o")
    boxed = jax.eval_shape(lambda: CausalLM(cfg).init(jax.random.key(0), IDS))["params"]
    o = boxed["layers"]["attn"]["o"]
    assert o["lora_a"].names == ("layers", "heads", "head_dim", None)
    assert o["lora_b"].names == ("layers", None, "embed")


def test_bad_lora_config():
    with pytest.raises(ValueError, match="lora_targets"):
        dataclasses.replace(BASE, lora_rank=4)


def test_hf_import_initializes_adapters():
    from pargo_jax.convert.hf import load_llm
    from tests.torch_refs.tiny_llm import checkpoint

    path = checkpoint("qwen2")[1]
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 128, (1, 7)))
    module, variables = load_llm(path)
    lmod, lvars = load_llm(path, scan_layers=True, lora_rank=4, lora_targets=r".*attn/(q|k|v|o)")
    q = lvars["params"]["layers"]["attn"]["q"]
    assert q["lora_a"].shape == (2, 64, 4) and np.abs(np.asarray(q["lora_a"])).max() > 0
    assert np.all(np.asarray(q["lora_b"]) == 0)
    o = lvars["params"]["layers"]["attn"]["o"]["lora_a"]
    assert np.asarray(o).std() == pytest.approx(1 / np.sqrt(3 * 64), rel=0.3)  # U(+-1/sqrt(fan_in))
    np.testing.assert_allclose(
        jax.jit(lmod.apply)(lvars, ids), jax.jit(module.apply)(variables, ids), atol=1e-5
    )


def _internlm2_logits(path, ids, **overrides):
    from pargo_jax.convert.hf import load_llm

    module, variables = load_llm(path, **overrides)
    return np.asarray(jax.jit(module.apply)(variables, ids)), module, variables


@pytest.mark.parametrize("scan", [False, True])
def test_fused_wqkv_and_a_peft_adapter_on_it(tmp_path, scan):
    """InternLM2 with ``fused_qkv`` equals the split layout (itself checked against transformers); a PEFT
    adapter on ``wqkv`` (one A, one B over the fused output) equals its merge W + (alpha / r) B A done
    in torch's layout on the checkpoint file."""
    from safetensors.numpy import save_file

    from pargo_jax.convert.hf import load_peft_adapter
    from tests.torch_refs.tiny_llm import checkpoint, edit_checkpoint

    _, path = checkpoint("internlm2")
    ids = jnp.asarray(np.random.RandomState(1).randint(3, 128, (2, 9)))
    split, _, _ = _internlm2_logits(path, ids, scan_layers=scan)
    fused, module, variables = _internlm2_logits(path, ids, scan_layers=scan, fused_qkv=True)
    kernel = variables["params"]["layers" if scan else "layers_0"]["attn"]["qkv"]["kernel"]
    assert kernel.shape == ((2,) if scan else ()) + (64, 2, 4, 16)  # (in, kv heads, 2 q + k + v, head_dim)
    np.testing.assert_allclose(fused, split, atol=1e-5)

    r, alpha, rng = 4, 8.0, np.random.RandomState(2)
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    adapter.mkdir()
    tensors, edits = {}, {}
    for i in range(2):
        a, b = rng.normal(0, 0.3, (r, 64)), rng.normal(0, 0.3, (128, r))
        name = f"model.layers.{i}.attention.wqkv"
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.astype(np.float32)
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.astype(np.float32)
        edits[f"{name}.weight"] = lambda w, a=a, b=b: w + alpha / r * b @ a  # PEFT: W + (alpha / r) B A
    edit_checkpoint(path, str(merged), edits)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["wqkv"]})
    )
    want, _, _ = _internlm2_logits(str(merged), ids)  # the merged file, loaded through the split path
    cfg, lora = load_peft_adapter(str(adapter), module.config, "internlm2")
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.fused_qkv) == (r, alpha, True)
    assert sorted({k.rsplit("/", 2)[-2] for k in lora}) == ["qkv"]  # one adapter per layer, not three
    params = unflatten({**flatten(variables["params"]), **lora})
    got = np.asarray(jax.jit(CausalLM(cfg).apply)({"params": params}, ids))
    assert np.abs(want - fused).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(got, want, atol=2e-4)
    folded = merge_lora(params, cfg)
    plain = dataclasses.replace(cfg, lora_rank=0, lora_targets="")
    np.testing.assert_allclose(jax.jit(CausalLM(plain).apply)({"params": folded}, ids), want, atol=2e-4)


@pytest.mark.parametrize("scan", [False, True])
def test_peft_adapters_in_and_out_equal_peft(tmp_path, scan):
    """An adapter saved by ``peft`` (q / v / down on Llama) imports to our logits; ours exported with
    ``save_peft_adapter`` has PEFT's names, shapes and config, and ``PeftModel`` over the base gives our
    logits again; export -> import is the identity."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.numpy import load_file
    from transformers import LlamaForCausalLM

    from pargo_jax.convert.hf import load_llm, load_peft_adapter, save_peft_adapter
    from tests.torch_refs.tiny_llm import checkpoint

    _, path = checkpoint("llama")
    ids = np.random.RandomState(3).randint(3, 128, (2, 9))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(path), lora).eval()
    torch.manual_seed(4)
    for name, w in peft_model.named_parameters():
        if "lora_" in name:
            w.data = 0.3 * torch.randn_like(w)  # lora_B starts at zero: make the adapter matter
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    with torch.no_grad():
        want = peft_model(torch.tensor(ids)).logits.numpy()

    module, variables = load_llm(path, scan_layers=scan)
    cfg, adapter = load_peft_adapter(str(tmp_path / "theirs"), module.config, "llama")
    params = unflatten({**flatten(variables["params"]), **adapter})
    got = np.asarray(jax.jit(CausalLM(cfg).apply)({"params": params}, jnp.asarray(ids)))
    assert np.abs(want - np.asarray(module.apply(variables, jnp.asarray(ids)))).max() > 1e-2
    np.testing.assert_allclose(got, want, atol=2e-4)

    save_peft_adapter(str(tmp_path / "ours"), params, cfg)
    theirs = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k])
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(path), str(tmp_path / "ours"))
    with torch.no_grad():
        np.testing.assert_allclose(reloaded.eval()(torch.tensor(ids)).logits.numpy(), want, atol=1e-6)
    cfg2, again = load_peft_adapter(str(tmp_path / "ours"), module.config, "llama")
    fields = lambda c: (c.lora_rank, c.lora_alpha, c.lora_targets)
    assert fields(cfg2) == fields(cfg)
    jax.tree.map(np.testing.assert_array_equal, again, adapter)


def test_peft_adapter_mismatches_are_named(tmp_path):
    from safetensors.numpy import save_file

    from pargo_jax.convert.hf import load_llm, load_peft_adapter
    from tests.torch_refs.tiny_llm import checkpoint

    module, _ = load_llm(checkpoint("llama")[1])
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "target_modules": ["q_proj", "qq"]}))
    save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"unknown: \['qq'\]"):
        load_peft_adapter(str(tmp_path), module.config, "llama")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match=r"unused tensor.*: x \|.*not filled: layers_0/attn/q/lora_a"):
        load_peft_adapter(str(tmp_path), module.config, "llama")
