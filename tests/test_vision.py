"""Vision towers (SigLIP, CLIP, EVA02) and their import: parity with HF / a timm-faithful reference,
output options, sharded loading and conversion errors."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from safetensors.numpy import load_file, save_file

from pargo_jax.convert.hf_vision import load_eva02, load_vision
from pargo_jax.convert.tables import ConversionError
from pargo_jax.models.vision import PRESETS, VisionTower, rope_tables, vision_preset
from pargo_jax.sharding import LOGICAL_RULES, make_mesh
from tests.kernels import record_kernels
from tests.torch_refs.eva02 import Eva, evaclip_state, rope_embed_cat

TOL = 1e-4
TINY = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=30,
    patch_size=7,
)  # 30 / 7: a VALID conv drops the remainder, as so400m (384 / 14)


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random non-trivial weights (HF inits norms to 1/0 and some biases to 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _hf(model, pixels: np.ndarray):
    with torch.no_grad():
        out = model(torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
    return out.last_hidden_state.numpy(), [h.numpy() for h in out.hidden_states]


def _diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Tiny random HF checkpoints saved locally: vision-only and full (text tower included) models."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipConfig,
        SiglipModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    torch.manual_seed(0)
    text = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    built = {
        "siglip": _perturb(SiglipVisionModel(SiglipVisionConfig(**TINY)), 1),
        "clip": _perturb(CLIPVisionModel(CLIPVisionConfig(**TINY)), 2),
        "siglip_full": _perturb(SiglipModel(SiglipConfig(text_config=text, vision_config=TINY)), 3),
        "clip_full": _perturb(
            CLIPModel(CLIPConfig(text_config=text, vision_config=TINY, projection_dim=8)), 4
        ),
    }
    dirs = {}
    for name, model in built.items():
        d = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(d)
        dirs[name] = (d, model if "full" not in name else model.vision_model)
    d = str(tmp_path_factory.mktemp("clip_sharded"))
    built["clip"].save_pretrained(d, max_shard_size="20KB")  # model.safetensors.index.json + shards
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    dirs["clip_sharded"] = (d, built["clip"])
    return dirs


# --- SigLIP / CLIP parity ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["siglip", "clip", "siglip_full", "clip_full", "clip_sharded"])
def test_hf_last_hidden_state_parity(hf_dirs, name):
    path, ref = hf_dirs[name]
    module, variables = load_vision(path)
    x = _pixels(2, 30)
    want, _ = _hf(ref, x)
    got = jax.jit(module.apply)(variables, x)
    assert got.shape == want.shape
    assert _diff(got, want) <= TOL


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_hf_feature_layers(hf_dirs, kind):
    path, ref = hf_dirs[kind]
    x = _pixels(2, 30, seed=1)
    _, hidden = _hf(ref, x)
    for layer in (-2, 1, 0):  # penultimate (LLaVA), first block output, embeddings (CLIP: after pre-LN)
        module, variables = load_vision(path, feature_layer=layer)
        assert module.config.num_blocks == layer % 4
        assert len(variables["params"].get("blocks", {}).get("norm1", {}).get("scale", [])) == layer % 4
        assert "final_norm" not in variables["params"]  # HF hidden_states carry no final norm
        assert _diff(module.apply(variables, x), hidden[layer]) <= TOL, layer


def test_drop_cls_and_forced_final_norm(hf_dirs):
    path, ref = hf_dirs["clip"]
    x = _pixels(2, 30, seed=2)
    _, hidden = _hf(ref, x)
    module, variables = load_vision(path, feature_layer=-2, drop_cls=True, remat=True)
    got = module.apply(variables, x)
    assert got.shape == (2, 16, 32) and module.config.num_tokens == 16
    assert _diff(got, hidden[-2][:, 1:]) <= TOL
    # CLIP's post_layernorm forced onto every token (HF applies it to the pooled CLS only).
    module, variables = load_vision(path, final_norm=True)
    with torch.no_grad():
        want = ref.post_layernorm(torch.from_numpy(hidden[-1])).numpy()
    assert _diff(module.apply(variables, x), want) <= TOL
    # SigLIP without its post_layernorm = HF hidden_states[-1].
    path, ref = hf_dirs["siglip"]
    _, hidden = _hf(ref, x)
    module, variables = load_vision(path, final_norm=False)
    assert _diff(module.apply(variables, x), hidden[-1]) <= TOL


def test_bfloat16_compute(hf_dirs):
    path, ref = hf_dirs["siglip"]
    x = _pixels(2, 30, seed=3)
    want, _ = _hf(ref, x)
    module, variables = load_vision(path, compute_dtype=jnp.bfloat16)
    assert variables["params"]["pos_embed"].dtype == jnp.float32
    got = module.apply(variables, x)
    assert got.dtype == jnp.bfloat16
    assert _diff(got, want) < 0.1 * np.abs(want).max()
    _, params16 = load_vision(path, dtype=jnp.bfloat16)
    assert params16["params"]["blocks"]["attn"]["q"]["kernel"].dtype == jnp.bfloat16


# --- sharded load ----------------------------------------------------------------------------------
def test_sharded_load_equals_unsharded(hf_dirs):
    path, _ = hf_dirs["siglip"]
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    module, sharded = load_vision(path, mesh=mesh)
    _, plain = load_vision(path)
    q = sharded["params"]["blocks"]["attn"]["q"]["kernel"]  # (layers, embed, heads, head_dim)
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (3, 8, 2, 8)
    fc1 = sharded["params"]["blocks"]["mlp"]["fc1"]["kernel"]
    assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = _pixels(4, 30, seed=4)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        got = jax.jit(module.apply)(sharded, x)
    assert _diff(got, module.apply(plain, x)) <= 1e-5


# --- EVA02 -----------------------------------------------------------------------------------------
def _eva_ref(qkv_fused: bool = False, seed: int = 5) -> Eva:
    torch.manual_seed(seed)
    return _perturb(
        Eva(img_size=28, patch_size=7, dim=32, depth=3, heads=4, hidden=40, qkv_fused=qkv_fused, ref_grid=16),
        seed,
    )


def _eva_out(ref: Eva, x: np.ndarray):
    with torch.no_grad():
        out, hidden = ref.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2), return_hidden=True)
    return out.numpy(), [h.numpy() for h in hidden]


def test_rope_tables_match_timm_reference():
    cfg = vision_preset("eva02-L/14-336")
    sin, cos = rope_tables(cfg)
    want = rope_embed_cat(64, 24, 16).numpy()
    assert sin.shape == (576, 64)
    assert _diff(np.concatenate([sin, cos], -1), want) <= 1e-6


def test_eva02_parity_prefixed_bin(tmp_path):
    ref = _eva_ref()
    state = {f"visual_encoder.{k}": v for k, v in ref.state_dict().items()}
    state["ln_vision.weight"] = torch.ones(32)  # another module of the checkpoint: outside the prefix
    state["visual_encoder.rope.freqs_cos"] = torch.ones(16, 8)  # EVA-CLIP stores RoPE buffers
    file = tmp_path / "pargo.bin"
    torch.save(state, file)
    module, variables = load_eva02(str(file), heads=4)
    cfg = module.config
    assert (cfg.kind, cfg.depth, cfg.heads, cfg.mlp_dim, cfg.image_size) == ("eva02", 3, 4, 40, 28)
    assert cfg.attn_norm and cfg.mlp_norm
    x = _pixels(2, 28, seed=6)
    want, hidden = _eva_out(ref, x)
    assert _diff(jax.jit(module.apply)(variables, x), want) <= TOL
    # ParGo's features: last block output, no final norm, CLS dropped.
    module, variables = load_eva02(str(file), heads=4, final_norm=False, drop_cls=True)
    got = module.apply(variables, x)
    assert got.shape == (2, 16, 32)
    assert _diff(got, hidden[-1][:, 1:]) <= TOL
    module, variables = load_eva02(str(file), heads=4, feature_layer=-2)
    assert _diff(module.apply(variables, x), hidden[-2]) <= TOL


def test_eva02_fused_qkv_safetensors_and_evaclip_names(tmp_path):
    ref = _eva_ref(qkv_fused=True, seed=7)
    x = _pixels(2, 28, seed=8)
    want, _ = _eva_out(ref, x)
    state = {k: v.numpy() for k, v in ref.state_dict().items() if not k.startswith("head.")}
    file = str(tmp_path / "eva.safetensors")
    save_file(state, file)
    module, variables = load_eva02(file, heads=4)
    assert _diff(module.apply(variables, x), want) <= TOL

    # Original EVA-CLIP names (separate q/k/v with q_bias/v_bias, w1/w2/ffn_ln/w3, inner_attn_ln),
    # as a state dict of torch tensors; without a final norm the output is the last block's.
    ref = _eva_ref(seed=9)
    want, hidden = _eva_out(ref, x)
    state = {f"visual.{k}": v for k, v in evaclip_state(ref).items()}
    module, variables = load_eva02(state, heads=4)
    assert not module.config.apply_final_norm
    assert _diff(module.apply(variables, x), hidden[-1]) <= TOL


def test_eva02_preset_shapes():
    cfg = PRESETS["eva02-L/14-336"]
    abstract = jax.eval_shape(VisionTower(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 336, 336, 3)))
    p = nn.unbox(abstract["params"])
    assert p["pos_embed"].shape == (577, 1024)
    assert p["blocks"]["mlp"]["gate"]["kernel"].shape == (24, 1024, 2730)
    assert "bias" not in p["blocks"]["attn"]["k"]
    n = sum(np.prod(v.shape) for v in jax.tree.leaves(p))
    assert 300e6 < n < 306e6  # EVA02-CLIP-L/14 vision: ~304M


@pytest.mark.parametrize("name", ["eva02-L/14-336", "so400m-384", "clip-L/14-336"])
def test_real_towers_attention_picks_cudnn_on_gpu_in_bf16(monkeypatch, name):
    """Every attention call of a real tower in bf16 is one cuDNN takes on a GPU (traced here on CPU,
    where each still runs XLA's kernel); float32 and ``attention_impl="xla"`` keep XLA's."""
    from pargo_jax.models import vision

    picked = record_kernels(monkeypatch, vision)
    size = PRESETS[name].image_size
    for overrides, kernel in ((dict(dtype=jnp.bfloat16), "cudnn"), ({}, "xla"),
                              (dict(dtype=jnp.bfloat16, attention_impl="xla"), "xla")):  # fmt: skip
        picked.clear()
        tower = VisionTower(vision_preset(name, **overrides))
        jax.eval_shape(tower.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
        assert picked and set(picked) == {kernel}, (overrides, picked)
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        vision_preset(name, attention_impl="flash")


def test_siglip_so400m_and_clip_l_preset_shapes():
    for name, tokens, lo, hi in (("so400m-384", 729, 410e6, 430e6), ("clip-L/14-336", 577, 300e6, 306e6)):
        cfg = PRESETS[name]
        size = cfg.image_size
        out = jax.eval_shape(
            lambda x, c=cfg: VisionTower(c).init_with_output(jax.random.PRNGKey(0), x),
            jnp.zeros((1, size, size, 3)),
        )
        assert out[0].shape == (1, tokens, cfg.width), name
        n = sum(np.prod(v.shape) for v in jax.tree.leaves(nn.unbox(out[1]["params"])))
        assert lo < n < hi, (name, n)


# --- errors ----------------------------------------------------------------------------------------
def _copy_dir(src: str, dst, edit=None, config_edit=None) -> str:
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    if edit:
        edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if config_edit:
        config_edit(cfg)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(dst)


def test_conversion_errors_name_the_tensors(hf_dirs, tmp_path):
    src, _ = hf_dirs["siglip"]
    missing = _copy_dir(src, tmp_path / "missing", lambda t: t.pop("encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(ConversionError, match=r"blocks/mlp/fc2/bias"):
        load_vision(missing)
    extra = _copy_dir(
        src,
        tmp_path / "extra",
        lambda t: t.update({"encoder.layers.0.self_attn.rel_pos": np.zeros(3, np.float32)}),
    )
    with pytest.raises(ConversionError, match=r"unused tensor.*encoder\.layers\.0\.self_attn\.rel_pos"):
        load_vision(extra)
    shape = _copy_dir(
        src,
        tmp_path / "shape",
        lambda t: t.update({"embeddings.position_embedding.weight": np.zeros((17, 32), np.float32)}),
    )
    with pytest.raises(ConversionError, match=r"pos_embed.*\(17, 32\).*\(16, 32\)"):
        load_vision(shape)


def test_user_errors_name_the_path_or_value(hf_dirs, tmp_path):
    src, _ = hf_dirs["clip"]
    bert = _copy_dir(src, tmp_path / "bert", config_edit=lambda c: c.update(model_type="bert"))
    with pytest.raises(ValueError, match=r"'bert'.*siglip.*clip_vision_model"):
        load_vision(bert)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_vision(str(tmp_path / "nowhere"))
    no_cfg = tmp_path / "no_cfg"
    no_cfg.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vision(str(no_cfg))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(FileNotFoundError, match="No safetensors"):
        load_vision(str(no_weights))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_eva02(str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="Unknown key.*'feature_layers'"):
        load_vision(src, feature_layers=-2)
    with pytest.raises(ValueError, match="feature_layer 5"):
        load_vision(src, feature_layer=5)
    module, variables = load_vision(src)
    with pytest.raises(ValueError, match="got 32x32"):
        module.apply(variables, _pixels(1, 32))
