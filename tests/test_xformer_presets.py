"""The Q-Former presets as ``python -m pargo_jax.main`` runs them (prepare, then train), stage 1 then
stage 2: ``xformer`` on tiny checkpoints written in the real layouts (an HF BLIP-2 directory for the
tower and the Q-Former, an HF ViTMAE directory, an HF OPT directory, a BERT tokenizer given
``[DEC]``), and the ``xformer_demo`` preset on the small shapes set (with its shapes evaluation, the
workdir loading back and the export)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from experiments import pretrain, sft
from tests import demo

WORDS = "a an the red green blue yellow circle square triangle star at top bottom left right of".split()


def _checkpoints(root: str, llm_vocab: int, qformer_vocab: int) -> dict[str, str]:
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        OPTConfig,
        OPTForCausalLM,
        ViTMAEConfig,
        ViTMAEForPreTraining,
    )
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    torch.manual_seed(0)
    opt = dict(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=llm_vocab,
        max_position_embeddings=256,
        word_embed_proj_dim=32,
    )
    blip2 = Blip2Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        qformer_config=dict(
            hidden_size=32,
            num_attention_heads=4,
            num_hidden_layers=2,
            intermediate_size=64,
            cross_attention_frequency=2,
            vocab_size=qformer_vocab,
            max_position_embeddings=32,
        ),
        text_config={"model_type": "opt", **opt},
        num_query_tokens=8,
    )
    paths = {k: os.path.join(root, k) for k in ("blip2", "opt", "mae")}
    Blip2ForConditionalGeneration(blip2).save_pretrained(paths["blip2"])
    OPTForCausalLM(OPTConfig(**opt)).save_pretrained(paths["opt"])
    mae = ViTMAEForPreTraining(
        ViTMAEConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            decoder_hidden_size=16,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=4,
            decoder_intermediate_size=32,
            image_size=32,
            patch_size=8,
        )
    )
    with torch.no_grad():  # the fixed sin-cos tables as released checkpoints hold them
        for table in (mae.vit.embeddings.position_embeddings, mae.decoder.decoder_pos_embed):
            sincos = build_2d_sinusoidal_position_embedding(4, 4, table.shape[-1], cls_token=True)
            table.copy_(torch.roll(sincos, table.shape[-1] // 2, dims=-1)[None])
    mae.save_pretrained(paths["mae"])
    return paths


@pytest.mark.slow
def test_xformer_preset_on_tiny_checkpoints_in_the_real_layouts(shapes_dir, tmp_path):
    """Stage 1 (ITC / ITM / ITG / recon, each logged) with the Q-Former from the BLIP-2 directory, then
    stage 2 (LM loss, OPT frozen) from stage 1's projector: both finish with finite losses, and stage
    2 reads stage 1's projector (``init_from``). Four compiled programs (two stages, their first steps and
    checkpoints) make it ~40 s."""
    from data_pipelines.text import load_qformer_tokenizer, load_tokenizer, prepare_qformer_tokenizer

    bert = demo.bert_tokenizer(str(tmp_path / "bert"), WORDS)
    qtok = prepare_qformer_tokenizer(bert, str(tmp_path / "bert_dec"))
    llm_tok = os.path.join(shapes_dir, "shapes_tokenizer")
    paths = _checkpoints(
        str(tmp_path), load_tokenizer(llm_tok).vocab_size, load_qformer_tokenizer(qtok).vocab_size
    )
    common = {
        "model.vision.path": paths["blip2"],
        "model.detail.path": paths["mae"],
        "model.llm.path": paths["opt"],
        "model.projector.init_from_blip2": paths["blip2"],
        "input.tokenizer": llm_tok,
        "input.qformer_tokenizer": qtok,
        "input.data_dir": shapes_dir,
        "input.image_size": 32,
        "input.batch_size": 4,
        "input.max_len": 80,
        "mesh.num_devices": 1,
        "log_every_steps": 1,
        "model.dtype": "float32",
        "model.frozen_dtype": "float32",
    }
    c = demo.override(
        pretrain.get_config("xformer"),
        {
            **common,
            "total_steps": 3,
            "optim.warmup_steps": 1,
            "input.sources": [dict(name="shapes", split="pretrain")],
        },
    )
    stage1 = demo.prepare_and_train(c, str(tmp_path / "pt"))
    assert all(np.isfinite(stage1[f"loss/{k}"]) for k in ("itc", "itm", "itg", "recon"))
    c = demo.override(
        sft.get_config("xformer"),
        {
            **common,
            "total_steps": 2,
            "optim.warmup_steps": 1,
            "input.sources": [dict(name="shapes", split="sft")],
            "checkpoint.init_from": str(tmp_path / "pt"),
        },
    )
    stage2 = demo.prepare_and_train(c, str(tmp_path / "sft"))
    assert np.isfinite(stage2["loss"]) and "loss/itc" not in stage2
    rows = demo.metric_rows(str(tmp_path / "pt"))
    assert {"loss/itc", "loss/itm", "loss/itg", "loss/recon"} <= set(rows[0]) and len(rows) == 3


@pytest.mark.slow
def test_xformer_demo_trains_evaluates_loads_and_exports(shapes_dir, tmp_path):
    """``xformer_demo``'s two stages as ``main --config=experiments/STAGE.py:xformer_demo`` runs them
    (3 + 3 steps; the demo MAE built on first use with tiny options), the shapes evaluation
    at the end of stage 2, the workdir loading back with its MAE, and the export: the LLM, the tower
    and the MAE written (the MAE loads in transformers), the whole-model directory skipped with its
    reason. Two stages of compiling, an MAE build and an evaluation make it ~50 s."""
    from transformers import ViTMAEForPreTraining

    from pargo_jax import runs
    from pargo_jax.export import export_workdir

    tiny_mae = {"demo_mae.steps": 5, "demo_mae.batch_size": 4, "model.detail.path": str(tmp_path / "mae")}
    pt, ft = str(tmp_path / "pt"), str(tmp_path / "sft")
    stage1 = demo.prepare_and_train(
        demo.demo_config(shapes_dir, 3, preset="xformer_demo", **{**tiny_mae, "input.batch_size": 4}), pt
    )
    assert {"loss/itc", "loss/itm", "loss/itg", "loss/recon"} <= set(stage1)
    extra = {"input.batch_size": 4, "checkpoint.init_from": pt, "evals.shapes.log_steps": 3}
    c = demo.demo_config(shapes_dir, 3, stage=sft, preset="xformer_demo", **tiny_mae, **extra)
    stage2 = demo.prepare_and_train(c, ft)
    assert 0 <= stage2["eval/shapes/accuracy"] <= 1 and np.isfinite(stage2["loss"])
    loaded = runs.load_workdir(ft)
    assert loaded.mcfg.detail.mae.mask_ratio == 0.5 and "detail_tower" in loaded.params
    done = export_workdir(ft, str(tmp_path / "export"))
    assert done["transformers"] == "skipped: The 'xformer' projector has no PyTorch export."
    assert os.path.isdir(done["llm"]) and os.path.isdir(done["vision_tower"])
    mae = ViTMAEForPreTraining.from_pretrained(done["detail_tower"])
    assert mae.config.hidden_size == loaded.mcfg.detail.mae.width
