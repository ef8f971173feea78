"""Official ParGo checkpoint import: parity with an independent PyTorch reference, loud failures."""

import dataclasses
import sys

import jax
import numpy as np
import pytest
import torch
from flax import linen as nn
from safetensors.torch import save_file

from pargo_jax.convert.official import load_projector
from pargo_jax.convert.tables import ConversionError
from pargo_jax.models.projectors import ParGo
from tests.torch_refs.pargo_ref import ParGoReference, randomize

SHAPE = dict(num_partial=8, num_global=4, hidden=64, heads=2, layers=2, mlp_dim=96, vision_width=48,
             llm_width=40, max_positions=40)  # fmt: skip


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return randomize(ParGoReference(**SHAPE)).eval()


def official_state(ref, prefix="ParGo.", wrap="module."):
    """A state dict laid out like the release: text-branch tensors included, tower/LLM tensors too."""
    state = {k.replace("ParGo.", prefix, 1): v.clone() for k, v in ref.state_dict().items()}
    extras = {
        f"{prefix}bert.embeddings.word_embeddings.weight": torch.zeros(30, 64),
        f"{prefix}bert.embeddings.position_ids": torch.arange(40)[None],
        f"{prefix}cls.predictions.bias": torch.zeros(30),
        f"{prefix}bert.encoder.layer.1.intermediate.dense.weight": torch.zeros(96, 64),
        f"{prefix}bert.encoder.layer.1.output.LayerNorm.bias": torch.zeros(64),
        "visual_encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 3),
        "llm_model.base_model.model.output.weight": torch.zeros(3, 3),
    }
    state.update(extras)
    return {wrap + k: v for k, v in state.items()}


def features(n=16, seed=0):
    return np.random.RandomState(seed).randn(3, n, 48).astype(np.float32)


def save(state, tmp_path, name="pargo.pth"):
    path = str(tmp_path / name)
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "prefix, wrap, name",
    [
        ("ParGo.", "module.", "pargo.bin"),
        ("Q_former.", "", "ckpt.pth"),
        ("ParGo.", "", "model.safetensors"),
    ],
)
@pytest.mark.parametrize("impl", ["structured", "dense"])
def test_parity_with_pytorch_reference(reference, tmp_path, prefix, wrap, name, impl):
    path = save(official_state(reference, prefix, wrap), tmp_path, name)
    module, variables = load_projector(path, num_heads=2, num_partial=8, impl=impl)
    assert module.config.num_queries == 12 and module.config.layers == 2 and module.config.mlp_dim == 96
    x = features()
    got = np.asarray(jax.jit(module.apply)(variables, x))
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    assert got.shape == (3, 12, 40)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_multi_crop_parity(reference, tmp_path):
    """Two crops concatenated (as the release's split_into_patches does) use raster windows of k=4."""
    module, variables = load_projector(save(official_state(reference), tmp_path), num_heads=2, num_partial=8)
    x = features(n=32)
    module = ParGo(dataclasses.replace(module.config, num_crops=2))
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(module.apply(variables, x)), want, atol=1e-5, rtol=0)


def test_wrapped_state_dict_and_default_heads(reference, tmp_path):
    path = save({"state_dict": official_state(reference, wrap="")}, tmp_path)
    module, _ = load_projector(path, num_partial=8)
    assert module.config.heads == 1  # H // 64 when num_heads is not given


def test_renamed_projector_is_an_error_not_a_silent_skip(reference, tmp_path):
    state = official_state(reference, prefix="Fusion.")
    with pytest.raises(ConversionError) as err:
        load_projector(save(state, tmp_path), num_heads=2, num_partial=8)
    assert "missing bert.embeddings.position_embeddings.weight" in str(err.value)


def test_every_bad_tensor_is_listed(reference, tmp_path):
    state = official_state(reference)
    del state["module.ParGo.bert.encoder.layer.0.crossattention.self.value.bias"]
    del state["module.ParGo.bert.encoder.layer.1.output_query.dense.weight"]
    state["module.ParGo.bert.encoder.layer.0.attention.self.query.weight"] = torch.zeros(64, 63)
    state["module.ParGo.bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(2)
    state["module.pooler.dense.weight"] = torch.zeros(2)
    with pytest.raises(ConversionError) as err:
        load_projector(save(state, tmp_path), num_heads=2, num_partial=8)
    msg = str(err.value)
    for name in (
        "bert.encoder.layer.0.attention.self.rotary.weight",  # unknown
        "pooler.dense.weight",  # unknown
        "fc2_kernel",  # missing layer 1 output_query.dense.weight
        "cross_kv_bias",  # missing layer 0 value bias
        "self_qkv_kernel",  # mis-shaped query weight
        "(63, 64)",
    ):
        assert name in msg, name


def test_cross_attention_every_other_layer_is_refused(reference, tmp_path):
    state = {k: v for k, v in official_state(reference).items() if "layer.1.crossattention" not in k}
    with pytest.raises(ConversionError, match=r"Layers \[1\] have no cross-attention"):
        load_projector(save(state, tmp_path), num_heads=2, num_partial=8)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_projector(str(tmp_path / "missing.bin"))
    bad = tmp_path / "weights.npz"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"expected a \.safetensors, \.bin, \.pth or \.pt file"):
        load_projector(str(bad))


def test_too_many_partial_queries(reference, tmp_path):
    with pytest.raises(ValueError, match="num_partial=20 exceeds the checkpoint's 12 queries"):
        load_projector(save(official_state(reference), tmp_path), num_heads=2, num_partial=20)


def test_export_to_pytorch_matches_jax(tmp_path):
    """JAX-initialized params -> official state dict -> the PyTorch model (strict load) computes the same."""
    from pargo_jax.convert.official import to_official_state_dict
    from pargo_jax.models.projectors import ParGoConfig

    config = ParGoConfig(**{**SHAPE, "heads": 2})
    x = features()
    variables = jax.jit(ParGo(config).init)(jax.random.key(3), x)
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda p: p + 0.05 * rng.randn(*p.shape), nn.unbox(variables["params"]))
    state = {k: torch.from_numpy(v.astype(np.float32)) for k, v in to_official_state_dict(params).items()}
    torch_model = ParGoReference(**SHAPE)
    torch_model.load_state_dict(state, strict=True)
    with torch.no_grad():
        want = torch_model(torch.from_numpy(x)).numpy()
    got = np.asarray(jax.jit(ParGo(config).apply)({"params": params}, x))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # And back: the exported file loads to the same params.
    _, reloaded = load_projector(save(state, tmp_path, "export.safetensors"), num_heads=2, num_partial=8)
    for k, v in reloaded["params"].items():
        np.testing.assert_array_equal(v, np.asarray(params[k], np.float32), err_msg=k)


def test_torch_files_without_torch_name_the_extra(tmp_path, monkeypatch):
    from pargo_jax.convert.tables import read_torch_file

    file = tmp_path / "eva.pt"
    torch.save({"visual.pos_embed": torch.zeros(1, 5, 8)}, file)
    monkeypatch.setitem(sys.modules, "torch", None)  # as in a core install
    with pytest.raises(ImportError, match=r"needs PyTorch.*pip install -r requirements-torch.txt"):
        read_torch_file(str(file))
