"""Every non-demo preset starts on tiny random checkpoints in the files' real layouts and trains a few
steps, pretrain then SFT from it, configured as ``python -m pargo_jax.main --config.K=V`` flags would
(in this process: the command line itself is run by the demo's tests):

  paper         EVA-CLIP ``.pt`` (a whole CLIP: ``visual.*`` tower keys with EVA-CLIP's names, text
                tower beside it), InternLM2 HF directory (fused ``wqkv``, sharded safetensors),
                bert-small-shaped HF BERT (``pytorch_model.bin``, ``bert.`` / ``cls.`` keys)
  siglip_qwen2  SigLIP HF directory (a whole SiglipModel), Qwen2 HF directory (sharded), BERT

and the other layouts the presets take (a whole CLIPModel directory, a Llama directory) in the
``siglip_qwen2`` preset's place.

Shapes are shrunk with config overrides only (tower / LLM sizes come from the files); data is a
small LLaVA-format JSON built with ``python -m data_pipelines.build``.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch

from experiments import pretrain
from experiments import sft as sft_stage
from pargo_jax import export, launcher
from tests import demo
from tests.test_bert_init import tiny_bert
from tests.torch_refs.eva02 import Eva, evaclip_state
from tests.torch_refs.tiny_llm import COMMON, write_internlm2

# tiny checkpoints in four layouts, then pretrain + SFT of each preset: slow by construction
pytestmark = pytest.mark.slow

VOCAB = 192  # the shapes tokenizer's 180 words fit
PROJECTOR = dict(num_partial=4, num_global=2, hidden=64, heads=4, layers=2, mlp_dim=96, max_positions=64)


def _llms(root: str) -> dict[str, str]:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from data_pipelines import shapes

    torch.manual_seed(0)
    common = {**COMMON, "vocab_size": VOCAB, "max_position_embeddings": 128}
    dirs = {name: os.path.join(root, name) for name in ("internlm2", "qwen2", "llama")}
    write_internlm2(LlamaForCausalLM(LlamaConfig(**common)), dirs["internlm2"])
    Qwen2ForCausalLM(Qwen2Config(**common)).save_pretrained(dirs["qwen2"], max_shard_size="100KB")
    LlamaForCausalLM(LlamaConfig(**common)).save_pretrained(dirs["llama"])
    for d in dirs.values():  # the LLM directory carries its tokenizer, as HF checkpoints do
        shapes.write_tokenizer(d)
    return dirs


def _towers(root: str) -> dict[str, str]:
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    torch.manual_seed(0)
    eva = Eva(img_size=28, patch_size=7, dim=64, depth=2, heads=1, hidden=80, ref_grid=16)  # 64-wide heads
    state = {f"visual.{k}": v for k, v in evaclip_state(eva).items()}
    state.update({"text.token_embedding.weight": torch.randn(50, 16), "logit_scale": torch.ones(())})
    eva_file = os.path.join(root, "EVA02_CLIP_tiny.pt")
    torch.save(state, eva_file)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  image_size=28, patch_size=7)  # fmt: skip
    text = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    siglip = os.path.join(root, "siglip")
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(siglip)
    clip = os.path.join(root, "clip")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(clip)
    return {"eva": eva_file, "siglip": siglip, "clip": clip}


def _llava(root: str) -> str:
    """A few LLaVA-Pretrain and LLaVA-Instruct records built into ``root/data``."""
    from PIL import Image

    from data_pipelines import build

    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for i in range(8):
        pixels = rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, "images", f"{i}.jpg"))
    turns = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    record = lambda i, q, a: {"id": f"{q[:1]}{i}", "image": f"{i}.jpg", "conversations": turns(q, a)}
    pretrain = [record(i, "<image>", "a red circle.") for i in range(8)]
    instruct = [record(i, "<image>\nwhat colour is the circle?", "red") for i in range(8)]
    data = os.path.join(root, "data")
    for name, records in (("pretrain", pretrain), ("instruct", instruct)):
        src = os.path.join(root, f"{name}.json")
        with open(src, "w") as f:
            json.dump(records, f)
        args = ["--dataset", "llava", "--config", name, "--src", src, "--image_dir",
                os.path.join(root, "images"), "--data_dir", data, "--num_workers", "1"]  # fmt: skip
        build.run(launcher.parse(build.define_flags, args))
    return data


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = str(tmp_path_factory.mktemp("preset_checkpoints"))
    bert = os.path.join(root, "bert-small")
    tiny_bert(bert, pretraining=True, intermediate_size=96)
    return {**_llms(root), **_towers(root), "bert": bert, "data": _llava(root)}


def _train(stage, preset: str, workdir: str, flags: dict, caplog) -> str:
    """``python -m pargo_jax.main --config=experiments/STAGE.py:PRESET --config.K=V ...`` on 2 devices, in
    this process (``main`` itself is run by the demo's command-line tests); returns what it logged."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="absl"):  # data_pipelines.build quiets absl to ERRORs
        config = demo.override(stage.get_config(preset), {**flags, "mesh.num_devices": 2})
        demo.prepare_and_train(config, workdir)
    # what main's console shows: orbax's INFO chatter is filtered out there
    return "\n".join(r.getMessage() for r in caplog.records if "/orbax/" not in r.pathname)


PRESETS = {"paper": ("eva", "internlm2", 28), "siglip_qwen2": ("siglip", "qwen2", 28)}


def _common(checkpoints, tower: str, llm: str, size: int) -> dict:
    return {
        "model.vision.path": checkpoints[tower],
        "model.llm.path": checkpoints[llm],
        "input.tokenizer": checkpoints[llm],
        "input.data_dir": checkpoints["data"],
        "input.image_size": size,
        "input.batch_size": 2,
        "input.max_len": 64,
        "total_steps": 3,
        "optim.warmup_steps": 1,
        "log_every_steps": 1,
        "checkpoint.every_steps": 3,
        **{f"model.projector.{k}": v for k, v in PROJECTOR.items()},
    }


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_pretrain_then_sft(preset, checkpoints, tmp_path, caplog):
    common = _common(checkpoints, *PRESETS[preset])
    pre, sft = str(tmp_path / "pretrain"), str(tmp_path / "sft")
    log = _train(pretrain, preset, pre, {**common, "model.projector.init_from_bert": checkpoints["bert"]},
                 caplog)  # fmt: skip
    assert "ParGo from BERT" in log and "Initialized" not in log
    losses = demo.losses(pre)
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(list(losses.values())))
    log = _train(sft_stage, preset, sft, {**common, "checkpoint.init_from": pre}, caplog)
    assert f"Initialized projector from {pre}" in log
    assert sorted(demo.losses(sft)) == [1, 2, 3]
    model = json.load(open(os.path.join(sft, "model.json")))
    assert model["llm"]["lora_rank"] == 256 and model["projector"]["num_partial"] == 4
    assert model["llm"]["fused_qkv"] == (preset == "paper")  # the release's one adapter on wqkv
    if preset != "paper":
        return
    # The paper model exports to the release's layout, which load_model reads back to the same function.
    out = str(tmp_path / "export")
    export.export_workdir(sft, out)
    parts = json.load(open(os.path.join(out, "export.json")))["parts"]
    assert not any(str(where).startswith("skipped") for where in parts.values()), parts
    import jax

    from pargo_jax import runs
    from pargo_jax.convert.official import load_model

    trained = runs.load_workdir(sft)
    official = os.path.join(out, "official", "pytorch_model.bin")
    model, variables = load_model(
        official, checkpoints["internlm2"], num_partial=4, num_heads=4, vision_heads=1
    )
    images = np.random.RandomState(0).randn(2, 28, 28, 3).astype(np.float32)
    encode = lambda m, v: np.asarray(jax.jit(lambda v, x: m.apply(v, x, method=m.encode_images))(v, images))
    want = encode(trained.model, {"params": trained.params})  # the preset computes in bfloat16
    assert np.abs(encode(model, variables) - want).max() <= 0.02 * np.abs(want).max()
    # ... and to transformers (EVA02 in the written code, InternLM2 run as Llama with q / k / v apart).
    import torch
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        got = hf.image_tokens(torch.tensor(images).permute(0, 3, 1, 2)).numpy()
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()
    # ... and its LoRA to a PEFT adapter on wqkv, which reads back to the trained adapter.
    from pargo_jax.convert.hf import load_peft_adapter
    from pargo_jax.param_tree import flat_arrays

    cfg, adapter = load_peft_adapter(parts["llm_adapter"], trained.mcfg.llm, "internlm2")
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.fused_qkv) == (256, 512.0, True)
    trained_llm = flat_arrays(trained.params["llm"])
    assert sorted(adapter) == sorted(k for k in trained_llm if "lora_" in k)
    for k, x in adapter.items():
        np.testing.assert_array_equal(x, trained_llm[k].astype(np.float32))


def test_clip_and_llama_directories_train(checkpoints, tmp_path, caplog):
    """A whole CLIPModel directory (the preset's penultimate layer; its CLS token must be dropped for
    ParGo's windows, which one line says) and a Llama directory in the ``siglip_qwen2`` preset's place."""
    workdir = str(tmp_path / "pretrain")
    flags = {
        **_common(checkpoints, "clip", "llama", 28),
        "model.projector.init_from_bert": checkpoints["bert"],
    }
    with pytest.raises(ValueError, match=r"set config.model.vision.overrides.drop_cls=True\.$"):
        _train(pretrain, "siglip_qwen2", workdir, flags, caplog)
    flags["model.vision.overrides.drop_cls"] = True
    _train(pretrain, "siglip_qwen2", workdir, flags, caplog)
    losses = demo.losses(workdir)
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(list(losses.values())))
    model = json.load(open(os.path.join(workdir, "model.json")))
    assert model["vision"]["kind"] == "clip" and model["llm"]["family"] == "llama"


def test_tinygroundinggpt_stages_on_tiny_checkpoints(checkpoints, tmp_path, caplog):
    """``experiments/grounding.py:tinygroundinggpt:1..3`` on a CLIP directory and a Qwen2 directory: stage 1
    trains the projector alone, stage 2 starts from its projector and reads object crops as extra images,
    stage 3 from stage 2's projector and LLM; the multi-scale sources are the shapes source's builds."""
    import ml_collections

    from data_pipelines import multiscale
    from experiments import grounding

    data = str(tmp_path / "data")
    names = multiscale.ensure_shapes(data, num=16, num_eval=4, **{
        k: v for k, v in grounding.DEMO_MULTISCALE.items() if k in ("max_objects", "max_crops", "num_choices")
    })["names"]  # fmt: skip
    llava = lambda split: dict(name=f"llava/{split}", split="train", data_dir=checkpoints["data"])  # noqa: E731
    ms = lambda config: dict(name=names[config], split="train", data_dir=data)  # noqa: E731
    sources = {1: [ms("perception"), llava("pretrain")], 2: [ms("local"), ms("perception")],
               3: [ms("global"), llava("instruct")]}  # fmt: skip
    common = {
        **_common(checkpoints, "clip", "qwen2", 28),
        "input.max_len": 160,
        "evals": ml_collections.ConfigDict(),
    }
    for k in PROJECTOR:
        common.pop(f"model.projector.{k}")  # the MLP projector
    for stage in (1, 2, 3):
        flags = {**common, "input.sources": sources[stage], "input.data_dir": data}
        if stage > 1:
            flags["checkpoint.init_from"] = str(tmp_path / f"tg_{stage - 1}")
        log = _train(grounding, f"tinygroundinggpt:{stage}", str(tmp_path / f"tg_{stage}"), flags, caplog)
        assert sorted(demo.losses(str(tmp_path / f"tg_{stage}"))) == [1, 2, 3]
        if stage == 2:
            assert f"Initialized projector from {tmp_path / 'tg_1'}" in log
        if stage == 3:
            assert "Initialized llm" in log
