"""Stage 2: instruction tuning (SFT), starting from the stage-1 projector.

  python -m pargo_jax.main --config=experiments/sft.py                        # demo: after the demo pretrain
  python -m pargo_jax.main --config=experiments/sft.py:paper --config.checkpoint.init_from=gs://bucket/pargo_pt

``init_from`` names the pretrain workdir; ``init_from_parts`` says which parts of the model come from it
(the projector; in the demo everything, since its stage 1 trained the LLM and tuned the tower too).
Towers and LLM come from their own checkpoints. ``paper`` trains the projector and one LoRA adapter
(r=256, alpha=512) on InternLM2's fused ``wqkv`` per layer, as released (``siglip_qwen2``: on q, k,
v), LLM weights frozen.
"""

from experiments import base, evals


def get_config(arg: str | None = None):
    name, c = base.preset(arg)
    if name in base.DEMOS:
        base.set_steps(c, total=2500, warmup=50)
        c.log_every_steps = 100
        c.optim.lr = 6e-4
        c.trainable = base.regex_dict({"vision_tower/.*": 0.3, "projector/.*": 1.0, "llm/.*": 1.0})
        c.input.sources = [dict(name="shapes", split="sft")]
        c.checkpoint.init_from = "workdir/pretrain"
        c.checkpoint.init_from_parts = ("vision_tower", "projector", "llm")
        c.checkpoint.every_steps = 500
        c.evals = evals.get_config("shapes")
        c.evals.shapes.log_steps = 500  # per-kind accuracy during training
        if name == "mg_llava_demo":
            c.trainable.update(base.regex_dict(base.MG_LLAVA_PARTS | {"high_res_tower/.*": 0.3}))
            c.checkpoint.init_from = "workdir/pretrain_mg_llava_demo"
            c.checkpoint.init_from_parts = ("vision_tower", "projector", "llm", "high_res_tower", "fusion",
                                            "box_projector")  # fmt: skip
    elif name in base.QFORMERS:  # stage 2: the Q-Former (+ fusion) and its projection to the LLM, LM loss
        c.checkpoint.init_from = "workdir/pretrain_" + name
        c.checkpoint.init_from_parts = ("projector",)
        c.trainable = base.regex_dict({"projector/.*": 1.0})
        if name in base.QFORMER_DEMOS:  # the demo LLM is random: it trains too
            base.set_steps(c, total=2500, warmup=50)
            c.log_every_steps = 100
            c.optim.lr = 6e-4
            c.trainable.update(base.regex_dict({"llm/.*": 1.0}))
            c.input.sources = [dict(name="shapes", split="sft")]
            c.checkpoint.every_steps = 500
            c.evals = evals.get_config("shapes")
            c.evals.shapes.log_steps = 500
        else:  # BLIP-2's stage 2 on captions (LLM frozen); instruction data works the same way
            base.set_steps(c, total=80_000, warmup=2000)
            c.input.update(
                batch_size=1920, data_dir="data", sources=[dict(name="llava/pretrain", split="train")]
            )
            c.optim.update(lr=1e-4, min_lr_ratio=0.1, weight_decay=0.05)
    elif name == "mg_llava":  # stage 2: + the whole LLM at lr 2e-5, batch 128
        base.set_steps(c, total=5200, warmup=156)
        c.input.batch_size = 128
        c.input.data_dir = "data"
        c.input.sources = [dict(name="llava/instruct", split="train")]
        c.input.detections = "data/llava_instruct_boxes.json"
        c.optim.lr = 2e-5
        c.checkpoint.init_from = "workdir/pretrain_mg_llava"
        c.checkpoint.init_from_parts = ("projector", "fusion", "box_projector")
        c.trainable = base.regex_dict({"projector/.*": 1.0, "llm/.*": 1.0, **base.MG_LLAVA_PARTS})
    else:  # LLaVA-Instruct 665K (python -m data_pipelines.build --dataset llava --config instruct)
        base.set_steps(c, total=5200, warmup=156)  # one epoch at batch 128
        c.input.batch_size = 128
        c.input.data_dir = "data"
        c.input.sources = [dict(name="llava/instruct", split="train")]
        c.optim.lr = 2e-4
        c.checkpoint.init_from = "workdir/pretrain_" + name
        qkv = r"layers/attn/qkv" if c.model.llm.overrides.get("fused_qkv") else r"layers/attn/(q|k|v)"
        c.model.llm.overrides.update(lora_rank=256, lora_alpha=512.0, lora_targets=qkv)
        c.trainable = base.regex_dict({"projector/.*": 1.0, r"llm/.*lora_(a|b)": 1.0})
    return c
