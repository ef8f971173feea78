"""Packing several samples into one row changes nothing for any of them: a packed batch (``segment_ids``,
each row's images front-packed into (B, I, H, W, 3)) gives the loss sum, token count, gradients and,
at every sample's positions, the logits of its samples run one per row (float32, <= 1e-5) for a ParGo,
an MLP, an MG-LLaVA (object tokens, empty slots masked) and an OPT-style (learned positions) model;
and the packed train step sharded over 8 devices equals one device."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from pargo_jax import sharding, train
from pargo_jax.models import factory
from pargo_jax.models.convnext import CONVNEXT_PRESETS, ConvNeXtConfig
from pargo_jax.models.fusion import FusionConfig
from pargo_jax.models.llm import LLMConfig
from pargo_jax.models.mllm import HighResConfig, MLLMConfig, VisionLanguageModel, next_token_loss
from pargo_jax.models.projectors import MLPConfig, ParGoConfig
from pargo_jax.models.vision import vision_preset

IMAGE_ID, FIRST_TEXT_ID, VOCAB = 4, 5, 64
# (images, text tokens) of each sample: one text-only, one with two images, different lengths
SAMPLES = [(1, 7), (0, 9), (2, 6), (1, 5), (1, 10), (1, 4)]
ROWS = [[0, 1], [2, 3], [4], [5]]  # samples packed per row (4 rows: the 2 x 2 x 2 mesh's batch divisor)
TOL = 1e-5


def llm(**overrides) -> LLMConfig:
    return LLMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, max_position_embeddings=64, **overrides)  # fmt: skip


def model_config(name: str) -> MLLMConfig:
    vision = vision_preset("tiny", depth=1)  # 32 px / 8: 16 patches of width 32
    mlp = MLPConfig(vision_width=32, llm_width=32, group=4)  # 4 tokens per image
    if name == "pargo":
        pargo = ParGoConfig(num_partial=4, num_global=2, hidden=16, heads=2, layers=2, mlp_dim=32,
                            vision_width=32, llm_width=32, max_positions=16)  # fmt: skip
        return MLLMConfig(vision, pargo, llm(), IMAGE_ID)
    if name == "mlp":
        return MLLMConfig(vision, mlp, llm(), IMAGE_ID)
    if name == "opt":
        opt = llm(norm="layer", position_embedding="learned", position_offset=2, mlp="relu", bias=True,
                  qkv_bias=True, tie_word_embeddings=True, family="opt")  # fmt: skip
        return MLLMConfig(vision, mlp, opt, IMAGE_ID)
    assert name == "mg_llava"
    tower = ConvNeXtConfig(**CONVNEXT_PRESETS["tiny_test"])  # 64 px, last stage 2 x 2
    fusion = FusionConfig(16, tower.dims[-1], zero_init=False)
    high = HighResConfig(tower, fusion, max_boxes=3, roi_output=2, roi_grid=8)
    low = vision_preset("tiny", image_size=16, patch_size=8, width=16, depth=1, heads=2, mlp_dim=32)
    return MLLMConfig(low, MLPConfig(vision_width=16, llm_width=32), llm(), IMAGE_ID, high_res=high)


def make_samples(mcfg: MLLMConfig, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """:data:`SAMPLES` unpadded: ``input_ids`` with each image's ``num_image_tokens`` ids (MG-LLaVA: the
    last ``max_boxes`` of them object slots, those of absent boxes masked), ``targets``, ``loss_mask``
    (random text positions, never the last), ``attention_mask``, ``image`` (n, S, S, 3) uint8 and, with
    object tokens, ``boxes`` (n, max_boxes, 4)."""
    rng = np.random.RandomState(seed)
    size, n_tok = mcfg.image_size, mcfg.num_image_tokens
    boxes_per_image = mcfg.high_res.max_boxes if mcfg.high_res else 0
    out = []
    for n_images, text_len in SAMPLES:
        cuts = np.sort(rng.choice(np.arange(1, text_len), n_images, replace=False))  # starts with text
        chunks = np.split(rng.randint(FIRST_TEXT_ID, VOCAB, text_len), cuts)
        ids, real, boxes = [chunks[0]], [np.ones(len(chunks[0]), np.int32)], []
        for chunk in chunks[1:]:
            present = rng.randint(0, boxes_per_image + 1)  # boxes this image has (the rest: empty slots)
            slots = np.arange(boxes_per_image) < present
            ids += [np.full(n_tok, IMAGE_ID), chunk]
            real += [
                np.ones(n_tok - boxes_per_image, np.int32),
                slots.astype(np.int32),
                np.ones(len(chunk), np.int32),
            ]
            xy = rng.uniform(0, size / 2, (boxes_per_image, 2))
            boxes.append(
                np.where(slots[:, None], np.concatenate([xy, xy + rng.uniform(4, size / 2, xy.shape)], 1), 0)
            )
        ids = np.concatenate(ids).astype(np.int32)
        loss = (rng.rand(len(ids)) < 0.6) & (ids != IMAGE_ID)
        loss[0], loss[-1] = True, False
        sample = dict(
            input_ids=ids,
            targets=np.append(ids[1:], rng.randint(FIRST_TEXT_ID, VOCAB)).astype(np.int32),
            loss_mask=loss.astype(np.float32),
            attention_mask=np.concatenate(real),
            image=rng.randint(0, 256, (n_images, size, size, 3)).astype(np.uint8),
        )
        if boxes_per_image:
            sample["boxes"] = np.asarray(boxes, np.float32).reshape(n_images, boxes_per_image, 4)
        out.append(sample)
    return out


def pad(x: np.ndarray, length: int) -> np.ndarray:
    return np.pad(x, [(0, length - len(x))] + [(0, 0)] * (x.ndim - 1))


def unpacked_batch(samples: list[dict], size: int) -> dict[str, np.ndarray]:
    """One sample per row, right-padded; images (B, H, W, 3) as today when each sample has <= 1 (a
    text-only sample: black pixels, zero boxes), else (B, I, H, W, 3)."""
    length, most = max(len(s["input_ids"]) for s in samples), max(len(s["image"]) for s in samples)
    batch = {k: np.stack([pad(s[k], length) for s in samples]) for k in train.TEXT_KEYS}
    for k in ("image", "boxes"):
        if k in samples[0]:
            stacked = np.stack([pad(s[k], max(most, 1)) for s in samples])
            batch[k] = stacked[:, 0] if most <= 1 else stacked
    return batch


def packed_batch(samples: list[dict], rows: list[list[int]]) -> dict[str, np.ndarray]:
    """``rows`` of samples concatenated, numbered by ``segment_ids``, then padded; each row's images
    front-packed into (B, I, H, W, 3) with ``image_mask``."""
    cat = lambda k, row: np.concatenate([samples[i][k] for i in row])
    length = max(sum(len(samples[i]["input_ids"]) for i in row) for row in rows) + 2
    most = max(len(cat("image", row)) for row in rows)
    batch = {k: np.stack([pad(cat(k, row), length) for row in rows]) for k in train.TEXT_KEYS}
    segments = [
        np.concatenate([np.full(len(samples[i]["input_ids"]), k + 1) for k, i in enumerate(row)])
        for row in rows
    ]
    batch["segment_ids"] = np.stack([pad(s, length) for s in segments]).astype(np.int32)
    for k in ("image", "boxes"):
        if k in samples[0]:
            batch[k] = np.stack([pad(cat(k, row), most) for row in rows])
    batch["image_mask"] = np.stack([np.arange(most) < len(cat("image", row)) for row in rows]).astype(
        np.int32
    )
    return batch


def loss_fn(model: VisionLanguageModel, params, batch: dict):
    """(masked CE sum, (token count, logits)) of ``batch``."""
    logits = model.apply(
        {"params": params}, batch["image"], batch["input_ids"], batch["attention_mask"],
        boxes=batch.get("boxes"), segment_ids=batch.get("segment_ids"),
    )  # fmt: skip
    total, count = next_token_loss(logits, batch["targets"], batch["loss_mask"])
    return total, (count, logits)


@functools.cache
def setup(name: str):
    """(model, params, samples, unpacked batches, packed batch) of one model, shared by its tests."""
    mcfg = model_config(name)
    model = VisionLanguageModel(mcfg)
    samples = make_samples(mcfg)
    one = [i for i, s in enumerate(samples) if len(s["image"]) <= 1]
    groups = [one, [i for i in range(len(samples)) if i not in one]]
    unpacked = [(g, unpacked_batch([samples[i] for i in g], mcfg.image_size)) for g in groups]
    packed = packed_batch(samples, ROWS)
    b = unpacked[0][1]
    params = jax.jit(model.init)(jax.random.key(1), b["image"], b["input_ids"], b["attention_mask"],
                                 boxes=b.get("boxes"))["params"]  # fmt: skip
    rng = np.random.RandomState(2)  # every param away from its init (zero biases, zero-init layers)
    params = jax.tree.map(lambda x: x + 0.05 * rng.randn(*x.shape).astype(x.dtype), nn.unbox(params))
    return model, params, samples, unpacked, packed


def on_device(batch: dict) -> dict:
    """What the train step sends to the device: all but ``image_mask`` (the model never reads it)."""
    return {k: v for k, v in batch.items() if k != "image_mask"}


@functools.cache
def unpacked_reference(name: str):
    """(loss sum, token count, summed grads, {sample: logits}) of the samples run one per row."""
    model, params, _, unpacked, _ = setup(name)
    grad = jax.jit(jax.value_and_grad(functools.partial(loss_fn, model), has_aux=True))
    total, count, grads, logits = 0.0, 0.0, None, {}
    for group, batch in unpacked:
        (t, (c, lg)), g = grad(params, on_device(batch))
        total, count = total + t, count + c
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        logits.update({i: np.asarray(lg[r]) for r, i in enumerate(group)})
    return total, count, grads, logits


def assert_grads_close(got, want, scale: float = 1.0) -> None:
    """Leaf by leaf, <= TOL relative to the leaf's largest entry (absolute below 1)."""
    for (path, w), g in zip(jax.tree.leaves_with_path(want), jax.tree.leaves(got), strict=True):
        atol = TOL * scale * max(1.0, float(jnp.abs(w).max()))
        np.testing.assert_allclose(g, w, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


# mg_llava: its ConvNeXt path compiled twice (packed, then per sample), ~30 s cold on 2 cores
@pytest.mark.parametrize("name", ["pargo", "mlp", pytest.param("mg_llava", marks=pytest.mark.slow), "opt"])
def test_packed_rows_equal_their_samples_unpacked(name):
    model, params, samples, _, packed = setup(name)
    total, count, grads, logits = unpacked_reference(name)
    grad = jax.jit(jax.value_and_grad(functools.partial(loss_fn, model), has_aux=True))
    (p_total, (p_count, p_logits)), p_grads = grad(params, on_device(packed))
    assert p_count == count == sum(s["loss_mask"].sum() for s in samples)
    np.testing.assert_allclose(p_total, total, rtol=TOL)
    for r, members in enumerate(ROWS):
        start = 0
        for k, i in enumerate(members):
            n = len(samples[i]["input_ids"])
            assert (packed["segment_ids"][r, start : start + n] == k + 1).all()
            np.testing.assert_allclose(p_logits[r, start : start + n], logits[i][:n], atol=TOL, rtol=0)
            start += n
    assert_grads_close(p_grads, grads)


def test_packed_train_step_sharded_equals_one_device_and_the_unpacked_gradient():
    """``make_train_step`` on the packed batch (SGD, everything trained): on one device its loss is the
    unpacked samples' token-level mean and its update ``-lr * grad / count``; on a 2 x 2 x 2 mesh of
    the 8 fake CPU devices the same."""
    lr = 0.5
    model, params, _, _, packed = setup("mlp")
    total, count, grads, _ = unpacked_reference("mlp")
    labels = jax.tree.map(lambda _: "all", params)
    tx = optax.sgd(lr)
    step = jax.jit(train.make_train_step(model, tx, labels, lambda s: lr))
    out = {}
    for name, spec, devices in [
        ("one", {"data": 1}, jax.devices()[:1]),
        ("2x2x2", {"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()),
    ]:
        mesh = sharding.make_mesh(spec, devices)
        with sharding.mesh_context(mesh):
            placed = jax.device_put(params, factory.build(model.config, mesh).shardings)
            zero = jnp.zeros((), jnp.int32)
            opt_state = tx.init(train.split_params(placed, labels)[0])
            state = train.TrainState(step=zero, params=placed, opt_state=opt_state, nonfinite=zero)
            new, metrics = step(state, sharding.shard_batch(on_device(packed), mesh))
            out[name] = jax.device_get((new.params, metrics.compute()["loss"]))
    (one, loss), (sharded, sharded_loss) = out["one"], out["2x2x2"]
    np.testing.assert_allclose(loss, total / count, rtol=TOL)
    np.testing.assert_allclose(sharded_loss, loss, rtol=TOL)
    delta = lambda new: jax.tree.map(lambda a, b: (b - a) / lr * count, new, params)  # = the grad sum
    assert_grads_close(delta(one), grads, scale=10.0)
    assert_grads_close(sharded, one)


def test_check_batch_wants_the_image_tokens_of_each_rows_images():
    mcfg = model_config("mlp")
    n = mcfg.num_image_tokens
    ids = np.full((3, 4 * n), 7)
    ids[0, :n] = ids[2, n : 3 * n] = IMAGE_ID  # row 0: one image, row 1: text only, row 2: two images
    batch = {"input_ids": ids, "record_id": np.array(["a", "b", "c"])}
    train.check_batch(dict(batch, image_mask=np.array([[1, 0], [0, 0], [1, 1]])), mcfg)
    with pytest.raises(ValueError, match=r"Records \['c'\] carry \[8\] image tokens but the model makes 4"):
        train.check_batch(batch, mcfg)  # without image_mask: one image per row, or none
    train.check_batch(dict(batch, input_ids=ids[:2]), mcfg)
    with pytest.raises(ValueError, match=r"Records \['a'\]"):
        train.check_batch(dict(batch, image_mask=np.array([[1, 1], [0, 0], [1, 1]])), mcfg)
