"""X-Former's dual cross-attention against a plain-torch module written from the paper
(tests/torch_refs/dual_cross.py), with the same random weights."""

from __future__ import annotations

import jax
import numpy as np
import torch
from flax import linen as nn

from pargo_jax.models.projectors.xformer import DualCrossAttention
from tests.torch_refs import dual_cross as ref

H, C_MAE, HEADS, MLP, DEC = 32, 24, 4, 64, 16


def _copy_into(torch_module, params):
    """Our Dense kernels (in, out) -> torch Linear weights (out, in); LayerNorm scale / bias."""
    with torch.no_grad():
        for name, sub in params.items():
            if isinstance(sub, dict) and "kernel" in sub:
                linear = getattr(torch_module, name)
                linear.weight.copy_(torch.tensor(np.asarray(sub["kernel"]).T))
                linear.bias.copy_(torch.tensor(np.asarray(sub["bias"])))
        for norm in ("attn_norm", "ffn_norm"):
            if f"{norm}_scale" in params:
                getattr(torch_module, norm).weight.copy_(torch.tensor(np.asarray(params[f"{norm}_scale"])))
                getattr(torch_module, norm).bias.copy_(torch.tensor(np.asarray(params[f"{norm}_bias"])))


def test_dual_cross_attention_matches_torch_reference():
    module = DualCrossAttention(hidden=H, heads=HEADS, mlp_dim=MLP, decoder_width=DEC, layers=2)
    rng = np.random.default_rng(0)
    zq = rng.normal(size=(2, 8, H)).astype(np.float32)
    m = rng.normal(size=(2, 9, C_MAE)).astype(np.float32)
    params = nn.unbox(module.init(jax.random.key(0), zq, m)["params"])
    params = jax.tree.map(
        lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32), params
    )  # non-trivial norms
    z_out, m_out = module.apply({"params": params}, zq, m)
    dec = module.apply({"params": params}, m_out, method=module.to_decoder)
    torch_module = ref.DualCrossAttention(H, C_MAE, HEADS, MLP, DEC, layers=2)
    _copy_into(torch_module, {k: v for k, v in params.items() if k in ("detail_in", "to_decoder")})
    for i in range(2):
        _copy_into(torch_module.local_blocks[i], params[f"local_{i}"])
        _copy_into(torch_module.global_blocks[i], params[f"global_{i}"])
    with torch.no_grad():
        want = torch_module(torch.from_numpy(zq), torch.from_numpy(m))
    for got, expected in zip((z_out, m_out, dec), want):
        np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=1e-5, atol=1e-5)
    assert z_out.shape == (2, 8, H) and m_out.shape == (2, 9, H) and dec.shape == (2, 9, DEC)
