"""MAE: parity with transformers' ``ViTMAEForPreTraining`` (loss, logits, mask, ids_restore given the
same noise, with and without ``norm_pix_loss``), v4 checkpoint names, masking semantics and the
loader's errors."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from pargo_jax.convert.hf_mae import load_mae
from pargo_jax.convert.tables import ConversionError
from pargo_jax.models.mae import MAE, MAEConfig, random_masking, sincos_pos_embed

RTOL, ATOL = 1e-5, 1e-6
TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, decoder_hidden_size=16,
    decoder_num_hidden_layers=1, decoder_num_attention_heads=4, decoder_intermediate_size=32, image_size=32,
    patch_size=8, mask_ratio=0.75,
)  # fmt: skip


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(the HF model with random non-trivial weights, its save_pretrained directory)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    torch.manual_seed(0)
    model = ViTMAEForPreTraining(ViTMAEConfig(**TINY)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # not the fixed sin-cos tables
                p.add_(torch.randn(p.shape) * 0.05)
        # transformers v5 leaves both fixed tables zero in a fresh model (its _init_weights order); set
        # them as the released checkpoints hold them: the 2-D sin-cos table with its halves swapped.
        for table in (model.vit.embeddings.position_embeddings, model.decoder.decoder_pos_embed):
            sincos = build_2d_sinusoidal_position_embedding(4, 4, table.shape[-1], cls_token=True)
            table.copy_(torch.roll(sincos, table.shape[-1] // 2, dims=-1)[None])
    path = str(tmp_path_factory.mktemp("vit_mae"))
    model.save_pretrained(path)
    return model, path


def _inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(2, 32, 32, 3)).astype(np.float32), rng.uniform(size=(2, 16)).astype(np.float32)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_matches_transformers(hf, norm_pix_loss):
    model, path = hf
    pixels, noise = _inputs()
    model.config.norm_pix_loss = norm_pix_loss
    with torch.no_grad():
        want = model(torch.from_numpy(pixels).permute(0, 3, 1, 2), noise=torch.from_numpy(noise))
    module, variables = load_mae(path, norm_pix_loss=norm_pix_loss)
    got = jax.jit(module.apply)(variables, pixels, noise)
    np.testing.assert_array_equal(np.asarray(got.ids_restore), want.ids_restore.numpy())
    np.testing.assert_array_equal(np.asarray(got.mask), want.mask.numpy())
    np.testing.assert_allclose(np.asarray(got.logits), want.logits.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(float(got.loss), float(want.loss), rtol=RTOL)


@pytest.mark.parametrize("naming", ["v5-modules", "v4-release"])
def test_other_names_load_the_same_params(hf, tmp_path, naming):
    """v5's save_pretrained writes v4 names with the decoder blocks under ``decoder_encoder.layer``;
    the released checkpoints have ``decoder_layers``, v5's modules ``layers`` / ``q_proj``."""
    _, path = hf
    renames = [("decoder_encoder.layer.", "decoder_layers.")]
    if naming == "v5-modules":
        renames += [
            ("encoder.layer.", "layers."), ("attention.attention.query", "attention.q_proj"),
            ("attention.attention.key", "attention.k_proj"),
            ("attention.attention.value", "attention.v_proj"),
            ("attention.output.dense", "attention.o_proj"), ("intermediate.dense", "mlp.fc1"),
            ("output.dense", "mlp.fc2"),
        ]  # fmt: skip
    tensors = {}
    for name, x in load_file(os.path.join(path, "model.safetensors")).items():
        for a, b in renames:
            name = name.replace(a, b)
        tensors[name] = x
    assert ("decoder.decoder_layers.0.mlp.fc2.bias" in tensors) == (naming == "v5-modules")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    _, saved = load_mae(path)
    _, renamed = load_mae(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, saved, renamed)


def _edited(path: str, dest, edit) -> str:
    tensors = load_file(os.path.join(path, "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dest / "model.safetensors"))
    (dest / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    return str(dest)


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda t: t.pop("decoder.decoder_encoder.layer.0.output.dense.bias"), "decoder/blocks/mlp/fc2/bias"),
        (
            lambda t: t.update({"vit.pooler.dense.weight": np.ones((2, 2), np.float32)}),
            "vit.pooler.dense.weight",
        ),
        (lambda t: t.pop("decoder.decoder_pos_embed"), "decoder.decoder_pos_embed is missing"),
        (
            lambda t: t.update({"vit.embeddings.position_embeddings": np.ones((1, 17, 32), np.float32)}),
            "vit.embeddings.position_embeddings (1, 17, 32) is not the fixed 2-D sin-cos table",
        ),
    ],
    ids=["missing", "extra", "missing-pos-table", "wrong-pos-table"],
)
def test_checkpoint_errors_name_the_tensor(hf, tmp_path, edit, named):
    with pytest.raises(ConversionError, match="Cannot load the ViTMAE checkpoint") as e:
        load_mae(_edited(hf[1], tmp_path, edit))
    assert named in str(e.value)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_mask_ratio_outside_unit_interval(hf, ratio):
    with pytest.raises(ValueError, match="mask_ratio must lie in"):
        MAEConfig(mask_ratio=ratio)
    with pytest.raises(ValueError, match="mask_ratio must lie in"):
        load_mae(hf[1], mask_ratio=ratio)


def test_random_masking_semantics():
    x = np.arange(2 * 6 * 1, dtype=np.float32).reshape(2, 6, 1)
    noise = np.array([[0.5, 0.1, 0.9, 0.3, 0.7, 0.2], [0.0, 0.6, 0.4, 0.8, 0.1, 0.9]], np.float32)
    kept, mask, ids_restore = random_masking(x, noise, 2)
    np.testing.assert_array_equal(np.asarray(kept)[..., 0], [[1, 5], [6, 10]])  # smallest noise first
    np.testing.assert_array_equal(mask, [[1, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 1]])
    shuffled = np.take_along_axis(x, np.argsort(noise, axis=1)[..., None], axis=1)
    np.testing.assert_array_equal(np.take_along_axis(shuffled, np.asarray(ids_restore)[..., None], axis=1), x)
    assert sincos_pos_embed(4, 16).shape == (17, 16) and not sincos_pos_embed(4, 16)[0].any()


def test_noise_from_the_masking_rng():
    cfg = MAEConfig(image_size=16, patch_size=8, width=16, depth=1, heads=2, mlp_dim=32, decoder_width=8,
                    decoder_depth=1, decoder_heads=2, decoder_mlp_dim=16, mask_ratio=0.5)  # fmt: skip
    module, pixels = MAE(cfg), np.ones((3, 16, 16, 3), np.float32)
    variables = jax.jit(module.init)(jax.random.PRNGKey(0), pixels, np.zeros((3, 4), np.float32))
    out = jax.jit(module.apply)(variables, pixels, rngs={"masking": jax.random.PRNGKey(1)})
    assert out.logits.shape == (3, 4, 192) and out.latent.shape == (3, 3, 16)
    np.testing.assert_array_equal(np.asarray(out.mask).sum(axis=1), [2, 2, 2])
    assert np.isfinite(float(out.loss))
    with pytest.raises(ValueError, match="noise must have shape"):
        module.apply(variables, pixels, np.zeros((3, 5), np.float32))
    assert cfg.len_keep == 2


def test_whole_image_features_and_embedded_decoder_input(hf):
    """``noise=None`` keeps every patch in raster order: transformers' encoder with mask_ratio 0 and
    increasing noise (which keeps the order); the decoder fed its own embedding with ``embedded=True``
    predicts what it predicts from the latent."""
    from pargo_jax.models.mae import MAEDecoder, MAEEncoder

    model, path = hf
    pixels, _ = _inputs()
    module, variables = load_mae(path)
    cfg, params = module.config, variables["params"]
    latent, mask, ids_restore = MAEEncoder(cfg).apply({"params": params["encoder"]}, pixels, None)
    model.config.mask_ratio = 0.0
    try:
        with torch.no_grad():
            noise = torch.arange(16, dtype=torch.float32).expand(2, 16)
            want = model.vit(torch.from_numpy(pixels).permute(0, 3, 1, 2), noise=noise).last_hidden_state
    finally:
        model.config.mask_ratio = TINY["mask_ratio"]
    assert latent.shape == (2, 17, 32) and not np.asarray(mask).any()
    np.testing.assert_array_equal(ids_restore, np.broadcast_to(np.arange(16), (2, 16)))
    np.testing.assert_allclose(np.asarray(latent), want.numpy(), rtol=RTOL, atol=ATOL)
    decoder = MAEDecoder(cfg)
    dec = {"params": params["decoder"]}
    plain = decoder.apply(dec, latent, ids_restore)
    embedded = latent @ params["decoder"]["embed"]["kernel"] + params["decoder"]["embed"]["bias"]
    np.testing.assert_allclose(decoder.apply(dec, embedded, ids_restore, embedded=True), plain, atol=1e-6)
