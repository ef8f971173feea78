"""Export to PyTorch: the transformers custom-code directory computes the JAX model (every projector
variant, random weights), the demo workdir exports through the command line, and its forward and
greedy generate equal the JAX model and ``pargo_jax.predict``; the LLM and tower directories load in
transformers."""

from __future__ import annotations

import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from data_pipelines import shapes
from data_pipelines.text import load_tokenizer
from pargo_jax import runs, sharding
from pargo_jax.export import save_transformers
from pargo_jax.models import factory, projectors
from pargo_jax.models.llm import LLMConfig
from pargo_jax.models.mllm import MLLMConfig
from pargo_jax.models.vision import vision_preset
from tests import procs

PARGO = dict(hidden=32, heads=4, layers=3, mlp_dim=48, max_positions=32, vision_width=32, llm_width=64)
VARIANTS = {
    "released-raster": ("pargo", dict(PARGO, num_partial=8, num_global=4)),
    "cascaded-grid": ("pargo", dict(PARGO, num_partial=4, num_global=2, cpp="cascaded", layout="grid")),
    "qformer": ("qformer", dict(PARGO, num_global=6)),
    "mlp": ("mlp", dict(vision_width=32, llm_width=64)),
    "mlp-group2": ("mlp", dict(vision_width=32, llm_width=64, group=2)),
}


def random_model(variant: str, tok, **tower):
    name, options = VARIANTS[variant]
    mcfg = MLLMConfig(
        vision=vision_preset("tiny", **tower),  # 32 px, 8 px patches: 16 patches (+ CLS for CLIP)
        projector=projectors.projector_config(name, options),
        llm=LLMConfig(
            vocab_size=tok.vocab_size,
            hidden_size=64,
            intermediate_size=96,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
        ),  # fmt: skip
        image_token_id=tok.image_token_id,
    )
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    with sharding.mesh_context(mesh):
        parts = factory.build(mcfg, mesh)
        params = jax.device_get(
            jax.jit(lambda r: __import__("flax").linen.unbox(parts.init(r)))(jax.random.key(1))
        )
    rng = np.random.RandomState(0)  # every tensor away from its init, so that a wrong mapping shows
    params = jax.tree.map(lambda p: (p + 0.1 * rng.randn(*p.shape)).astype(np.float32), params)
    return parts.model, params, mcfg


def inputs(tok, mcfg, batch: int = 2, seed: int = 0):
    rng = np.random.RandomState(seed)
    n = mcfg.num_image_tokens
    ids = rng.randint(10, tok.vocab_size, (batch, n + 7)).astype(np.int32)
    ids[ids == tok.image_token_id] = 10
    ids[:, 2 : 2 + n] = tok.image_token_id
    size = mcfg.vision.image_size
    return rng.randn(batch, size, size, 3).astype(np.float32), ids


def torch_logits(path, pixels, ids):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2))
    return out.logits.numpy(), model


def _close(got, want, tol=1e-4):
    assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max()), np.abs(got - want).max()


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_projector_variant_computes_the_jax_model(variant, tmp_path):
    tok = load_tokenizer(shapes.ASSET_TOKENIZER)
    model, params, mcfg = random_model(variant, tok)
    pixels, ids = inputs(tok, mcfg)
    want = np.asarray(jax.jit(model.apply)({"params": params}, pixels, ids, np.ones_like(ids)))
    got, _ = torch_logits(save_transformers(str(tmp_path / "hf"), mcfg, params, tok), pixels, ids)
    _close(got, want)


def test_clip_tower_penultimate_layer_without_cls_exports(tmp_path):
    tok = load_tokenizer(shapes.ASSET_TOKENIZER)
    model, params, mcfg = random_model("released-raster", tok, kind="clip", drop_cls=True, feature_layer=-2)
    pixels, ids = inputs(tok, mcfg)
    want = np.asarray(jax.jit(model.apply)({"params": params}, pixels, ids, np.ones_like(ids)))
    got, _ = torch_logits(save_transformers(str(tmp_path / "hf"), mcfg, params, tok), pixels, ids)
    _close(got, want)


@pytest.mark.parametrize("final_norm", [False, True], ids=["as-released", "final-norm"])
def test_eva02_tower_exports_in_the_written_code(final_norm, tmp_path):
    """EVA02 (RoPE, sub-LNs, SwiGLU) in ``modeling_pargo.Eva02Tower``; as released: last block, no final
    norm, CLS dropped."""
    tok = load_tokenizer(shapes.ASSET_TOKENIZER)
    model, params, mcfg = random_model(
        "released-raster", tok, kind="eva02", drop_cls=True, final_norm=final_norm, rope_ref_grid=3
    )
    pixels, ids = inputs(tok, mcfg)
    want = np.asarray(jax.jit(model.apply)({"params": params}, pixels, ids, np.ones_like(ids)))
    path = save_transformers(str(tmp_path / "hf"), mcfg, params, tok)
    got, hf = torch_logits(path, pixels, ids)
    _close(got, want)
    assert (hf.vision_tower.norm is not None) == final_norm


def test_the_runs_box_codec_round_trips_through_the_workdir_into_the_export(tmp_path):
    """``config.box_codec`` is saved with the run (W/config.json), read back by ``load_workdir`` and the
    predictor, and written into the export's ``generation_config.json`` and ``export.json``."""
    import json

    from transformers import GenerationConfig

    from data_pipelines.boxes import BoxCodec
    from experiments import base
    from pargo_jax import checkpoints
    from pargo_jax.export import export_workdir
    from pargo_jax.predictor import Predictor

    tok = load_tokenizer(shapes.ASSET_TOKENIZER)
    _, params, mcfg = random_model("mlp", tok)
    config, codec = base.base(), BoxCodec("int1000", "original")
    config.box_codec, config.mesh = codec.as_dict(), dict(data=1, num_devices=1)
    workdir, out = str(tmp_path / "run"), str(tmp_path / "export")
    runs.save_run(workdir, config, mcfg, tok)
    saved = checkpoints.Checkpointer(workdir, every_steps=1, async_save=False)
    saved.save(1, {"params": params}, {})
    saved.close()
    run = runs.load_workdir(workdir)
    assert run.box_codec == codec
    assert Predictor.from_config(run.model, run.tokenizer, run.mesh, run.config).box_codec == codec
    export_workdir(workdir, out)
    assert GenerationConfig.from_pretrained(out).box_codec == {"format": "int1000", "frame": "original"}
    with open(os.path.join(out, "export.json")) as f:
        assert json.load(f)["box_codec"] == codec.as_dict()


def test_demo_workdir_exports_through_the_command_line(trained_workdir, shapes_dir, tmp_path):
    """Demo workdir -> ``python -m pargo_jax.export`` -> transformers: forward equals the JAX logits,
    greedy ``generate`` the tokens ``pargo_jax.predict`` answers; DIR/llm and DIR/vision_tower load."""
    from transformers import AutoModelForCausalLM, SiglipVisionModel

    from pargo_jax.models.llm import CausalLM
    from pargo_jax.models.vision import VisionTower
    from pargo_jax.predictor import Predictor, question

    out = str(tmp_path / "export")
    proc = procs.run("pargo_jax.export", f"--workdir={trained_workdir}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "transformers" in proc.stdout and "skipped: not a model the official release can run" in proc.stdout
    )
    run = runs.load_workdir(trained_workdir)
    params = jax.device_get(run.params)
    predictor = Predictor.from_config(run.model, run.tokenizer, run.mesh, run.config)
    pngs = [shapes.draw_scene(shapes.sample_scene(random.Random(i), 64), 64, 20) for i in range(2)]
    prompts = ["what colour is the circle?", "how many shapes are there?"]
    queries = [question(f"q{i}", png, q) for i, (png, q) in enumerate(zip(pngs, prompts, strict=True))]
    mean, std = np.asarray(run.mcfg.pixel_mean), np.asarray(run.mcfg.pixel_std)
    pixels = np.stack([(predictor.pixels(q.image) / 255.0 - mean) / std for q in queries]).astype(np.float32)
    ids = [predictor.prompt(q) for q in queries]
    hf_logits, model = torch_logits(out, pixels[:1], ids[0][None])
    want = np.asarray(
        jax.jit(run.model.apply)({"params": params}, pixels[:1], ids[0][None], np.ones_like(ids[0][None]))
    )
    _close(hf_logits, want)
    assert (
        model.generation_config.box_codec == run.box_codec.as_dict() == {"format": "norm3", "frame": "square"}
    )
    answers = predictor.answers(run.params, queries)
    for q_ids, px, a in zip(ids, pixels, answers, strict=True):
        image = torch.tensor(px[None]).permute(0, 3, 1, 2)
        gen = model.generate(
            input_ids=torch.tensor(q_ids[None]), pixel_values=image, max_new_tokens=len(a["tokens"])
        )
        assert gen[0].tolist()[: len(a["tokens"])] == a["tokens"], (gen, a)
    # DIR/llm: the LLM alone, in transformers.
    llm = AutoModelForCausalLM.from_pretrained(os.path.join(out, "llm")).eval()
    text = np.asarray([ids[1][-6:]])
    with torch.no_grad():
        got = llm(torch.tensor(text)).logits.numpy()
    jax_llm = CausalLM(run.mcfg.llm).apply({"params": params["llm"]}, jnp.asarray(text))
    _close(got, np.asarray(jax_llm))
    # DIR/vision_tower: SiglipVisionModel's hidden_states[-1] + post_layernorm = the JAX tower.
    tower = SiglipVisionModel.from_pretrained(os.path.join(out, "vision_tower")).eval()
    with torch.no_grad():
        h = tower(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
        feats = tower.post_layernorm(h.hidden_states[-1]).numpy()
    _close(feats, np.asarray(VisionTower(run.mcfg.vision).apply({"params": params["vision_tower"]}, pixels)))
    from pargo_jax.convert.hf_vision import load_vision

    _, again = load_vision(os.path.join(out, "vision_tower"))  # export -> import: the same params
    jax.tree.map(np.testing.assert_array_equal, again["params"], params["vision_tower"])
