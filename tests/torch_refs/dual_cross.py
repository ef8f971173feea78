"""X-Former's dual cross-attention in plain torch, written from the paper's description (M' =
CrossAttn(Q=M, KV=Zq), Z' = CrossAttn(Q=Zq, KV=M')) with each attention a post-LN BERT layer without
self-attention (attention, residual, LayerNorm; GELU feed-forward, residual, LayerNorm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_dim: int, eps: float = 1e-12):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.attn_out, self.fc1, self.fc2 = (
            nn.Linear(hidden, hidden),
            nn.Linear(hidden, mlp_dim),
            nn.Linear(mlp_dim, hidden),
        )
        self.attn_norm, self.ffn_norm = nn.LayerNorm(hidden, eps=eps), nn.LayerNorm(hidden, eps=eps)

    def forward(self, x, kv):
        b, lq, h = x.shape
        heads = lambda t: t.view(b, t.shape[1], self.heads, h // self.heads).transpose(1, 2)
        q, k, v = heads(self.query(x)), heads(self.key(kv)), heads(self.value(kv))
        probs = torch.softmax(q @ k.transpose(-1, -2) / (h // self.heads) ** 0.5, dim=-1)
        a = (probs @ v).transpose(1, 2).reshape(b, lq, h)
        x = self.attn_norm(x + self.attn_out(a))
        return self.ffn_norm(x + self.fc2(F.gelu(self.fc1(x))))


class DualCrossAttention(nn.Module):
    def __init__(self, hidden, detail_width, heads, mlp_dim, decoder_width, layers=1):
        super().__init__()
        self.detail_in = nn.Linear(detail_width, hidden)
        self.local_blocks = nn.ModuleList(CrossBlock(hidden, heads, mlp_dim) for _ in range(layers))
        self.global_blocks = nn.ModuleList(CrossBlock(hidden, heads, mlp_dim) for _ in range(layers))
        self.to_decoder = nn.Linear(hidden, decoder_width)

    def forward(self, zq, m):
        m = self.detail_in(m)
        for local, glob in zip(self.local_blocks, self.global_blocks):
            m = local(m, zq)
            zq = glob(zq, m)
        return zq, m, self.to_decoder(m)
