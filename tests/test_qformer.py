"""The BLIP-2 Q-Former: parity with transformers' ``Blip2ForImageTextRetrieval`` (query pass, ITC
features and scores, ITM logits on padded text), ITG logits against HF's encoder layers run under the
LAVIS generation mask with a plain-torch LAVIS LM head, the stage-2 face against
``Blip2ForConditionalGeneration``, and the loader's layouts and errors. Tiny random models, float32:
every weight perturbed (LayerNorms included) so that no term hides behind an init value."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from safetensors.numpy import load_file, save_file

from pargo_jax.convert.hf import read_hf_config
from pargo_jax.convert.hf_blip2 import load_qformer, qformer_config_from_hf
from pargo_jax.convert.tables import ConversionError
from pargo_jax.models.projectors import projector_config, projector_module
from pargo_jax.models.projectors.blip2 import QFormer
from pargo_jax.param_tree import flatten, unflatten

ATOL = 1e-5  # float32 on both sides; hidden states (post-LN, ~unit scale) and logits
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, image_size=28,
              patch_size=14, layer_norm_eps=1e-5)  # fmt: skip
QFORMER = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=4, intermediate_size=128,
               cross_attention_frequency=2, vocab_size=120, max_position_embeddings=32)  # fmt: skip
OPT = dict(hidden_size=40, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
           max_position_embeddings=64, word_embed_proj_dim=40)  # fmt: skip
IDS = np.array([[101, 7, 9, 11, 13, 17], [101, 5, 3, 0, 0, 0]], np.int32) % 120
TEXT_MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], np.int32)


def _perturb(model: torch.nn.Module) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.1)


def _hf_dir(tmp_path_factory, name: str, retrieval: bool):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    qformer = {**QFORMER, "use_qformer_text_input": retrieval}
    text = {"model_type": "opt", **OPT}
    config = Blip2Config(vision_config=VISION, qformer_config=qformer, text_config=text, num_query_tokens=8,
                         image_text_hidden_size=32)  # fmt: skip
    config._attn_implementation = "eager"
    model = (Blip2ForImageTextRetrieval if retrieval else Blip2ForConditionalGeneration)(config).eval()
    _perturb(model)
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path)
    return model, path


def _ours(path: str):
    """(module, params): our Q-Former of the directory's config, the checkpoint loaded over a random
    init whose LM head (never in HF) is perturbed too."""
    cfg = qformer_config_from_hf(read_hf_config(path))
    module = QFormer(cfg)
    init = nn.unbox(module.init(jax.random.key(0), jnp.zeros((1, 5, cfg.vision_width))))["params"]
    rng = np.random.default_rng(1)
    params = {
        k: np.asarray(v) + 0.1 * rng.standard_normal(v.shape, np.float32) for k, v in flatten(init).items()
    }
    params.update(load_qformer(path, cfg, init))
    return module, unflatten(params)


@pytest.fixture(scope="module")
def itr(tmp_path_factory):
    model, path = _hf_dir(tmp_path_factory, "blip2_itr", retrieval=True)
    module, params = _ours(path)
    # Image features: the tower's encoder output for random pixels (HF's ln_vision = post_layernorm).
    feats = {}
    hook = model.vision_model.encoder.register_forward_hook(
        lambda m, i, o: feats.update(x=o.last_hidden_state)
    )
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        itc = model(
            pixel_values=pixels,
            input_ids=torch.from_numpy(IDS).long(),
            attention_mask=torch.from_numpy(TEXT_MASK).long(),
            use_image_text_matching_head=False,
        )
        itm = model(
            pixel_values=pixels,
            input_ids=torch.from_numpy(IDS).long(),
            attention_mask=torch.from_numpy(TEXT_MASK).long(),
            use_image_text_matching_head=True,
        )
    hook.remove()  # fmt: skip
    return SimpleNamespace(model=model, path=path, module=module, params=params, feats=feats["x"], itc=itc,
                           itm=itm, pixels=pixels)  # fmt: skip


def _apply(module, params, method, *args):
    return np.asarray(jax.jit(lambda p, *a: module.apply({"params": p}, *a, method=method))(params, *args))


def test_query_pass_matches_hf(itr):
    model, module, params, feats = itr.model, itr.module, itr.params, itr.feats
    with torch.no_grad():
        image = model.vision_model.post_layernorm(feats)
        want = model.qformer(query_embeds=model.query_tokens.expand(2, -1, -1), encoder_hidden_states=image)
    got = _apply(module, params, QFormer.encode_image, feats.numpy())
    assert got.shape == (2, 8, 64)
    np.testing.assert_allclose(got, want.last_hidden_state.numpy(), rtol=0, atol=ATOL)


def test_itc_features_and_scores_match_hf(itr):
    module, params, feats, itc = itr.module, itr.params, itr.feats, itr.itc
    z = _apply(module, params, QFormer.encode_image, feats.numpy())
    img = _apply(module, params, QFormer.image_feats, z)
    txt = _apply(
        module, params, QFormer.text_feat, _apply(module, params, QFormer.encode_text, IDS, TEXT_MASK)
    )
    img, txt = (
        img / np.linalg.norm(img, axis=-1, keepdims=True),
        txt / np.linalg.norm(txt, axis=-1, keepdims=True),
    )
    np.testing.assert_allclose(img, itc.image_embeds.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(txt, itc.text_embeds.numpy(), rtol=0, atol=ATOL)
    scores = np.einsum("iqe,te->iqt", img, txt).max(1)  # the best query per pair
    np.testing.assert_allclose(scores, itc.logits_per_image.numpy(), rtol=0, atol=ATOL)
    assert float(module.apply({"params": params}, method=QFormer.temperature)) == pytest.approx(
        float(params["temp"])
    )


def test_itm_logits_match_hf_on_padded_text(itr):
    module, params, feats, itm = itr.module, itr.params, itr.feats, itr.itm
    h = _apply(module, params, QFormer.encode_pairs, feats.numpy(), IDS, TEXT_MASK)
    assert h.shape == (2, 8 + IDS.shape[1], 64)
    got = _apply(module, params, QFormer.itm_logits, h)
    np.testing.assert_allclose(got, itm.logits_per_image.numpy(), rtol=0, atol=ATOL)


def test_itg_logits_match_lavis_mask_and_lm_head(itr):
    """HF's encoder layers under the LAVIS generation mask (built here: queries -> queries; text ->
    every query and the real text tokens <= itself) and LAVIS's ``BertLMHeadModel.cls.predictions``
    in plain torch (dense, exact GELU, LayerNorm, tied word embeddings + bias) with our LM-head weights."""
    model, module, params, feats = itr.model, itr.module, itr.params, itr.feats
    q, (b, t) = 8, IDS.shape
    allowed = torch.zeros(b, q + t, q + t, dtype=torch.bool)
    allowed[:, :, :q] = True
    allowed[:, q:, q:] = (
        torch.tril(torch.ones(t, t, dtype=torch.bool)) & torch.from_numpy(TEXT_MASK).bool()[:, None]
    )
    additive = torch.where(allowed, 0.0, -10000.0)[:, None]  # LAVIS's extended mask
    lm = {k: torch.from_numpy(np.asarray(params[k])) for k in
          ("lm_dense_kernel", "lm_dense_bias", "lm_norm_scale", "lm_norm_bias", "lm_bias")}  # fmt: skip
    with torch.no_grad():
        image = model.vision_model.post_layernorm(feats)
        x = model.embeddings(
            input_ids=torch.from_numpy(IDS).long(), query_embeds=model.query_tokens.expand(b, -1, -1)
        )
        x = model.qformer.layernorm(x)
        h = model.qformer.encoder(x, attention_mask=additive, encoder_hidden_states=image, query_length=q)
        y = torch.nn.functional.gelu(h.last_hidden_state[:, q:] @ lm["lm_dense_kernel"] + lm["lm_dense_bias"])
        y = torch.nn.functional.layer_norm(y, (64,), lm["lm_norm_scale"], lm["lm_norm_bias"], eps=1e-12)
        want = y @ model.embeddings.word_embeddings.weight.T + lm["lm_bias"]
    got = _apply(module, params, QFormer.text_logits, feats.numpy(), IDS, TEXT_MASK)
    assert got.shape == (b, t, 120)
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=ATOL)


def test_vision_tower_matches_hf_before_post_layernorm(itr):
    """BLIP-2's EVA-CLIP tower (kind ``blip2``: fused qkv with q/v biases) through ``load_vision``:
    the encoder output HF feeds its ``post_layernorm`` (our Q-Former's ``ln_vision``)."""
    from pargo_jax.convert.hf_vision import load_vision

    tower, variables = load_vision(itr.path)
    assert tower.config.kind == "blip2" and not tower.config.apply_final_norm
    got = np.asarray(jax.jit(tower.apply)(variables, itr.pixels.permute(0, 2, 3, 1).numpy()))
    np.testing.assert_allclose(got, itr.feats.numpy(), rtol=0, atol=ATOL)


def test_retrieval_checkpoint_fills_all_but_the_lm_head_and_temp(itr):
    path, module = itr.path, itr.module
    cfg = module.config
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 5, cfg.vision_width)))["params"]
    loaded = load_qformer(path, cfg, shapes)
    left = set(flatten(nn.unbox(shapes))) - set(loaded)
    assert left == {"lm_dense_kernel", "lm_dense_bias", "lm_norm_scale", "lm_norm_bias", "lm_bias", "temp",
                    "llm_proj_kernel", "llm_proj_bias"}  # fmt: skip


def test_generation_checkpoint_leaves_the_text_branch_at_init(tmp_path_factory, caplog):
    """``Blip2ForConditionalGeneration`` (no text branch, with language_projection): the projector
    face equals HF's language_projection(qformer(...)); the text branch is named in the log."""
    model, path = _hf_dir(tmp_path_factory, "blip2_opt", retrieval=False)
    caplog.set_level(logging.INFO, logger="absl")
    module, params = _ours(path)
    assert "layer_*/text_fc1_kernel" in caplog.text and "word_embeddings" in caplog.text
    feats = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        image = model.vision_model.post_layernorm(feats)
        z = model.qformer(query_embeds=model.query_tokens.expand(2, -1, -1), encoder_hidden_states=image)
        want = model.language_projection(z.last_hidden_state)
    got = np.asarray(jax.jit(module.apply)({"params": params}, feats.numpy()))
    assert got.shape == (2, 8, 40)
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=ATOL)


def _edited(path: str, dest, edit) -> str:
    tensors = load_file(os.path.join(path, "model.safetensors"))
    edit(tensors)
    dest.mkdir()
    save_file(tensors, str(dest / "model.safetensors"))
    (dest / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    return str(dest)


def test_loader_errors(itr, tmp_path):
    path, module, params = itr.path, itr.module, itr.params
    cfg, shapes = module.config, {k: v.shape for k, v in flatten(params).items()}
    name = "qformer.encoder.layer.1.intermediate.dense.weight"
    with pytest.raises(ConversionError, match="Cannot load the BLIP-2 checkpoint") as e:
        load_qformer(_edited(path, tmp_path / "missing", lambda t: t.pop(name)), cfg, shapes)
    assert f"1 tensor(s) missing: {name}" in str(e.value)
    extra = lambda t: t.update({"qformer.pooler.weight": np.ones((2, 2), np.float32)})
    with pytest.raises(ConversionError, match="unused tensor.*qformer.pooler.weight"):
        load_qformer(_edited(path, tmp_path / "extra", extra), cfg, shapes)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="Not a BLIP-2 checkpoint: model_type is 'bert'"):
        load_qformer(str(bert), cfg, shapes)


def test_text_longer_than_the_position_table(itr):
    module, params = itr.module, itr.params
    ids = np.zeros((1, 33), np.int32)
    with pytest.raises(ValueError, match="The text has 33 tokens but the Q-Former has max_positions=32"):
        module.apply({"params": params}, ids, np.ones_like(ids), method=QFormer.encode_text)


def test_registered_projector_face_and_flops():
    """``"blip2"`` builds from the registry; its init is the complete tree; the closed-form FLOPs
    are at most XLA's count of the face and within 30% of it."""
    options = dict(num_queries=4, hidden=32, heads=2, layers=2, mlp_dim=64, vision_width=24, llm_width=20,
                   vocab_size=50, max_positions=16, embed_dim=8)  # fmt: skip
    module = projector_module(projector_config("blip2", options))
    x = jnp.ones((1, 16, 24))
    params = module.init(jax.random.key(0), x)["params"]
    assert {"layer_1/text_fc1_kernel", "lm_bias", "temp", "itm_head_kernel"} <= set(flatten(params))
    analysis = jax.jit(module.apply).lower({"params": params}, x).compile().cost_analysis()
    xla = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
    assert 0.7 * xla <= module.config.flops(16) <= 1.01 * xla, (module.config.flops(16), xla)
    assert module.config.num_tokens(16) == 4
    with pytest.raises(ValueError, match="hidden=30 is not divisible by heads=4"):
        projector_config("blip2", {**options, "hidden": 30, "heads": 4})
