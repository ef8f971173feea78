"""Schedules, freezing (no optimizer state), LR multipliers, clipping and decay masks of pargo_jax.optim."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pargo_jax import optim


def _params():
    return {
        "projector": {"fc1_kernel": jnp.ones((4, 3)), "fc1_bias": jnp.ones((3,))},
        "adapter": {"kernel": jnp.ones((4, 3))},
        "llm": {
            "embed_tokens": {"embedding": jnp.ones((64, 4))},
            "layers": {"attn": {"q": {"kernel": jnp.ones((2, 4, 4)), "bias": jnp.ones((2, 4))}}},
            "big": {"kernel": jnp.ones((97, 89))},  # a frozen shape that appears nowhere else
        },
    }


def _cfg(**kw):
    base = dict(lr=1e-2, warmup_steps=0, total_steps=100, schedule="constant")
    return {**base, **kw}


def test_param_paths_and_labels():
    params = _params()
    paths = optim.param_paths(params)
    assert paths["llm"]["layers"]["attn"]["q"]["kernel"] == "llm/layers/attn/q/kernel"
    labels = optim.trainable_labels(params, {"projector/.*": 1.0, "llm/layers/.*": 0.1, ".*kernel": 2.0})
    assert labels["projector"]["fc1_kernel"] == "projector/.*"  # first match wins
    assert labels["llm"]["layers"]["attn"]["q"]["bias"] == "llm/layers/.*"
    assert labels["adapter"]["kernel"] == ".*kernel"
    assert labels["llm"]["embed_tokens"]["embedding"] == "frozen"


def test_bad_regex_is_named():
    with pytest.raises(ValueError, match="projektor"):
        optim.trainable_labels(_params(), {"projector/.*": 1.0, "projektor/.*": 1.0})


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="learning_rate"):
        optim.make_optimizer({"learning_rate": 1.0}, _params(), {"projector/.*": 1.0})


def test_schedules():
    cos = optim.learning_rate_schedule(
        dict(lr=1.0, warmup_steps=10, total_steps=110, schedule="cosine", min_lr_ratio=0.1)
    )
    np.testing.assert_allclose(
        [cos(0), cos(5), cos(10), cos(60), cos(110), cos(500)],
        [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1, 0.1],
        atol=1e-6,
    )
    np.testing.assert_allclose(cos(35), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)), atol=1e-6)
    lin = optim.learning_rate_schedule(dict(lr=2.0, warmup_steps=4, total_steps=14, schedule="linear"))
    np.testing.assert_allclose([lin(2), lin(4), lin(9), lin(14)], [1.0, 2.0, 1.0, 0.0], atol=1e-6)
    const = optim.learning_rate_schedule(dict(lr=3.0, warmup_steps=2, schedule="constant"))
    np.testing.assert_allclose([const(1), const(2), const(10**6)], [1.5, 3.0, 3.0], atol=1e-6)
    no_warm = optim.learning_rate_schedule(dict(lr=3.0, total_steps=10, schedule="cosine"))
    np.testing.assert_allclose(no_warm(0), 3.0)
    with pytest.raises(ValueError, match="cosinus"):
        optim.learning_rate_schedule(dict(lr=1.0, total_steps=5, schedule="cosinus"))


def test_frozen_params_unchanged_and_stateless():
    params = _params()
    tx, labels = optim.make_optimizer(_cfg(weight_decay=0.1, clip_norm=1.0), params, {"projector/.*": 1.0})
    state = tx.init(params)
    shapes = {tuple(x.shape) for x in jax.tree.leaves(state)}
    assert (97, 89) not in shapes and (64, 4) not in shapes and (2, 4, 4) not in shapes
    assert (4, 3) in shapes  # projector Adam moments
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert np.all(params["llm"]["big"]["kernel"] == 1.0)
    assert np.all(params["adapter"]["kernel"] == 1.0)
    assert not np.allclose(params["projector"]["fc1_kernel"], 1.0)
    assert labels["llm"]["big"]["kernel"] == "frozen"


def test_multipliers_scale_updates():
    params = {"a": {"w": jnp.ones((3, 2))}, "b": {"w": jnp.ones((3, 2))}}
    tx, _ = optim.make_optimizer(_cfg(lr=0.1), params, {"a/.*": 1.0, "b/.*": 0.5})
    grads = {"a": {"w": jnp.full((3, 2), 0.3)}, "b": {"w": jnp.full((3, 2), -2.0)}}
    updates, _ = tx.update(grads, tx.init(params), params)
    # First Adam step: m_hat / sqrt(v_hat) = sign(g).
    np.testing.assert_allclose(updates["a"]["w"], -0.1, rtol=1e-5)
    np.testing.assert_allclose(updates["b"]["w"], 0.05, rtol=1e-5)


def test_clipping_uses_trainable_grads_only():
    params = {"t": jnp.zeros((2,)), "f": jnp.zeros((2,))}
    _, labels = optim.make_optimizer(_cfg(clip_norm=1.0), params, {"t": 1.0})
    stage = optax.masked(optax.clip_by_global_norm(1.0), optim.trainable_mask(labels))
    grads = {"t": jnp.array([3.0, 4.0]), "f": jnp.array([1e6, 1e6])}
    out, _ = stage.update(grads, stage.init(params), params)
    np.testing.assert_allclose(out["t"], [0.6, 0.8], rtol=1e-6)  # norm 5 -> 1, frozen grads ignored
    # And the full optimizer: with eps large, Adam's first step is ~g/eps, so clipping is visible.
    tx2, _ = optim.make_optimizer(_cfg(lr=1.0, eps=1e3, clip_norm=1.0), params, {"t": 1.0})
    upd, _ = tx2.update(grads, tx2.init(params), params)
    g_clipped = np.array([0.6, 0.8])
    np.testing.assert_allclose(upd["t"], -g_clipped / (np.abs(g_clipped) + 1e3), rtol=1e-5)
    np.testing.assert_allclose(upd["f"], 0.0)


def test_weight_decay_mask():
    params = _params()
    tx, _ = optim.make_optimizer(_cfg(lr=1.0, weight_decay=0.5, eps=1e30), params, {".*": 1.0})
    grads = jax.tree.map(jnp.zeros_like, params)
    upd, _ = tx.update(grads, tx.init(params), params)
    # Zero grads: the update is -lr * wd * p where decayed, exactly 0 elsewhere.
    np.testing.assert_allclose(upd["projector"]["fc1_kernel"], -0.5)
    np.testing.assert_allclose(upd["llm"]["embed_tokens"]["embedding"], -0.5)
    np.testing.assert_allclose(upd["llm"]["layers"]["attn"]["q"]["kernel"], -0.5)
    np.testing.assert_allclose(upd["projector"]["fc1_bias"], 0.0)
    np.testing.assert_allclose(upd["llm"]["layers"]["attn"]["q"]["bias"], 0.0)  # stacked 2-D bias


def test_jit_update_with_abstract_init():
    params = _params()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    tx, _ = optim.make_optimizer(
        _cfg(schedule="cosine", warmup_steps=2, clip_norm=1.0), abstract, {"projector/.*": 1.0}
    )
    state = jax.jit(tx.init)(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    upd, state = step(jax.tree.map(jnp.ones_like, params), state, params)
    assert np.all(np.isfinite(upd["projector"]["fc1_kernel"]))
