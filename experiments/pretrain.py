"""Stage 1: pretrain the projector on image-caption data, towers frozen.

  python -m pargo_jax.main --config=experiments/pretrain.py                  # demo (default): CPU, minutes
  python -m pargo_jax.main --config=experiments/pretrain.py:paper --workdir=gs://bucket/pargo_pt
  python -m pargo_jax.main --config=experiments/pretrain.py:siglip_qwen2 --workdir=/runs/sq_pt

``demo``: tiny SigLIP-style tower (pretrained into ``workdir/demo_tower`` on first run, then tuned)
and a random 4-layer Llama on the synthetic shapes captions (built into the workdir on first run). The demo
has no pretrained LLM, so its stage 1 also trains the LLM (``trainable`` includes ``llm/.*``); real
presets train the projector only, as ParGo and LLaVA do. The Q-Former presets (``xformer``,
``blip2``, ``xformer_demo``, ``blip2_demo``) train BLIP-2's stage 1 instead: the Q-Former's image-text
contrastive, matching and generation losses (X-Former: + the MAE reconstruction), no LLM.
"""

from experiments import base, evals


def get_config(arg: str | None = None):
    name, c = base.preset(arg)
    c.input.caption_prompt = ""
    if name in base.DEMOS:
        base.set_steps(c, total=2000, warmup=50)
        c.log_every_steps = 100
        c.optim.lr = 1e-3
        c.input.max_len = 80 if name == "demo" else 96  # captions: <= 70 tokens with the image's 20
        c.trainable = base.regex_dict({"vision_tower/.*": 0.3, "projector/.*": 1.0, "llm/.*": 1.0})
        c.input.sources = [dict(name="shapes", split="pretrain")]
        c.checkpoint.every_steps = 500
        c.evals = evals.get_config("val")
        c.evals.val.log_steps = 1000
        if name == "mg_llava_demo":
            c.trainable.update(base.regex_dict(base.MG_LLAVA_PARTS | {"high_res_tower/.*": 0.3}))
    elif name in base.QFORMERS:  # BLIP-2's stage 1: ITC + ITM + ITG (+ X-Former's reconstruction)
        c.objective = dict(name="qformer", itc=1.0, itm=1.0, itg=1.0, recon=1.0)
        c.trainable = base.regex_dict({"projector/.*": 1.0})
        c.sample_at_end = ""  # no LLM trains in this stage
        c.checkpoint.every_steps = 500
        if name in base.QFORMER_DEMOS:
            base.set_steps(c, total=2000, warmup=50)
            c.log_every_steps = 100
            c.optim.update(lr=1e-3, weight_decay=0.05)
            c.input.update(sources=[dict(name="shapes", split="pretrain")], batch_size=32)
        else:  # LAVIS's stage-1 optimizer: lr 1e-4 cosine to 1e-5, 5000 warmup steps, weight decay 0.05
            base.set_steps(c, total=250_000, warmup=5000)
            c.input.update(
                batch_size=1600, data_dir="data", sources=[dict(name="llava/pretrain", split="train")]
            )
            c.optim.update(lr=1e-4, min_lr_ratio=0.1, weight_decay=0.05, b2=0.999)
    elif name == "mg_llava":  # MG-LLaVA's stage 1: projector, fusion and box projector at lr 1e-3, batch 256
        base.set_steps(c, total=2180, warmup=65)  # 3% warmup
        c.input.batch_size = 256
        c.input.data_dir = "data"
        c.input.sources = [dict(name="llava/pretrain", split="train")]
        c.input.detections = "data/llava_pretrain_boxes.json"
        c.optim.lr = 1e-3
        c.trainable = base.regex_dict({"projector/.*": 1.0, **base.MG_LLAVA_PARTS})
        c.checkpoint.every_steps = 500
    else:  # LLaVA-Pretrain 558K: python -m data_pipelines.build --dataset llava --config pretrain
        base.set_steps(c, total=2180, warmup=65)  # one epoch at batch 256
        c.input.batch_size = 256
        c.input.data_dir = "data"
        c.input.sources = [dict(name="llava/pretrain", split="train")]
        c.optim.lr = 1e-3
        c.model.projector.init_from_bert = "checkpoints/bert-small"  # as the release (prajjwal1/bert-small)
        c.trainable = base.regex_dict({"projector/.*": 1.0})
        c.checkpoint.every_steps = 500
    return c
