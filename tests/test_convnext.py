"""ConvNeXt tower (timm layout): parity with a plain torch ConvNeXt on random weights, loaded from timm
names and from an OpenCLIP state dict (``visual.trunk.``), every tensor accounted for."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from pargo_jax.convert.hf_vision import load_convnext
from pargo_jax.convert.tables import ConversionError
from tests.torch_refs.convnext import ConvNeXt as TorchConvNeXt

DEPTHS, DIMS, SIZE = (1, 1, 2, 1), (8, 16, 24, 32), 64


def random_reference(seed: int = 0) -> TorchConvNeXt:
    torch.manual_seed(seed)
    model = TorchConvNeXt(DEPTHS, DIMS, num_classes=5).eval()
    with torch.no_grad():
        for p in model.parameters():  # every weight random, layer scales and norms included
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 and p.shape[0] in DIMS else 0.0))
    return model


def torch_maps(model, pixels: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        maps = model(torch.as_tensor(pixels).permute(0, 3, 1, 2))
    return [m.permute(0, 2, 3, 1).numpy() for m in maps]


@pytest.mark.parametrize("layout", ["timm", "open_clip"])
def test_feature_pyramid_matches_the_torch_reference(layout):
    model = random_reference()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    if layout == "open_clip":  # the tower inside a whole OpenCLIP model
        state = {f"visual.trunk.{k}": v for k, v in state.items()}
        state |= {"visual.head.proj.weight": np.zeros((4, 32), np.float32), "logit_scale": np.ones(())}
    module, variables = load_convnext(state, image_size=SIZE)
    assert module.config.depths == DEPTHS and module.config.dims == DIMS
    pixels = np.random.RandomState(0).randn(2, SIZE, SIZE, 3).astype(np.float32)
    got = jax.jit(module.apply)(variables, pixels)
    want = torch_maps(model, pixels)
    assert [g.shape for g in got] == [(2, SIZE // s, SIZE // s, c) for s, c in zip((4, 8, 16, 32), DIMS)]
    for k, (g, w) in enumerate(zip(got, want)):
        scale = np.abs(w).max()
        np.testing.assert_allclose(np.asarray(g) / scale, w / scale, atol=1e-4, err_msg=f"stage {k}")


def test_a_missing_or_extra_tensor_is_named():
    state = {k: v.numpy() for k, v in random_reference().state_dict().items()}
    del state["stages.2.blocks.1.gamma"]
    with pytest.raises(ConversionError, match="stages_2_blocks_1_gamma"):
        load_convnext(state, image_size=SIZE)
    state = {k: v.numpy() for k, v in random_reference().state_dict().items()}
    state["stages.1.blocks.0.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match="stages.1.blocks.0.extra.weight"):
        load_convnext(state, image_size=SIZE)
    with pytest.raises(ValueError, match="Not a timm ConvNeXt state dict"):
        load_convnext({"patch_embed.proj.weight": np.zeros((4, 3, 2, 2), np.float32)}, image_size=SIZE)


def test_the_factory_reads_an_open_clip_file(tmp_path):
    """``config.model.high_res.path`` to an OpenCLIP checkpoint (tower under ``visual.trunk.``)."""
    from pargo_jax import runs

    state = {f"visual.trunk.{k}": v for k, v in random_reference().state_dict().items()}
    state["logit_scale"] = torch.ones(())
    path = str(tmp_path / "open_clip_pytorch_model.bin")
    torch.save(state, path)
    high = runs.high_res_config(dict(path=path, image_size=SIZE), low_width=16, dtype="float32")
    assert high.tower.depths == DEPTHS and high.tower.dims == DIMS and high.fusion.high_dim == DIMS[-1]
