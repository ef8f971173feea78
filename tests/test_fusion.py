"""Conv-Gate fusion: the four modes against a plain torch module written from MG-LLaVA's formula (random
weights), F == L at initialization, and clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from pargo_jax.models.fusion import MODES, DualPathFusion, FusionConfig
from tests.torch_refs.fusion import DualPathFusion as TorchFusion

D, C, SIDE = 8, 12, 4


def inputs(seed=0):
    r = np.random.RandomState(seed)
    return r.randn(2, SIDE * SIDE, D).astype(np.float32), r.randn(2, SIDE, SIDE, C).astype(np.float32)


def to_torch(params: dict, ref: TorchFusion) -> None:
    """Our params into the torch module (1x1 kernels (in, out) -> (out, in, 1, 1); depthwise HWIO -> OIHW)."""
    t = lambda x: torch.as_tensor(np.asarray(x))
    with torch.no_grad():
        for name in ("slow_conv", "slow_proj", "fast_proj"):
            getattr(ref, name).weight.copy_(t(params[f"{name}_kernel"]).T[:, :, None, None])
            getattr(ref, name).bias.copy_(t(params[f"{name}_bias"]))
        ref.fast_conv.weight.copy_(t(params["fast_conv_kernel"]).permute(3, 2, 0, 1))
        ref.fast_conv.bias.copy_(t(params["fast_conv_bias"]))
        for i, name in ((0, "gate_fc1"), (2, "gate_fc2")) if "gate_fc1" in params else ():
            ref.gate[i].weight.copy_(t(params[name]["kernel"]).T)
            ref.gate[i].bias.copy_(t(params[name]["bias"]))


@pytest.mark.parametrize("mode", MODES)
def test_matches_the_torch_formula(mode):
    low, high = inputs()
    module = DualPathFusion(FusionConfig(D, C, mode=mode))
    params = nn.unbox(module.init(jax.random.key(0), low, high))["params"] if mode != "concat" else {}
    leaves, tree = jax.tree.flatten(params)  # every weight random: the zero-initialized projections too
    keys = jax.random.split(jax.random.key(1), max(len(leaves), 1))
    params = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    got = jax.jit(module.apply)({"params": params}, low, high)
    ref = TorchFusion(D, C, mode)
    if mode != "concat":
        to_torch(params, ref)
    with torch.no_grad():
        want = ref(torch.as_tensor(low), torch.as_tensor(high).permute(0, 3, 1, 2)).numpy()
    assert got.shape == (2, SIDE * SIDE, module.config.out_dim) == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gate_sum_is_the_identity_at_initialization():
    low, high = inputs(1)
    module = DualPathFusion(FusionConfig(D, C))
    variables = module.init(jax.random.key(0), low, high)
    np.testing.assert_array_equal(jax.jit(module.apply)(variables, low, high), low)
    grads = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, low, high) ** 2))(
        nn.unbox(variables)["params"]
    )
    assert np.abs(grads["slow_proj_kernel"]).max() > 0 and np.abs(grads["fast_proj_kernel"]).max() > 0


def test_clear_errors():
    with pytest.raises(ValueError, match="fusion mode='sum' is not one of"):
        FusionConfig(D, C, mode="sum")
    with pytest.raises(ValueError, match="the high-res map is 5 x 5 but the low-res tokens are 16"):
        low, high = jnp.zeros((1, SIDE * SIDE, D)), jnp.zeros((1, SIDE + 1, SIDE + 1, C))
        DualPathFusion(FusionConfig(D, C)).init(jax.random.key(0), low, high)


def test_the_views_form_is_the_native_convolution():
    """``depthwise="views"`` (the projector grid's, vmapped over seeds) gives the native 7x7 depthwise
    conv's values and gradients."""
    low, high = inputs()
    fusion = lambda form: DualPathFusion(FusionConfig(D, C, zero_init=False, depthwise=form))
    conv, views = fusion("conv"), fusion("views")
    params = nn.unbox(conv.init(jax.random.key(0), low, high))["params"]
    loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, low, high)))
    np.testing.assert_allclose(views.apply({"params": params}, low, high),
                               conv.apply({"params": params}, low, high), rtol=1e-5, atol=1e-5)  # fmt: skip
    got, want = jax.grad(loss(views))(params), jax.grad(loss(conv))(params)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), got, want)
    with pytest.raises(ValueError, match="fusion depthwise='fft' is not one of"):
        FusionConfig(D, C, depthwise="fft")
