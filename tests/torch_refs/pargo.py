"""Independent PyTorch re-implementation of the released ParGo projector (from DESIGN.md semantics).

Module names follow the official checkpoint (``ln_vision``, ``query_tokens``, ``ParGo.bert...``,
``llm_proj``), so an official state dict loads with ``load_state_dict(strict=True)`` after dropping
the text-branch tensors. Written straightforwardly (one nn.Linear per projection, additive -inf
masks) on purpose: the parity reference of the official checkpoint's import (``test_official.py``).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int, eps: float):
        super().__init__()
        self.heads = heads
        self.self = nn.Module()
        self.self.query = nn.Linear(hidden, hidden)
        self.self.key = nn.Linear(kv_width, hidden)
        self.self.value = nn.Linear(kv_width, hidden)
        self.output = nn.Module()
        self.output.dense = nn.Linear(hidden, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, h: torch.Tensor, kv: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        b, q_len, width = h.shape
        d = width // self.heads

        def split(x):
            return x.view(b, -1, self.heads, d).transpose(1, 2)

        q, k, v = split(self.self.query(h)), split(self.self.key(kv)), split(self.self.value(kv))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + additive_mask
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, q_len, width)
        return self.output.LayerNorm(self.output.dense(ctx) + h)


class _Layer(nn.Module):
    def __init__(self, hidden, heads, mlp_dim, vision_width, eps):
        super().__init__()
        self.attention = _Attention(hidden, heads, hidden, eps)
        self.crossattention = _Attention(hidden, heads, vision_width, eps)
        self.intermediate_query = nn.Module()
        self.intermediate_query.dense = nn.Linear(hidden, mlp_dim)
        self.output_query = nn.Module()
        self.output_query.dense = nn.Linear(mlp_dim, hidden)
        self.output_query.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, h, feats, self_mask, cross_mask):
        h = self.attention(h, h, self_mask)
        h = self.crossattention(h, feats, cross_mask)
        y = self.output_query.dense(nn.functional.gelu(self.intermediate_query.dense(h)))
        return self.output_query.LayerNorm(y + h)


def released_masks(num_partial: int, num_queries: int, num_patches: int):
    """Additive masks as the release builds them: partial i sees patches [i*k, (i+1)*k)."""
    self_mask = torch.full((num_queries, num_queries), float("-inf"))
    self_mask[:num_partial, :num_partial] = 0
    self_mask[num_partial:, num_partial:] = 0
    cross = torch.zeros(num_queries, num_patches)
    if num_partial:
        k = num_patches // num_partial
        allowed = torch.zeros(num_partial, num_patches, dtype=torch.bool)
        for i in range(num_partial):
            allowed[i, i * k : (i + 1) * k] = True
        cross[:num_partial] = cross[:num_partial].masked_fill(~allowed, float("-inf"))
    if num_partial == 0:
        self_mask.zero_()
    return self_mask, cross


class ParGoReference(nn.Module):
    def __init__(
        self,
        num_partial=288,
        num_global=16,
        hidden=512,
        heads=8,
        layers=4,
        mlp_dim=2048,
        vision_width=1024,
        llm_width=4096,
        max_positions=512,
    ):
        super().__init__()
        self.num_partial = num_partial
        q = num_partial + num_global
        self.ln_vision = nn.LayerNorm(vision_width, eps=1e-5)
        self.query_tokens = nn.Parameter(torch.randn(1, q, hidden) * 0.02)
        self.ParGo = nn.Module()
        self.ParGo.bert = nn.Module()
        self.ParGo.bert.embeddings = nn.Module()
        self.ParGo.bert.embeddings.position_embeddings = nn.Embedding(max_positions, hidden)
        self.ParGo.bert.embeddings.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.ParGo.bert.encoder = nn.Module()
        self.ParGo.bert.encoder.layer = nn.ModuleList(
            [_Layer(hidden, heads, mlp_dim, vision_width, 1e-12) for _ in range(layers)]
        )
        self.llm_proj = nn.Linear(hidden, llm_width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        feats = self.ln_vision(features)
        b, n, _ = feats.shape
        q = self.query_tokens.shape[1]
        emb = self.ParGo.bert.embeddings
        h = self.query_tokens + emb.position_embeddings.weight[:q][None]
        h = emb.LayerNorm(h).expand(b, -1, -1)
        self_mask, cross_mask = released_masks(self.num_partial, q, n)
        for layer in self.ParGo.bert.encoder.layer:
            h = layer(h, feats, self_mask.to(h.dtype), cross_mask.to(h.dtype))
        return self.llm_proj(h)
