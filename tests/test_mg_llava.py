"""MG-LLaVA in the model: the low-res path is torch's bilinear downsample, the Conv-Gate model starts as
the one-tower model, object tokens are the box projector of RoIAlign features (masked when absent),
and the ``mg_llava_demo`` preset trains, evaluates and loads back through the command line."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from pargo_jax.models import regions
from pargo_jax.models.convnext import CONVNEXT_PRESETS, ConvNeXtConfig
from pargo_jax.models.fusion import FusionConfig
from pargo_jax.models.llm import LLMConfig
from pargo_jax.models.mllm import HighResConfig, MLLMConfig, VisionLanguageModel
from pargo_jax.models.projectors import MLPConfig
from pargo_jax.models.vision import vision_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(max_boxes: int = 0) -> MLLMConfig:
    vision = vision_preset("tiny", image_size=32, patch_size=8, width=16, depth=1, heads=2, mlp_dim=32)
    tower = ConvNeXtConfig(**{**CONVNEXT_PRESETS["tiny_test"], "image_size": 128})  # last stage 4 x 4
    high = HighResConfig(
        tower, FusionConfig(16, tower.dims[-1]), max_boxes=max_boxes, roi_output=4, roi_grid=16
    )
    llm = LLMConfig(vocab_size=32, hidden_size=24, intermediate_size=48, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=12)  # fmt: skip
    return MLLMConfig(vision, MLPConfig(vision_width=16, llm_width=24), llm, image_token_id=3, high_res=high)


def init(mcfg: MLLMConfig):
    model = VisionLanguageModel(mcfg)
    s, m = mcfg.image_size, mcfg.high_res.max_boxes
    boxes = jnp.zeros((2, m, 4)) if m else None
    params = model.init(jax.random.key(0), jnp.zeros((2, s, s, 3)), jnp.zeros((2, 4), jnp.int32),
                        jnp.ones((2, 4), jnp.int32), boxes=boxes)["params"]  # fmt: skip
    return model, nn.unbox(params)


def test_low_res_path_is_torchs_bilinear_downsample():
    x = np.random.RandomState(0).randn(2, 128, 128, 3).astype(np.float32)
    got = jax.image.resize(x, (2, 32, 32, 3), "bilinear", antialias=False)
    nchw = torch.as_tensor(x).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(nchw, size=(32, 32), mode="bilinear", align_corners=False)
    want = want.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.slow  # two models with ConvNeXt paths compiled
def test_conv_gate_model_starts_as_the_one_tower_model():
    mcfg = tiny()
    model, params = init(mcfg)
    images = jax.random.normal(jax.random.key(1), (2, 128, 128, 3))
    got = model.apply({"params": params}, images, method=model.encode_images)
    one = VisionLanguageModel(dataclasses.replace(mcfg, high_res=None))
    low = jax.image.resize(images, (2, 32, 32, 3), "bilinear", antialias=False)
    want = one.apply({"params": {k: params[k] for k in ("vision_tower", "projector", "llm")}}, low,
                     method=one.encode_images)  # fmt: skip
    np.testing.assert_allclose(got, want, atol=1e-6)  # proj_h, proj_l zero: F == L


def test_object_tokens_are_the_box_projector_of_roi_features():
    mcfg = tiny(max_boxes=2)
    model, params = init(mcfg)
    images = jax.random.normal(jax.random.key(1), (2, 128, 128, 3))
    boxes = jnp.array([[[0, 0, 64, 64], [32, 16, 128, 100]], [[8, 8, 40, 40], [0, 0, 128, 128]]], jnp.float32)
    tokens = model.apply({"params": params}, images, True, boxes, method=model.encode_images)
    assert tokens.shape == (2, mcfg.num_image_tokens, 24) and mcfg.num_image_tokens == 16 + 2
    maps = model.apply({"params": params}, images, method=lambda m, x: m.high_res_tower(x))
    pooled = regions.roi_align_mean(maps, boxes, image_size=128, output_size=4, grid=16)
    p = params["box_projector"]
    h = jax.nn.gelu(pooled @ p["fc1"]["kernel"] + p["fc1"]["bias"], approximate=False)
    np.testing.assert_allclose(
        tokens[:, 16:], h @ p["fc2"]["kernel"] + p["fc2"]["bias"], rtol=1e-5, atol=1e-5
    )
    moved = model.apply({"params": params}, images, True, boxes.at[0, 1].set(jnp.array([0, 0, 20, 20.0])),
                        method=model.encode_images)  # fmt: skip
    changed = np.abs(np.asarray(moved - tokens)).max(-1) > 1e-6
    assert changed[0, 17] and not changed[0, :17].any() and not changed[1].any()


def test_model_json_round_trips_the_high_res_path():
    from pargo_jax.models import factory

    mcfg = tiny(max_boxes=2)
    back = factory.model_config_from_dict(json.loads(json.dumps(factory.model_config_to_dict(mcfg))))
    assert back == mcfg


def test_pipeline_gives_boxes_and_masks_the_empty_slots(shapes_dir):
    from data_pipelines import pipeline, shapes
    from experiments import pretrain

    c = pretrain.get_config("mg_llava_demo")
    c.input.data_dir = shapes_dir
    c.input.tokenizer = os.path.join(shapes_dir, "shapes_tokenizer")
    c.input.shuffle = False
    batch = pipeline.make_dataset(c.input, num_image_tokens=24, seed=0, num_boxes=4)[0]
    image_id = 4
    for r, rid in enumerate(batch["record_id"]):
        rec = shapes.make_record("pretrain", int(str(rid).split("/")[-1]), image_size=64)
        k = len(rec.boxes)
        np.testing.assert_allclose(batch["boxes"][r, :k], rec.boxes * 4)  # 64 px squashed to 256
        assert not batch["boxes"][r, k:].any()
        slots = np.flatnonzero(batch["input_ids"][r] == image_id)[-4:]
        assert batch["attention_mask"][r, slots].tolist() == [1] * k + [0] * (4 - k)


def test_mg_llava_demo_trains_evaluates_and_loads_through_main(mg_llava_workdirs, tmp_path):
    ft = mg_llava_workdirs["sft"]
    assert "eval shapes @ step 3" in mg_llava_workdirs["log"]
    from pargo_jax import runs

    loaded = runs.load_workdir(ft)
    assert loaded.mcfg.high_res.max_boxes == 4 and loaded.mcfg.num_image_tokens == 24
    assert {"high_res_tower", "fusion", "box_projector"} <= set(loaded.params)
    metrics = json.load(open(os.path.join(ft, "eval", "3", "shapes.json")))
    assert metrics["examples"] == 16 and 0 <= metrics["accuracy"] <= 1
    from pargo_jax.export import export_workdir

    done = export_workdir(
        ft, str(tmp_path / "export")
    )  # never a transformers model without the high-res path
    assert done["transformers"].startswith("skipped: MG-LLaVA's high-res path") and os.path.isdir(done["llm"])
    assert done["official"].startswith("skipped: ")


def test_mg_llava_preset_shapes():
    """The full preset's model (no weights read): CLIP-L/336's 576 tokens fused with ConvNeXt-L's
    24 x 24 last stage, the MLP over the 1024-wide fused tokens, 100 object-token slots."""
    from experiments import pretrain
    from pargo_jax import runs

    c = pretrain.get_config("mg_llava")
    overrides = dict(feature_layer=-2, drop_cls=True)
    c.model.vision = dict(path=None, format="hf", preset="clip-L/14-336", overrides=overrides)
    c.model.high_res.path = None
    c.model.high_res.preset = "convnext_large"
    vicuna = dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                  head_dim=128)  # fmt: skip
    c.model.llm = dict(path=None, config=vicuna, overrides={})
    tok = type("Tok", (), {"vocab_size": 32000, "image_token_id": 32000})()
    mcfg = runs.model_config(c, tok)
    assert mcfg.high_res.tower.grid_sizes() == (192, 96, 48, 24) and mcfg.vision.grid == 24
    assert mcfg.projector.vision_width == 1024 and mcfg.num_image_tokens == 576 + 100
    assert sum(mcfg.high_res.tower.dims) == 2880 and mcfg.image_size == 768


def test_object_boxes_reach_predict_and_scores(mg_llava_workdirs, tmp_path, capsys):
    """``predict --input`` takes each line's ``boxes``; bad boxes skip their line with one message; the
    scores with boxes differ from the scores without (the object tokens are used)."""
    from data_pipelines import shapes
    from data_pipelines.text import pack_example
    from pargo_jax import predict, runs
    from pargo_jax.predictor import Predictor

    ft = mg_llava_workdirs["sft"]
    rec = shapes.make_record("eval", 0)
    (tmp_path / "0.png").write_bytes(rec.image)
    box = [float(v) for v in rec.boxes[0]]
    ask = dict(image="0.png", prompt="what colour is the circle?")
    bad = dict(ask, id="bad", boxes=[[4, 4, 1, 1]])  # x2 < x1
    lines = [dict(ask, id="with", boxes=[box]), dict(ask, id="without"), bad]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    capsys.readouterr()
    args = [f"--workdir={ft}", f"--input={tmp_path / 'q.jsonl'}", f"--output={tmp_path / 'a.jsonl'}"]
    predict.main(["predict"], predict.parse_flags([*args, "--max_new_tokens=4"]))
    stderr = capsys.readouterr().err
    answers = {a["id"]: a for a in map(json.loads, open(tmp_path / "a.jsonl"))}
    assert sorted(answers) == ["with", "without"]
    assert "predict: skipped bad: boxes must be [[x1, y1, x2, y2], ...]" in stderr
    assert "answered 2 of 3 queries (1 skipped)" in stderr

    run = runs.load_workdir(ft)
    p = Predictor.from_config(run.model, run.tokenizer, run.mesh, run.config)
    turns = [{"role": t.role, "content": t.text} for t in rec.conversation]
    arrays = pack_example(run.tokenizer, turns, num_image_tokens=p.mcfg.num_image_tokens, max_len=144)
    example = dict(arrays, image=p.pixels(rec.image))
    with_boxes, without = p.scores(run.params, [p.with_boxes(dict(example), rec.image, rec.boxes),
                                                p.with_boxes(dict(example), rec.image, None)])  # fmt: skip
    assert with_boxes["tokens"] == without["tokens"] > 0
    assert with_boxes["logprob"] != pytest.approx(without["logprob"], rel=1e-6)
