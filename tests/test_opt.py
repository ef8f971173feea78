"""OPT (BLIP-2 / X-Former's LLM) as a CausalLM family: HF OPTForCausalLM import equals transformers'
logits on a left-padded batch and its greedy tokens (KV cache), scan / remat / LoRA / unscanned, export
back to a directory OPTForCausalLM loads, a PEFT adapter in and out, and the refused variants."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pargo_jax.convert.hf import export_llm, load_llm, load_peft_adapter, save_llm, save_peft_adapter
from pargo_jax.convert.tables import ConversionError, LazySource
from pargo_jax.flops import llm_matmul_params
from pargo_jax.generate import generate
from pargo_jax.models.llm import CausalLM, LLMConfig, unscanned
from pargo_jax.param_tree import flatten, unflatten

TOL = 1e-4  # max abs logit difference to transformers, float32
# Left-padded batch of 2: row 0 has 10 real tokens, row 1 has 6.
IDS = np.random.RandomState(0).randint(3, 100, (2, 10))
MASK = np.ones_like(IDS)
IDS[1, :4], MASK[1, :4] = 1, 0
REAL = MASK.astype(bool)


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    """(torch OPTForCausalLM, its save_pretrained directory): 2 layers, width 64, 4 heads, ffn 128,
    every weight random (LayerNorm scales and biases, position table and biases too)."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(2)  # greedy tokens vary, top-2 logit margins >= 0.06
    cfg = OPTConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=64, pad_token_id=1, bos_token_id=2, eos_token_id=2,
    )  # fmt: skip
    model = OPTForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # lm_head is embed_tokens (tied): drawn once
            noise = torch.randn(p.shape)
            p.copy_(
                0.3 * noise if p.ndim > 1 else (1 + 0.1 * noise if "norm.weight" in name else 0.1 * noise)
            )
    path = str(tmp_path_factory.mktemp("opt") / "hf")
    model.save_pretrained(path)
    return model, path


def _hf_logits(model, ids, mask):
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def test_logits_match_transformers_left_padded(opt):
    model, path = opt
    module, variables = load_llm(path)
    c = module.config
    layout = (c.family, c.norm, c.position_embedding, c.position_offset, c.mlp)
    assert layout == ("opt", "layer", "learned", 2, "relu")
    assert c.qkv_bias and c.bias and c.tie_word_embeddings and c.num_kv_heads == 4
    p = variables["params"]
    assert p["embed_positions"]["embedding"].shape == (66, 64) and "lm_head" not in p
    assert sorted(p["layers_0"]["mlp"]) == ["fc1", "fc2"] and sorted(p["norm"]) == ["bias", "scale"]
    got = np.asarray(jax.jit(module.apply)(variables, jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)))
    want = _hf_logits(model, IDS, MASK)
    diff = np.abs(got - want)[REAL].max()
    print(f"OPT left-padded logits: max |ours - transformers| = {diff:.2e}")
    assert diff <= TOL
    # The padded row's real tokens equal the unpadded sequence (positions count real tokens only).
    alone = np.asarray(jax.jit(module.apply)(variables, jnp.asarray(IDS[1:, 4:])))
    np.testing.assert_allclose(got[1, 4:], alone[0], atol=1e-5)
    kernels = sum(x.size for k, x in flatten(p).items() if k.endswith("kernel"))
    assert llm_matmul_params(c) == kernels + p["embed_tokens"]["embedding"].size  # FFN: 2 matrices, not 3


def test_greedy_generate_matches_transformers(opt):
    import torch

    model, path = opt
    module, variables = load_llm(path)
    n, pad = 8, 1
    run = lambda eos: generate(
        module, variables, input_ids=IDS, attention_mask=MASK, max_new_tokens=n, eos_token_id=eos,
        pad_token_id=pad,
    )  # fmt: skip
    eos = int(run(None).tokens[0, 4])  # a token row 0 emits at step 4: EOS handling is exercised
    out = run(eos)
    with torch.no_grad():
        ref = model.generate(
            torch.tensor(IDS), attention_mask=torch.tensor(MASK), max_new_tokens=n, do_sample=False,
            eos_token_id=eos, pad_token_id=pad,
        ).numpy()[:, IDS.shape[1] :]  # fmt: skip
    ref = np.pad(ref, ((0, 0), (0, n - ref.shape[1])), constant_values=pad)
    print(f"OPT greedy tokens (eos {eos}): {out.tokens.tolist()}")
    np.testing.assert_array_equal(out.tokens, ref)
    assert (out.tokens[0, 5:] == pad).all() and len(set(out.tokens[1].tolist())) > 2


def test_scan_remat_lora_and_unscanned(opt):
    _, path = opt
    module, variables = load_llm(path)
    targets = r".*(attn/(q|k|v|o)|mlp/(fc1|fc2))"
    scanned, svars = load_llm(
        path,
        scan_layers=True,
        remat_policy="dots_with_no_batch_dims_saveable",
        lora_rank=2,
        lora_targets=targets,
    )
    layer = svars["params"]["layers"]
    assert layer["mlp"]["fc1"]["lora_a"].shape == (2, 64, 2) and layer["attn"]["o"]["bias"].shape == (2, 64)
    args = (jnp.asarray(IDS),)
    kw = dict(attention_mask=jnp.asarray(MASK))
    want = np.asarray(jax.jit(module.apply)(variables, *args, **kw))
    got = np.asarray(jax.jit(scanned.apply)(svars, *args, **kw))  # fresh LoRA (lora_b = 0) is the identity
    np.testing.assert_allclose(got[REAL], want[REAL], atol=1e-5)
    config, params = unscanned(scanned.config, svars["params"])
    assert not config.scan_layers
    np.testing.assert_array_equal(
        params["layers_1"]["mlp"]["fc2"]["bias"], variables["params"]["layers_1"]["mlp"]["fc2"]["bias"]
    )
    # The scanned params export to exactly the source checkpoint's tensors.
    plain = {k: v for k, v in flatten(svars["params"]).items() if "lora_" not in k}
    _, tensors = export_llm(plain, dataclasses.replace(scanned.config, lora_rank=0, lora_targets=""))
    source = LazySource.from_dir(path)
    assert sorted(tensors) == sorted(source)
    for name, x in tensors.items():
        np.testing.assert_array_equal(x, source[name], err_msg=name)


def test_export_loads_in_transformers(opt, tmp_path):
    from transformers import OPTForCausalLM

    model, path = opt
    module, variables = load_llm(path)
    out = save_llm(str(tmp_path / "llm"), variables["params"], module.config)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == ["OPTForCausalLM"]
    again_module, again = load_llm(out)
    assert again_module.config == module.config
    jax.tree.map(np.testing.assert_array_equal, again["params"], variables["params"])
    hf = OPTForCausalLM.from_pretrained(out).eval()
    diff = np.abs(_hf_logits(hf, IDS, MASK) - _hf_logits(model, IDS, MASK))[REAL].max()
    print(f"OPT export round trip: max |exported - source| transformers logits = {diff:.2e}")
    assert diff <= 1e-6
    with pytest.raises(ValueError, match=r"A llama checkpoint has .*this LLM has .*'norm': 'layer'"):
        export_llm(variables["params"], module.config, "llama")


def test_peft_adapter_on_opt_in_and_out(opt, tmp_path):
    """A PEFT adapter (q_proj / out_proj / fc1 / fc2) saved by ``peft`` gives its logits here, and ours
    exported again has PEFT's names."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file
    from transformers import OPTForCausalLM

    _, path = opt
    lora = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "out_proj", "fc1", "fc2"], lora_dropout=0.0
    )
    peft_model = get_peft_model(OPTForCausalLM.from_pretrained(path), lora).eval()
    torch.manual_seed(1)
    for name, w in peft_model.named_parameters():
        if "lora_" in name:
            w.data = 0.3 * torch.randn_like(w)
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    want = _hf_logits(peft_model, IDS, MASK)
    module, variables = load_llm(path)
    cfg, adapter = load_peft_adapter(str(tmp_path / "theirs"), module.config, "opt")
    params = unflatten({**flatten(variables["params"]), **adapter})
    got = np.asarray(
        jax.jit(CausalLM(cfg).apply)({"params": params}, jnp.asarray(IDS), attention_mask=jnp.asarray(MASK))
    )
    base = np.asarray(jax.jit(module.apply)(variables, jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)))
    assert np.abs(want - base)[REAL].max() > 1e-2  # the adapter matters
    assert np.abs(got - want)[REAL].max() <= 2e-4
    save_peft_adapter(str(tmp_path / "ours"), params, cfg)
    theirs = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k])


def test_mllm_with_an_opt_llm_exports_to_transformers(tmp_path):
    """``pargo_jax.export.save_transformers`` writes an OPT LLM as OPT: the custom-code model computes
    the JAX MLLM's logits (left-padded, tied head)."""
    import torch
    from flax import linen as nn
    from transformers import AutoModelForImageTextToText

    from data_pipelines import shapes
    from data_pipelines.text import load_tokenizer
    from pargo_jax import sharding
    from pargo_jax.export import save_transformers
    from pargo_jax.models import factory, projectors
    from pargo_jax.models.mllm import MLLMConfig
    from pargo_jax.models.vision import vision_preset

    tok = load_tokenizer(shapes.ASSET_TOKENIZER)
    llm = LLMConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
        num_kv_heads=4, head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=True, qkv_bias=True, bias=True,
        norm="layer", position_embedding="learned", position_offset=2, mlp="relu", max_position_embeddings=64,
        family="opt",
    )  # fmt: skip
    projector = projectors.projector_config("mlp", dict(vision_width=32, llm_width=64))
    mcfg = MLLMConfig(
        vision=vision_preset("tiny"), projector=projector, llm=llm, image_token_id=tok.image_token_id
    )
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    with sharding.mesh_context(mesh):
        parts = factory.build(mcfg, mesh)
        params = jax.device_get(jax.jit(lambda r: nn.unbox(parts.init(r)))(jax.random.key(1)))
    rng = np.random.RandomState(0)  # every tensor away from its init
    params = jax.tree.map(lambda x: (x + 0.1 * rng.randn(*x.shape)).astype(np.float32), params)
    n = mcfg.num_image_tokens
    ids = rng.randint(10, tok.vocab_size, (2, n + 7)).astype(np.int32)
    ids[ids == tok.image_token_id] = 10
    ids[:, 3 : 3 + n] = tok.image_token_id
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    pixels = rng.randn(2, mcfg.vision.image_size, mcfg.vision.image_size, 3).astype(np.float32)
    want = np.asarray(jax.jit(parts.model.apply)({"params": params}, pixels, ids, mask))
    out = save_transformers(str(tmp_path / "hf"), mcfg, params, tok)
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    assert type(model.language_model).__name__ == "OPTForCausalLM"
    with torch.no_grad():
        pt = torch.tensor(pixels).permute(0, 3, 1, 2)
        got = model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=pt
        ).logits.numpy()
    diff = np.abs(got - want)[mask.astype(bool)].max()
    print(f"OPT MLLM export: max |transformers - JAX| logits = {diff:.2e}")
    assert diff <= TOL


# --- errors ----------------------------------------------------------------------------------------
def _copy(opt, tmp_path, tensors=None, config=None):
    """The tiny OPT directory copied, its tensors edited by ``tensors(dict)``, config by ``config``."""
    from safetensors.numpy import load_file, save_file

    dst = str(tmp_path / "ckpt")
    shutil.copytree(opt[1], dst)
    if tensors:
        t = load_file(os.path.join(dst, "model.safetensors"))
        tensors(t)
        save_file(t, os.path.join(dst, "model.safetensors"))
    if config:
        with open(os.path.join(dst, "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump({**cfg, **config}, f)
    return dst


def test_error_missing_tensor(opt, tmp_path):
    path = _copy(opt, tmp_path, tensors=lambda t: t.pop("model.decoder.layers.1.fc1.bias"))
    with pytest.raises(ConversionError, match=r"1 parameter\(s\) not filled: layers_1/mlp/fc1/bias$"):
        load_llm(path)


def test_tied_lm_head_accepted_only_when_equal(opt, tmp_path):
    embed = "model.decoder.embed_tokens.weight"
    path = _copy(opt, tmp_path, tensors=lambda t: t.update({"lm_head.weight": t[embed].copy()}))
    load_llm(path)  # a checkpoint that still holds the tied head loads
    shutil.rmtree(path)
    path = _copy(opt, tmp_path, tensors=lambda t: t.update({"lm_head.weight": t[embed] + 1}))
    with pytest.raises(ConversionError, match=r"lm_head\.weight differs from model\.decoder\.embed_tokens"):
        load_llm(path)


@pytest.mark.parametrize(
    "config, field",
    [({"word_embed_proj_dim": 32}, "word_embed_proj_dim=32 != hidden_size=64"),
     ({"do_layer_norm_before": False}, "do_layer_norm_before=False")],
    ids=["word_embed_proj_dim", "do_layer_norm_before"],
)  # fmt: skip
def test_error_unsupported_variants(opt, tmp_path, config, field):
    with pytest.raises(ValueError, match=r"Unsupported opt config option\(s\) \['" + field):
        load_llm(_copy(opt, tmp_path, config=config))


def test_config_validation():
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=2,
                head_dim=4)  # fmt: skip
    for bad, match in (
        (dict(norm="batch"), r"norm='batch'; use one of \('rms', 'layer'\)"),
        (dict(mlp="gelu"), r"mlp='gelu'"),
        (dict(position_embedding="alibi"), r"position_embedding='alibi'"),
        (dict(position_offset=2), r"position_offset=2 needs position_embedding='learned'"),
    ):
        with pytest.raises(ValueError, match=match):
            LLMConfig(**base, **bad)
