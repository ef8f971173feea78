"""X-Former and BLIP-2 stage 1 in the one model: the four losses, that they fall when the Q-Former
(and the fusion) train, that reconstruction reaches the Q-Former through the fusion, and the stage-2
face (the MAE reads the whole image). The parts are checked against their references elsewhere:
test_qformer (transformers' BLIP-2), test_blip2_objectives (LAVIS), test_dual_cross, test_mae."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from pargo_jax.models.llm import LLMConfig
from pargo_jax.models.mae import MAEConfig
from pargo_jax.models.mllm import DetailConfig, MLLMConfig, VisionLanguageModel
from pargo_jax.models.projectors import QFormerConfig, XFormerConfig
from pargo_jax.models.vision import vision_preset

VOCAB, DEC, IMAGE_TOKEN = 40, 39, 3
QFORMER = dict(num_queries=4, hidden=32, heads=4, layers=2, mlp_dim=64, cross_attention_freq=2,
               vision_width=32, llm_width=16, vocab_size=VOCAB, max_positions=16, embed_dim=16)  # fmt: skip


def _config(xformer: bool) -> MLLMConfig:
    detail = None
    if xformer:
        mae = MAEConfig(image_size=32, patch_size=8, width=24, depth=1, heads=4, mlp_dim=48, decoder_width=16,
                        decoder_depth=1, decoder_heads=4, decoder_mlp_dim=32, mask_ratio=0.5)  # fmt: skip
        detail = DetailConfig(mae=mae)
    projector = (XFormerConfig(**QFORMER, detail_width=24, decoder_width=16) if xformer
                 else QFormerConfig(**QFORMER))  # fmt: skip
    llm = LLMConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=8)  # fmt: skip
    return MLLMConfig(vision=vision_preset("tiny"), projector=projector, llm=llm, image_token_id=IMAGE_TOKEN,
                      detail=detail)  # fmt: skip


def _batch(b: int = 8, t: int = 6):
    """Images whose colour the caption names (ids 10 + colour)."""
    rng = np.random.default_rng(0)
    colours = np.arange(b) % 4
    images = rng.normal(size=(b, 32, 32, 3)).astype(np.float32) * 0.1 + colours[:, None, None, None] - 1.5
    ids = np.full((b, t), 0, np.int32)
    ids[:, 0], ids[:, 1], ids[:, 2], ids[:, 3] = (
        1,
        10 + colours,
        20 + rng.integers(0, 4, b),
        2,
    )  # [CLS] c x [SEP]
    mask = (np.arange(t)[None] < 4).astype(np.int32).repeat(b, 0)
    return jnp.asarray(images), jnp.asarray(ids), jnp.asarray(mask)


def _init(model, images):
    ids = jnp.full((images.shape[0], 6), IMAGE_TOKEN, jnp.int32)
    return nn.unbox(jax.jit(model.init)(jax.random.key(0), images, ids, jnp.ones_like(ids))["params"])


@pytest.mark.parametrize(
    "xformer", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["blip2", "xformer"]
)
def test_stage1_losses_fall_while_the_projector_trains(xformer):
    """30 Adam steps on the projector alone (towers and LLM frozen, as stage 1 trains) lower the sum
    of the loss parts, ITC and ITG each; every part starts finite, ITM near chance (log 2). X-Former:
    the recon loss alone has gradients on the Q-Former's queries and cross-attention (M' reads Zq) and
    on the fusion, none on the ITC / ITM heads it never reads. (One compiled step serves all of it:
    compiling the passes is most of X-Former's ~20 s.)"""
    model = VisionLanguageModel(_config(xformer))
    images, ids, mask = _batch()
    params = _init(model, images)
    names = ("itc", "itm", "itg", "recon") if xformer else ("itc", "itm", "itg")
    tx = optax.adam(3e-3)

    @jax.jit
    def step(projector, opt, i, weights):
        def total(p):
            rngs = {
                n: jax.random.fold_in(jax.random.key(i), k)
                for k, n in enumerate(("dropout", "masking", "negatives"))
            }
            variables = {"params": {**params, "projector": p}}
            out = model.apply(variables, images, ids, mask, bos_id=DEC, rngs=rngs, method=model.stage1_losses)
            return sum(weights[k] * out[k] for k in names), out

        (_, out), grads = jax.value_and_grad(total, has_aux=True)(projector)
        updates, new_opt = tx.update(grads, opt, projector)
        return optax.apply_updates(projector, updates), new_opt, out, grads

    ones = {k: jnp.ones(()) for k in names}
    projector, opt = params["projector"], tx.init(params["projector"])
    if xformer:
        recon_only = {k: jnp.asarray(float(k == "recon")) for k in names}
        g = step(projector, opt, 0, recon_only)[3]
        norm = lambda tree: float(optax.tree.norm(tree))
        assert norm(g["qformer"]["query_tokens"]) > 0 and norm(g["qformer"]["layer_0"]["cross_kv_kernel"]) > 0
        assert norm(g["fusion"]["local_0"]) > 0 and norm(g["fusion"]["to_decoder"]) > 0
        assert norm(g["qformer"]["text_proj_kernel"]) == 0 and norm(g["qformer"]["itm_head_kernel"]) == 0
    first = None
    for i in range(31):
        new, new_opt, out, _ = step(projector, opt, i % 2, ones)
        first = first or out
        projector, opt = new, new_opt
    assert set(first) == set(names) and all(np.isfinite(float(v)) for v in first.values())
    assert abs(float(first["itm"]) - np.log(2)) < 0.3  # a fresh 2-way head
    last = out  # the losses of the 31st step, before its update (same rng as step 0)
    assert sum(float(v) for v in last.values()) < 0.8 * sum(float(v) for v in first.values())
    assert float(last["itg"]) < float(first["itg"]) and float(last["itc"]) < float(first["itc"])


def test_stage2_face_reads_the_whole_image():
    """Stage 2 (the LLM's forward): no masking rng is needed, the MAE reads every patch, and the
    image tokens change when only the MAE's view of the image differs (the fused detail reaches
    the LLM)."""
    model = VisionLanguageModel(_config(True))
    images, _, _ = _batch(b=2)
    params = _init(model, images)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_images))
    tokens = encode(params, images)
    assert tokens.shape == (2, 4, 16)
    zeroed = {**params, "detail_tower": jax.tree.map(jnp.zeros_like, params["detail_tower"])}
    assert float(jnp.abs(encode(zeroed, images) - tokens).max()) > 1e-4


def test_xformer_without_its_mae_is_one_clear_error():
    config = _config(True)
    model = VisionLanguageModel(MLLMConfig(**{**config.__dict__, "detail": None}))
    images, _, _ = _batch(b=2)
    with pytest.raises(ValueError, match="X-Former fuses an MAE's tokens"):
        _init(model, images)


def test_stage1_config_errors(shapes_dir, tmp_path):
    """One clear line each: captions longer than the Q-Former's positions, the qformer objective
    without a Q-Former, a mask ratio outside (0, 1), an MAE without a projector that reads it."""
    from data_pipelines.text import load_tokenizer
    from experiments import pretrain
    from pargo_jax import prepare, runs, train
    from tests import demo

    def check(preset, overrides, match):
        c = demo.demo_config(shapes_dir, 1, stage=pretrain, preset=preset, **overrides)
        c.demo_mae = None
        prepare.prepare_data(c, str(tmp_path))
        with pytest.raises(ValueError, match=match):
            train.objective(c, runs.model_config(c, load_tokenizer(c.input.tokenizer)))

    check("blip2_demo", {"input.qformer_max_len": 40}, "has max_positions=32 position embeddings")
    check("demo", {"objective.name": "qformer"}, "trains a Q-Former: use projector blip2 or xformer")
    mae = {"model.detail": {"config": {"image_size": 64, "patch_size": 8, "width": 32}, "mask_ratio": 1.5}}
    check("xformer_demo", mae, r"mask_ratio must lie in \(0, 1\)")
    check("demo", {"model.detail": {"config": {"image_size": 64}}}, "needs a projector that reads it")
