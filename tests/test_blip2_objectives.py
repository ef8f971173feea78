"""BLIP-2's stage-1 objectives against a plain-torch reference written from LAVIS
(tests/torch_refs/blip2_objectives.py), and ITC's global negatives: 8 devices == 1 == LAVIS over 8
GPUs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pargo_jax import sharding
from pargo_jax.models import blip2_objectives as obj
from tests.torch_refs import blip2_objectives as ref

TOL = 1e-5  # float32, both sides accumulate in float32


def _feats(b=8, q=4, e=16, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(b, q, e)).astype(np.float32)
    text = rng.normal(size=(b, e)).astype(np.float32)
    text[:, :] += image.mean(1)  # correlated pairs: the diagonal is the likely match
    return image, text


def test_itc_equals_lavis_reference():
    image, text = _feats()
    temp = np.float32(0.07)
    ours = obj.itc_loss(obj.itc_similarity(jnp.asarray(image), jnp.asarray(text), jnp.asarray(temp)))
    theirs = ref.itc_loss(torch.from_numpy(image), torch.from_numpy(text), torch.tensor(temp))
    assert abs(float(ours) - float(theirs)) <= TOL * abs(float(theirs))


def test_itc_sharded_equals_single_device_and_lavis_on_8_gpus():
    """The loss and its gradients over a batch sharded on 8 devices equal one device's; the value
    equals LAVIS's mean over 8 ranks that each gather the others' features."""
    image, text = _feats(b=16)
    temp = jnp.asarray(0.1, jnp.float32)
    loss = lambda i, t, tau: obj.itc_loss(obj.itc_similarity(i, t, tau))
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    single = grad(jnp.asarray(image), jnp.asarray(text), temp)
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:8])
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
    image8, text8 = shard(image), shard(text)
    assert image8.sharding.shard_shape(image8.shape)[0] == 2  # 16 pairs, 2 per device
    value, grads = grad(image8, text8, temp)
    np.testing.assert_allclose(value, single[0], rtol=TOL)
    for g8, g1 in zip(grads, single[1]):
        np.testing.assert_allclose(g8, g1, rtol=TOL, atol=1e-7)
    lavis = ref.itc_loss(torch.from_numpy(image), torch.from_numpy(text), torch.tensor(0.1), ranks=8)
    assert abs(float(value) - float(lavis)) <= TOL * abs(float(lavis))


def test_negative_probabilities_equal_lavis_and_the_sampler_follows_them():
    image, text = _feats(b=6)
    sim = obj.itc_similarity(jnp.asarray(image), jnp.asarray(text), jnp.asarray(0.5))
    w_i2t, w_t2i = ref.negative_weights(torch.from_numpy(np.array(sim)))
    np.testing.assert_allclose(obj.negative_probabilities(sim), w_i2t.numpy(), atol=1e-6)
    np.testing.assert_allclose(obj.negative_probabilities(sim.T), w_t2i.numpy(), atol=1e-6)
    draws = jax.vmap(lambda k: jnp.stack(obj.hard_negatives(sim, k)))(
        jax.random.split(jax.random.key(0), 4000)
    )
    neg_text, neg_image = np.asarray(draws[:, 0]), np.asarray(draws[:, 1])  # (4000, B)
    b = sim.shape[0]
    assert not (neg_text == np.arange(b)).any() and not (neg_image == np.arange(b)).any()
    freq = lambda d: np.stack([np.bincount(d[:, i], minlength=b) for i in range(b)]) / d.shape[0]
    # 4000 draws: the standard error of a frequency is <= 0.008
    np.testing.assert_allclose(freq(neg_text), w_i2t.numpy(), atol=0.04)
    np.testing.assert_allclose(freq(neg_image), w_t2i.numpy(), atol=0.04)


def test_itm_pairs_and_loss():
    images, texts, labels = obj.itm_pairs(jnp.array([1, 2, 0]), jnp.array([2, 0, 1]))
    np.testing.assert_array_equal(images, [0, 1, 2, 2, 0, 1, 0, 1, 2])
    np.testing.assert_array_equal(texts, [0, 1, 2, 0, 1, 2, 1, 2, 0])
    np.testing.assert_array_equal(labels, [1, 1, 1, 0, 0, 0, 0, 0, 0])
    logits = np.random.default_rng(1).normal(size=(9, 2)).astype(np.float32)
    ours = obj.itm_loss(jnp.asarray(logits), labels)
    np.testing.assert_allclose(ours, ref.itm_loss(torch.from_numpy(logits)).numpy(), rtol=TOL)


def test_itg_loss_equals_lavis_with_padding():
    rng = np.random.default_rng(2)
    b, t, v, pad, bos = 3, 7, 11, 0, 10
    ids = rng.integers(1, 10, size=(b, t))
    lengths = np.array([7, 4, 2])
    mask = np.arange(t)[None] < lengths[:, None]
    ids = np.where(mask, ids, pad)
    dec = np.asarray(obj.itg_input_ids(jnp.asarray(ids), bos))
    assert (dec[:, 0] == bos).all() and (dec[:, 1:] == ids[:, 1:]).all()
    logits = rng.normal(size=(b, t, v)).astype(np.float32)
    ours = obj.itg_loss(jnp.asarray(logits), jnp.asarray(dec), jnp.asarray(mask))
    theirs = ref.itg_loss(torch.from_numpy(logits), torch.from_numpy(dec.astype(np.int64)), pad)
    assert abs(float(ours) - float(theirs)) <= TOL * abs(float(theirs))


def test_a_batch_of_one_has_no_negatives():
    with pytest.raises(ValueError, match="needs >= 2 pairs"):
        obj.negative_probabilities(jnp.zeros((1, 1)))
