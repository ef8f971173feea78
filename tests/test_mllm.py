"""VisionLanguageModel pieces: image-token splicing and on-device normalization of uint8 pixels."""

import jax
import jax.numpy as jnp
import numpy as np

from pargo_jax.models.llm import LLMConfig
from pargo_jax.models.mllm import MLLMConfig, VisionLanguageModel, splice_image_tokens
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
