"""Shared pieces of the experiment files: one base ConfigDict and the model presets.

Every field is documented in docs/guide/training.md's "Config reference". Presets: ``demo`` (tiny
random tower and LLM on the synthetic shapes set, CPU, minutes), ``paper`` (EVA02-CLIP-L/336 +
InternLM2-7B with 288 + 16 ParGo tokens, as released), ``siglip_qwen2`` (SigLIP-so400m/384 +
Qwen2.5-7B-Instruct).
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from data_pipelines.frame import CLIP_MEAN, CLIP_STD
from pargo_jax.configs import ConfigError

PRESETS = ("demo", "paper", "siglip_qwen2", "mg_llava", "mg_llava_demo", "xformer", "blip2", "xformer_demo",
           "blip2_demo")  # fmt: skip
DEMOS = ("demo", "mg_llava_demo")  # presets on the synthetic shapes set (their stages train the LLM too)
# Q-Former presets: stage 1 trains the Q-Former with BLIP-2's objectives (and X-Former's reconstruction),
# stage 2 the projector with the LM loss
QFORMER_DEMOS = ("xformer_demo", "blip2_demo")
QFORMERS = ("xformer", "blip2", *QFORMER_DEMOS)
# MG-LLaVA's parts trained with the projector (its ConvNeXt stays frozen)
MG_LLAVA_PARTS = {"fusion/.*": 1.0, "box_projector/.*": 1.0}


def regex_dict(d: dict[str, float]) -> ml_collections.ConfigDict:
    """A ConfigDict keyed by regexes (dots allowed), e.g. ``trainable``."""
    return ml_collections.ConfigDict(d, allow_dotted_keys=True)


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.log_every_steps = 50
    c.sample_at_end = ""  # split to answer one held-out example from when training ends ("" = off)
    c.max_nonfinite_steps = 5  # consecutive non-finite losses that stop the run (checked at log steps)
    c.loss_chunk = 0  # positions per cross-entropy block, never holding the (B, T, V) logits (0: all)
    c.model = ml_collections.ConfigDict()
    c.model.dtype = "float32"  # compute dtype of tower, projector and LLM ("bfloat16" on accelerators)
    c.model.frozen_dtype = "float32"  # storage of params that get no gradient (real presets: bfloat16)
    c.model.vision = dict(path=placeholder(str), format="hf", preset="tiny", overrides={})
    c.model.projector = dict(name="pargo")
    c.model.llm = dict(path=placeholder(str), config={}, overrides={})
    c.input = dict(
        sources=[], data_dir=placeholder(str), tokenizer=placeholder(str), batch_size=16, image_size=336,
        resize="letterbox", max_len=512, overlong="truncate", num_workers=0, prefetch=2, strict=False,
        mean=CLIP_MEAN, std=CLIP_STD, detections="", jpeg_draft=False,
        max_images=1, packing=False, max_images_per_row=4,  # several images per sample; packed rows
    )  # fmt: skip
    c.shapes = None  # dict(...) of data_pipelines.shapes.build arguments: build the demo set on first run
    c.multiscale = None  # dict(...) of data_pipelines.multiscale.ensure_shapes: the grounding demo's records
    c.demo_tower = None  # dict(...) of pargo_jax.demo_tower.build options: build model.vision.path if missing
    c.demo_mae = None  # dict(...) of pargo_jax.demo_mae.build options: build model.detail.path if missing
    c.optim = dict(
        lr=1e-3, warmup_steps=30, schedule="cosine", min_lr_ratio=0.0,
        weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0, grad_accum_steps=1,
    )  # fmt: skip
    # Regex over param paths -> LR multiplier; params matching none are frozen.
    c.trainable = regex_dict({"projector/.*": 1.0})
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.checkpoint = dict(every_steps=500, keep=3, init_from=placeholder(str), init_from_parts=("projector",))
    c.evals = {}  # {name: dict(type=..., data=..., log_steps=...)}: see pargo_jax/evaluators
    # How boxes are written as text in the run's data and answers (data_pipelines.boxes.BoxCodec): every
    # input source that declares a codec (box_codec.json) must use it; the evaluators read answers with it
    c.box_codec = dict(format="norm3", frame="square")
    # "lm": the LLM's next-token loss; "qformer": BLIP-2 / X-Former stage 1, each part weighted (itc, itm,
    # itg, recon; default 1): dict(name="qformer", recon=0.0) is X-Former without reconstruction
    c.objective = dict(name="lm")
    return c


def demo_model(c: ml_collections.ConfigDict) -> None:
    """Tiny SigLIP-style tower (64 px, 8x8 patches; pretrained on first run by
    ``pargo_jax.demo_tower``, then tuned at 0.3x the LR), ParGo 16 + 4 tokens, a random 4-layer
    Llama of width 128 (with 2 layers held-out shape questions stayed at 0.68, with 4 they reach 0.98).

    Real towers come pretrained; a random tiny ViT trained only through the LM loss never learned to
    see shape (held-out shape answers stayed at chance), so ``demo_tower`` stands in for the tower's
    pretraining (2000 steps of per-token colour and shape classification, about a minute on 2 cores)
    and writes it as a HF SigLIP directory. ParGo's kernels are fan-in scaled (``init="fan_in"``: with BERT's
    N(0, 0.02) at width 64 its tokens start 0.6% image-dependent and the LLM learns to ignore them);
    ``max_len=128`` holds a whole 3-turn conversation (at 64, grounding answers were always cut)."""
    c.model.vision = dict(path="workdir/demo_tower", format="hf", preset="tiny", overrides={})
    # pargo_jax.demo_tower.build's options; built when model.vision.path is missing
    c.demo_tower = dict(steps=2000, batch_size=32, lr=3e-3, seed=0, variant="basic", image_size=64,
                        object_weight=4.0)  # fmt: skip
    c.model.projector = dict(
        name="pargo", num_partial=16, num_global=4, hidden=64, heads=4, layers=2, mlp_dim=128,
        layout="grid", max_positions=64, init="fan_in",
    )  # fmt: skip
    c.model.llm = dict(
        path=placeholder(str),
        config=dict(hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                    head_dim=32, max_position_embeddings=256, tie_word_embeddings=True),
        overrides={},
    )  # fmt: skip
    c.shapes = dict(image_size=64, num_pretrain=10000, num_sft=10000, num_eval=500, num_val=200)
    c.input.update(
        image_size=64, max_len=128, batch_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, resize="squash"
    )
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.sample_at_end = "eval"


def paper_model(c: ml_collections.ConfigDict) -> None:
    """EVA02-CLIP-L/14-336 (last block, CLS dropped, no final norm) -> ParGo 288 + 16 (BERT-small width)
    -> InternLM2-7B, as in the official release."""
    c.model.dtype = "bfloat16"
    c.model.frozen_dtype = "bfloat16"  # the frozen tower / LLM: half the memory, trained parts stay float32
    c.model.vision = dict(
        path="checkpoints/EVA02_CLIP_L_336_psz14_s6B.pt", format="eva02", preset="eva02-L/14-336",
        overrides=dict(drop_cls=True, final_norm=False),
    )  # fmt: skip
    c.model.projector = dict(
        name="pargo",
        num_partial=288,
        num_global=16,
        hidden=512,
        heads=8,
        layers=4,
        mlp_dim=2048,
        max_positions=512,  # BERT's position table, as released
    )
    # InternLM2's fused wqkv kept fused: the release's LoRA is one adapter on it. Full remat: without it
    # one example's saved activations are ~1.6 GB per layer (python -m pargo_jax.benchmarks.memory).
    c.model.llm = dict(
        path="checkpoints/internlm2-7b", config={},
        overrides=dict(scan_layers=True, fused_qkv=True, remat_policy="full"),
    )  # fmt: skip
    c.input.update(image_size=336, resize="letterbox", mean=CLIP_MEAN, std=CLIP_STD, max_len=1024)
    c.input.tokenizer = "checkpoints/internlm2-7b"
    c.mesh = dict(data=1, fsdp=-1, tensor=1)


def siglip_qwen2_model(c: ml_collections.ConfigDict) -> None:
    """SigLIP-so400m/14-384 (penultimate layer) -> ParGo 288 + 16 -> Qwen2.5-7B-Instruct."""
    c.model.dtype = "bfloat16"
    c.model.frozen_dtype = "bfloat16"  # the frozen tower / LLM: half the memory, trained parts stay float32
    c.model.vision = dict(
        path="checkpoints/siglip-so400m-patch14-384", format="hf", preset="so400m-384",
        overrides=dict(feature_layer=-2, drop_cls=False),  # drop_cls=True for a CLIP tower here
    )  # fmt: skip
    c.model.projector = dict(
        name="pargo",
        num_partial=243,
        num_global=16,
        hidden=512,
        heads=8,
        layers=4,
        mlp_dim=2048,
        layout="grid",
        max_positions=512,
    )  # fmt: skip  (27 x 27 patches: 243 windows of 1 x 3)
    c.model.llm = dict(
        path="checkpoints/Qwen2.5-7B-Instruct",
        config={},
        overrides=dict(scan_layers=True, remat_policy="full"),
    )
    c.input.update(image_size=384, resize="letterbox", mean=(0.5,) * 3, std=(0.5,) * 3, max_len=1024)
    c.input.tokenizer = "checkpoints/Qwen2.5-7B-Instruct"
    c.mesh = dict(data=1, fsdp=-1, tensor=1)


def tinygroundinggpt_model(c: ml_collections.ConfigDict) -> None:
    """TinyGroundingGPT (arXiv 2411.09691): CLIP-L/14-336 (penultimate layer, CLS dropped, as LLaVA-1.5)
    -> LLaVA-1.5's two-layer MLP -> a ~3B LLM (Qwen2.5-3B-Instruct here); boxes as GroundingGPT's text."""
    c.model.dtype = "bfloat16"
    c.model.frozen_dtype = "bfloat16"
    c.model.vision = dict(
        path="checkpoints/clip-vit-large-patch14-336", format="hf", preset="tiny",
        overrides=dict(feature_layer=-2, drop_cls=True),
    )  # fmt: skip
    c.model.projector = dict(name="mlp")
    c.model.llm = dict(
        path="checkpoints/Qwen2.5-3B-Instruct",
        config={},
        overrides=dict(scan_layers=True, remat_policy="full"),
    )
    c.input.update(image_size=336, resize="letterbox", mean=CLIP_MEAN, std=CLIP_STD, max_len=2048)
    c.input.tokenizer = "checkpoints/Qwen2.5-3B-Instruct"  # with <image>: python -m data_pipelines.text
    c.mesh = dict(data=-1, fsdp=1, tensor=1)


def mg_llava_model(c: ml_collections.ConfigDict) -> None:
    """MG-LLaVA (PhoenixZ810/MG-LLaVA): CLIP-L/14-336 (penultimate layer, CLS dropped) sees the 768 px
    image downsampled to 336; ConvNeXt-L (OpenCLIP ``convnext_large_d_320``) sees it at 768; its last
    stage is fused into CLIP's 24 x 24 tokens by the Conv-Gate; an MLP projector (xtuner's, depth 2)
    maps them to Vicuna-7B; object tokens from up to ``max_boxes`` detector boxes (RoIAlign 56 x 56
    over the 4 ConvNeXt stages upsampled to 192, averaged, Linear-GELU-Linear) follow the image tokens."""
    c.model.dtype = "bfloat16"
    c.model.frozen_dtype = "bfloat16"  # the frozen tower / LLM: half the memory, trained parts stay float32
    c.model.vision = dict(
        path="checkpoints/clip-vit-large-patch14-336", format="hf", preset="clip-L/14-336",
        overrides=dict(feature_layer=-2, drop_cls=True),
    )  # fmt: skip
    c.model.high_res = dict(
        path="checkpoints/CLIP-convnext_large_d_320/open_clip_pytorch_model.bin", image_size=768,
        fusion=dict(mode="gate_sum"), max_boxes=100, roi_output=56, roi_grid=192,
    )  # fmt: skip
    c.model.projector = dict(name="mlp")
    c.model.llm = dict(path="checkpoints/vicuna-7b-v1.5", config={}, overrides=dict(remat_policy="full"))
    c.input.update(image_size=768, resize="letterbox", mean=CLIP_MEAN, std=CLIP_STD, max_len=2048)
    c.input.tokenizer = "checkpoints/vicuna-7b-v1.5"
    c.mesh = dict(data=1, fsdp=-1, tensor=1)


def mg_llava_demo_model(c: ml_collections.ConfigDict) -> None:
    """MG-LLaVA's shape on the shapes set: the demo (tower, ParGo, LLM) plus a tiny ConvNeXt at 256 px
    (its 8 x 8 last stage matches the demo tower's grid), the Conv-Gate, and object tokens from the
    records' own boxes (up to 4, RoIAlign 7 x 7 over a 64 grid)."""
    demo_model(c)
    c.model.high_res = dict(
        preset="tiny_test",
        image_size=256,
        fusion=dict(mode="gate_sum"),
        max_boxes=4,
        roi_output=7,
        roi_grid=64,
    )
    c.input.update(image_size=256, max_len=144)  # 4 more image tokens than the demo


def qformer_demo_model(c: ml_collections.ConfigDict, *, mae: bool) -> None:
    """BLIP-2's Q-Former (``blip2_demo``) or X-Former (``xformer_demo``) on the shapes set: the demo tower
    as the contrastive tower, 32 queries (BERT-like, width 64, 2 layers, both cross-attending), the
    demo LLM; X-Former adds a small MAE pretrained on shapes scenes on first run
    (``pargo_jax.demo_mae``, into ``workdir/demo_mae``) and one round of dual cross-attention. The
    Q-Former reads the captions with the shapes words (``<s> ... </s>`` and ``[DEC]``, written beside
    the data on first run)."""
    demo_model(c)
    c.model.projector = dict(
        name="xformer" if mae else "blip2", num_queries=32, hidden=64, heads=4, layers=2, mlp_dim=128,
        cross_attention_freq=1, max_positions=32, embed_dim=32, **(dict(fusion_layers=1) if mae else {}),
    )  # fmt: skip
    if mae:
        c.model.detail = dict(path="workdir/demo_mae", mask_ratio=0.5)
        # pargo_jax.demo_mae.build's options; built when model.detail.path is missing (~70 s)
        c.demo_mae = dict(steps=2000, batch_size=32, lr=2e-3, seed=0, mask_ratio=0.5, image_size=64)
    c.input.update(max_len=140, qformer_max_len=32)  # 12 more image tokens than the demo's 20


def xformer_model(c: ml_collections.ConfigDict, *, mae: bool = True) -> None:
    """X-Former (``xformer``; ECCV 2024): BLIP-2's EVA-CLIP ViT-g/14 (its HF BLIP-2 directory's tower,
    the output before ``post_layernorm``, which is the Q-Former's ``ln_vision``), MAE ViT-H/14 (HF
    ``facebook/vit-mae-huge``), a BERT-base Q-Former with 32 queries cross-attending every 2nd layer and
    one round of dual cross-attention, OPT-2.7B; 224 px. ``blip2``: the same without the MAE. The
    Q-Former starts from ``init_from_blip2`` where given (else random: BLIP-2 starts it from BERT-base,
    not built here)."""
    c.model.dtype = "bfloat16"
    c.model.frozen_dtype = "bfloat16"
    c.model.vision = dict(path="checkpoints/blip2-opt-2.7b", format="hf", preset="tiny", overrides={})
    c.model.projector = dict(name="xformer" if mae else "blip2")
    if mae:
        c.model.detail = dict(path="checkpoints/vit-mae-huge", mask_ratio=0.5)
    c.model.llm = dict(path="checkpoints/opt-2.7b", config={}, overrides=dict(remat_policy="full"))
    c.input.update(
        image_size=224, resize="squash", mean=CLIP_MEAN, std=CLIP_STD, max_len=256, qformer_max_len=32
    )
    c.input.tokenizer = "checkpoints/opt-2.7b"  # with a chat template: python -m data_pipelines.text prepare
    c.input.qformer_tokenizer = "checkpoints/bert-base-uncased-dec"  # prepare_qformer_tokenizer: + [DEC]
    c.mesh = dict(data=-1, fsdp=1, tensor=1)


MODELS = {
    "demo": demo_model, "paper": paper_model, "siglip_qwen2": siglip_qwen2_model, "mg_llava": mg_llava_model,
    "mg_llava_demo": mg_llava_demo_model, "xformer": xformer_model,
    "blip2": lambda c: xformer_model(c, mae=False), "xformer_demo": lambda c: qformer_demo_model(c, mae=True),
    "blip2_demo": lambda c: qformer_demo_model(c, mae=False),
}  # fmt: skip


def preset(arg: str | None) -> tuple[str, ml_collections.ConfigDict]:
    name = arg or "demo"
    if name not in MODELS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    c = base()
    MODELS[name](c)
    return name, c


def set_steps(c: ml_collections.ConfigDict, total: int, warmup: int) -> None:
    """``total_steps`` is the one source of the run length: the LR schedule ends there too."""
    c.total_steps = total
    c.optim.warmup_steps = warmup
