"""Plain torch references for the Perceiver resampler and Honeybee's C-Abstractor, written from their
papers (and timm's RegNet bottleneck, which timm cannot load here) with torch's own primitives:
``scaled_dot_product_attention``, ``conv2d`` (NCHW, grouped), ``adaptive_avg_pool2d``, ``layer_norm``.

Both take the JAX parameter dict (numpy arrays, JAX names and layouts) so that a test can feed one set of
random weights to both implementations."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, np.float32))


def sincos_2d(rows: int, cols: int, dim: int) -> torch.Tensor:
    """(rows * cols, dim): [sin, cos](row * w) ++ [sin, cos](col * w), w_i = 10000^(-4 i / dim)."""
    w = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) * 4 / dim)
    r = torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)[:, None] * w
    c = torch.arange(cols, dtype=torch.float64).repeat(rows)[:, None] * w
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], 1).float()


def resampler(p: dict, x: torch.Tensor, *, heads: int, layers: int, mlp_dim: int, eps: float) -> torch.Tensor:
    """Perceiver resampler, x (B, N, C) on a square grid -> (B, T, D)."""
    ln = lambda y, name: F.layer_norm(y, y.shape[-1:], _t(p[f"{name}_scale"]), _t(p[f"{name}_bias"]), eps)
    lin = lambda y, name: y @ _t(p[f"{name}_kernel"]) + _t(p[f"{name}_bias"])
    b, n, _ = x.shape
    f = x @ _t(p["kv_in_kernel"]) if "kv_in_kernel" in p else x
    f = ln(f, "ln_kv")
    hd = f.shape[-1]
    side_n, queries = math.isqrt(n), _t(p["query_tokens"])
    side_t = math.isqrt(queries.shape[0])
    keys = f + sincos_2d(side_n, side_n, hd)
    h = queries.expand(b, -1, -1)
    heads_first = lambda y: y.reshape(b, y.shape[1], heads, hd // heads).transpose(1, 2)
    for i in range(layers):
        q = lin(ln(h, f"ln_q_{i}") + sincos_2d(side_t, side_t, hd), f"q_{i}")
        a = F.scaled_dot_product_attention(
            heads_first(q), heads_first(lin(keys, f"k_{i}")), heads_first(lin(f, f"v_{i}"))
        )
        h = h + lin(a.transpose(1, 2).reshape(b, -1, hd), f"out_{i}")
        if mlp_dim:
            h = h + lin(F.gelu(lin(ln(h, f"ln_ffn_{i}"), f"fc1_{i}")), f"fc2_{i}")
    return lin(ln(h, "ln_post"), "llm_proj")


def _layer_norm_2d(x: torch.Tensor, p: dict, name: str, eps: float) -> torch.Tensor:
    """timm's LayerNorm2d: LayerNorm over channels of an NCHW map."""
    y = x.permute(0, 2, 3, 1)
    y = F.layer_norm(y, y.shape[-1:], _t(p[f"{name}_scale"]), _t(p[f"{name}_bias"]), eps)
    return y.permute(0, 3, 1, 2)


def _conv1x1(x: torch.Tensor, kernel) -> torch.Tensor:
    return F.conv2d(x, _t(kernel).T[:, :, None, None])


def _bottleneck(x: torch.Tensor, p: dict, name: str, out: int, se_ratio: float, eps: float) -> torch.Tensor:
    """timm RegNet ``Bottleneck`` (bottle_ratio 1, group_size 1, SiLU, LayerNorm2d), NCHW."""
    cin = x.shape[1]
    y = F.silu(_layer_norm_2d(_conv1x1(x, p[f"{name}_conv1_kernel"]), p, f"{name}_ln1", eps))
    dw = _t(p[f"{name}_conv2_kernel"]).permute(3, 2, 0, 1)  # (3, 3, 1, C) -> (C, 1, 3, 3)
    y = F.silu(_layer_norm_2d(F.conv2d(y, dw, padding=1, groups=out), p, f"{name}_ln2", eps))
    if round(cin * se_ratio):
        s = y.mean((2, 3), keepdim=True)
        s = F.silu(F.conv2d(s, _t(p[f"{name}_se1_kernel"]).T[:, :, None, None], _t(p[f"{name}_se1_bias"])))
        s = F.conv2d(s, _t(p[f"{name}_se2_kernel"]).T[:, :, None, None], _t(p[f"{name}_se2_bias"]))
        y = y * torch.sigmoid(s)
    y = _layer_norm_2d(_conv1x1(y, p[f"{name}_conv3_kernel"]), p, f"{name}_ln3", eps)
    if cin != out:
        x = _layer_norm_2d(_conv1x1(x, p[f"{name}_shortcut_kernel"]), p, f"{name}_lns", eps)
    return F.silu(y + x)


def c_abstractor(
    p: dict, x: torch.Tensor, *, num_queries: int, depth: int, mlp_depth: int, se_ratio: float, eps: float
) -> torch.Tensor:
    """C-Abstractor, x (B, N, C) on a square grid -> (B, T, D)."""
    b, n, c = x.shape
    side = math.isqrt(n)
    y = (x + _t(p["pos_embed"])).transpose(1, 2).reshape(b, c, side, side)
    hidden = p["s1_b0_conv1_kernel"].shape[1]
    for i in range(depth):
        y = _bottleneck(y, p, f"s1_b{i}", hidden, se_ratio, eps)
    y = F.adaptive_avg_pool2d(y, math.isqrt(num_queries))
    for i in range(depth):
        y = _bottleneck(y, p, f"s2_b{i}", hidden, se_ratio, eps)
    y = y.flatten(2).transpose(1, 2)
    y = y @ _t(p["readout_0_kernel"]) + _t(p["readout_0_bias"])
    for i in range(1, mlp_depth):
        y = F.silu(y) @ _t(p[f"readout_{i}_kernel"]) + _t(p[f"readout_{i}_bias"])
    return y
