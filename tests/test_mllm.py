"""VisionLanguageModel pieces: image-token splicing, on-device normalization of uint8 pixels, and the
chunked cross-entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pargo_jax.models.llm import LLMConfig
from pargo_jax.models.mllm import (
    MLLMConfig,
    VisionLanguageModel,
    chunked_next_token_loss,
    next_token_loss,
    splice_image_tokens,
)
from pargo_jax.models.projectors import MLPConfig
from pargo_jax.models.vision import vision_preset


def test_splice_puts_image_tokens_in_order_and_keeps_text():
    text = jnp.zeros((2, 6, 1)) + jnp.arange(6)[None, :, None] * 100.0
    image = jnp.arange(1, 7, dtype=jnp.float32).reshape(2, 3, 1)  # sample 0: 1,2,3; sample 1: 4,5,6
    ids = jnp.array([[5, 9, 9, 9, 7, 8], [9, 9, 5, 9, 7, 8]])  # 9 = image token
    out = np.asarray(splice_image_tokens(text, image, ids, 9))[..., 0]
    np.testing.assert_array_equal(out[0], [0, 1, 2, 3, 400, 500])
    np.testing.assert_array_equal(out[1], [4, 5, 200, 6, 400, 500])


def test_uint8_pixels_are_normalized_on_device_like_the_host_does():
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    config = MLLMConfig(
        vision=vision_preset("tiny"),
        projector=MLPConfig(vision_width=32, llm_width=16, group=4),
        llm=LLMConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=8),
        image_token_id=3, pixel_mean=mean, pixel_std=std,
    )  # fmt: skip
    model = VisionLanguageModel(config)
    pixels = np.random.RandomState(0).randint(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    normalized = (pixels / 255.0 - np.asarray(mean)) / np.asarray(std)
    ids = jnp.array([[3, 3, 3, 3, 5, 6]] * 2)
    mask = jnp.ones_like(ids)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.asarray(normalized, jnp.float32), ids, mask)
    on_device = jax.jit(model.apply)(variables, pixels, ids, mask)
    on_host = jax.jit(model.apply)(variables, jnp.asarray(normalized, jnp.float32), ids, mask)
    assert on_device.shape == (2, 6, 32)
    np.testing.assert_allclose(on_device, on_host, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [3, 16])  # 3 does not divide T = 10 (padded); 16 > T (one block)
def test_chunked_loss_equals_the_dense_loss_and_gradients(tied, chunk):
    """The chunked cross-entropy (hidden states x output kernel, ``chunk`` positions at a time) gives
    the dense path's loss, token count and gradients for every param (float32, <= 1e-6 relative
    to the gradient's largest entry)."""
    config = MLLMConfig(
        vision=vision_preset("tiny"),
        projector=MLPConfig(vision_width=32, llm_width=16, group=4),
        llm=LLMConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=8, tie_word_embeddings=tied),
        image_token_id=3,
    )  # fmt: skip
    model = VisionLanguageModel(config)
    rng = np.random.RandomState(1)
    pixels = jnp.asarray(rng.randn(2, 32, 32, 3), jnp.float32)
    ids = jnp.asarray(np.concatenate([np.full((2, 4), 3), rng.randint(5, 50, (2, 6))], 1))
    targets = jnp.asarray(rng.randint(0, 50, (2, 10)))
    loss_mask = jnp.asarray((rng.rand(2, 10) > 0.3).astype(np.float32))
    mask = jnp.ones_like(ids)
    params = jax.jit(model.init)(jax.random.key(0), pixels, ids, mask)["params"]

    def dense(p):
        return next_token_loss(model.apply({"params": p}, pixels, ids, mask), targets, loss_mask)

    def chunked(p):
        hidden = model.apply({"params": p}, pixels, ids, mask, hidden_only=True)
        kernel = model.apply({"params": p}, method=model.output_kernel)
        return chunked_next_token_loss(hidden, kernel, targets, loss_mask, chunk)

    (want, n_want), g_want = jax.jit(jax.value_and_grad(dense, has_aux=True))(params)
    (got, n_got), g_got = jax.jit(jax.value_and_grad(chunked, has_aux=True))(params)
    assert float(n_got) == float(n_want) == float(loss_mask.sum())
    np.testing.assert_allclose(got, want, rtol=1e-6)
    flat_want, flat_got = jax.tree.leaves_with_path(g_want), jax.tree.leaves(g_got)
    for (path, w), g in zip(flat_want, flat_got, strict=True):  # float32 sums in another order
        atol = 1e-7 + 1e-6 * float(np.abs(w).max())  # 1e-7: exactly-zero grads (key biases) come out ~1e-11
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=atol, err_msg=jax.tree_util.keystr(path))
