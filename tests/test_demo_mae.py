"""The X-Former demo's MAE: ``save_mae`` writes an HF ViTMAE directory that loads back to the same
params and computes in transformers what ours computes; a short build writes one; ``ensure`` and a run's
``prepare`` build it once, at ``model.detail.path``; even a little pretraining beats predicting zeros."""

from __future__ import annotations

import json
import os
import re

import jax
import ml_collections
import numpy as np
import pytest
import torch
from flax import linen as nn

from pargo_jax import demo_mae, prepare
from pargo_jax.convert.hf_mae import load_mae, save_mae
from pargo_jax.models.mae import MAE, MAEConfig

RTOL, ATOL = 1e-5, 1e-6  # float32 throughout
TINY = dict(
    image_size=32, patch_size=8, width=32, depth=2, heads=4, mlp_dim=64, decoder_width=16, decoder_depth=1,
    decoder_heads=4, decoder_mlp_dim=32, mask_ratio=0.5, norm_pix_loss=True,
)  # fmt: skip
BUILD = dict(image_size=16, steps=40, batch_size=8, lr=2e-3)  # a 2x2-patch MAE, seconds to build


def _params(cfg: MAEConfig) -> dict:
    """Random params with no zero or one left (a mixed-up transform or table would show)."""
    x0, noise0 = np.zeros((1, cfg.image_size, cfg.image_size, 3)), np.zeros((1, cfg.num_patches))
    params = nn.unbox(jax.jit(MAE(cfg).init)(jax.random.key(0), x0, noise0)["params"])
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    return jax.tree.unflatten(tree, [np.asarray(x) + rng.normal(0, 0.05, x.shape).astype(np.float32)
                                     for x in leaves])  # fmt: skip


def test_save_mae_loads_back_and_matches_transformers(tmp_path):
    from transformers import ViTMAEForPreTraining

    cfg = MAEConfig(**TINY)
    params = _params(cfg)
    path = save_mae(str(tmp_path / "mae"), params, cfg)
    module, variables = load_mae(path)  # every tensor used, both position tables checked
    assert module.config == cfg
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(variables["params"]))

    raw = json.load(open(os.path.join(path, "config.json")))
    assert raw["model_type"] == "vit_mae" and raw["mask_ratio"] == 0.5 and raw["norm_pix_loss"] is True
    hf, info = ViTMAEForPreTraining.from_pretrained(path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}  # nothing missing, left over or mis-shaped
    hf.eval()
    rng = np.random.default_rng(1)
    pixels = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    noise = rng.uniform(size=(2, cfg.num_patches)).astype(np.float32)
    for norm_pix_loss in (True, False):
        hf.config.norm_pix_loss = norm_pix_loss
        with torch.no_grad():
            want = hf(torch.from_numpy(pixels).permute(0, 3, 1, 2), noise=torch.from_numpy(noise))
        got = jax.jit(MAE(cfg.replace(norm_pix_loss=norm_pix_loss)).apply)({"params": params}, pixels, noise)
        np.testing.assert_array_equal(np.asarray(got.mask), want.mask.numpy())
        np.testing.assert_allclose(np.asarray(got.logits), want.logits.numpy(), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(float(got.loss), float(want.loss), rtol=RTOL)


def test_short_build_loads_and_ensure_does_not_rebuild(tmp_path):
    logs = []
    out = demo_mae.build(str(tmp_path / "mae"), log=logs.append, **BUILD)
    module, variables = load_mae(out)
    cfg = module.config
    assert (cfg.image_size, cfg.width, cfg.mask_ratio, cfg.norm_pix_loss) == (16, 64, 0.5, False)
    pixels = np.zeros((1, 16, 16, 3), np.float32)
    assert jax.jit(module.apply)(variables, pixels, np.zeros((1, 4), np.float32)).logits.shape == (1, 4, 192)
    # even this little pretraining learns: well below predicting zeros; the baselines in their order
    line = next(x for x in logs if "held-out reconstruction loss" in x)
    numbers = dict(re.findall(r"(loss|patch mean|visible mean|zeros) ([\d.]+)", line))
    losses = {k: float(v) for k, v in numbers.items()}
    assert losses["loss"] < 0.5 * losses["zeros"], line
    assert losses["patch mean"] < losses["visible mean"] < losses["zeros"], line  # the oracle knows the patch
    stamp = os.path.getmtime(os.path.join(out, "model.safetensors"))
    assert not demo_mae.ensure(out, **BUILD)  # already there: nothing rebuilt
    assert os.path.getmtime(os.path.join(out, "model.safetensors")) == stamp
    assert sorted(os.listdir(tmp_path)) == ["mae"]  # no temporary directory left behind


def test_prepare_builds_it_at_the_detail_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ml_collections.ConfigDict(dict(model=dict(detail=dict(path="work/demo_mae")), demo_mae=BUILD))
    prepare.prepare_run(config, str(tmp_path / "work"))  # no shapes, no demo tower: only the MAE
    assert config.model.detail.path == str(tmp_path / "work" / "demo_mae")
    assert load_mae(config.model.detail.path)[0].config.image_size == 16

    config.demo_mae = None  # off: nothing is asked of the detail path
    config.model.detail.path = "elsewhere"
    prepare.prepare_demo_mae(config)
    assert not os.path.exists(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="model.detail.path"):
        prepare.prepare_demo_mae(ml_collections.ConfigDict(dict(model=dict(), demo_mae=BUILD)))
