"""Compact PyTorch reference of timm's EVA02 (``timm/models/eva.py``: Eva, EvaBlock, EvaAttention,
``timm/layers/mlp.py``: SwiGLU, ``timm/layers/pos_embed_sincos.py``: RotaryEmbeddingCat with
``in_pixels=False``), with timm's state-dict names. Used only by tests (timm itself needs torchvision,
which does not import here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rope_embed_cat(head_dim: int, grid: int, ref_grid: int) -> torch.Tensor:
    """timm build_rotary_pos_embed(in_pixels=False, ref_feat_shape) + cat: (grid*grid, 2*head_dim)."""
    num_bands = head_dim // 4
    bands = 1.0 / (10000.0 ** (torch.arange(0, num_bands, 1, dtype=torch.int64).float() / num_bands))
    t = [torch.arange(grid, dtype=torch.int64).float() / grid * ref_grid for _ in range(2)]
    pos = torch.stack(torch.meshgrid(t, indexing="ij"), dim=-1).unsqueeze(-1) * bands
    sin = pos.sin().reshape(grid * grid, -1).repeat_interleave(2, -1)
    cos = pos.cos().reshape(grid * grid, -1).repeat_interleave(2, -1)
    return torch.cat([sin, cos], -1)


def apply_rot_embed_cat(x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    sin, cos = emb.chunk(2, -1)
    rot = torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
    return x * cos + rot * sin


class EvaAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_fused: bool, inner_norm: bool):
        super().__init__()
        self.heads = heads
        if qkv_fused:
            self.qkv = nn.Linear(dim, dim * 3, bias=False)
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.qkv = None
            self.q_proj = nn.Linear(dim, dim, bias=True)
            self.k_proj = nn.Linear(dim, dim, bias=False)
            self.v_proj = nn.Linear(dim, dim, bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6) if inner_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        B, N, C = x.shape
        if self.qkv is not None:
            bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            q = self.q_proj(x).reshape(B, N, self.heads, -1).transpose(1, 2)
            k = self.k_proj(x).reshape(B, N, self.heads, -1).transpose(1, 2)
            v = self.v_proj(x).reshape(B, N, self.heads, -1).transpose(1, 2)
        if rope is not None:
            q = torch.cat([q[:, :, :1, :], apply_rot_embed_cat(q[:, :, 1:, :], rope)], 2).type_as(v)
            k = torch.cat([k[:, :, :1, :], apply_rot_embed_cat(k[:, :, 1:, :], rope)], 2).type_as(v)
        attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(self.norm(x))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, norm: bool):
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-6) if norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(F.silu(self.fc1_g(x)) * self.fc1_x(x)))


class EvaBlock(nn.Module):
    def __init__(self, dim, heads, hidden, qkv_fused, sub_norm):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EvaAttention(dim, heads, qkv_fused, sub_norm)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, hidden, sub_norm)

    def forward(self, x, rope):
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class Eva(nn.Module):
    """timm Eva with class token, abs pos emb, RoPE, SwiGLU; global_pool='token' (final ``norm``)."""

    def __init__(
        self,
        img_size=28,
        patch_size=7,
        dim=32,
        depth=2,
        heads=4,
        hidden=40,
        qkv_fused=False,
        sub_norm=True,
        ref_grid=16,
        num_classes=8,
    ):
        super().__init__()
        self.grid = img_size // patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2 + 1, dim))
        self.register_buffer("rope", rope_embed_cat(dim // heads, self.grid, ref_grid), persistent=False)
        self.blocks = nn.ModuleList(EvaBlock(dim, heads, hidden, qkv_fused, sub_norm) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward_features(self, x: torch.Tensor, return_hidden: bool = False):
        """NCHW pixels -> final-norm tokens; with ``return_hidden`` also [embeddings, block 1, ...]."""
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        hidden = [x]
        for blk in self.blocks:
            x = blk(x, self.rope)
            hidden.append(x)
        x = self.norm(x)
        return (x, hidden) if return_hidden else x


EVACLIP_NAMES = (  # timm name part -> original EVA-CLIP name part
    ("attn.q_proj.bias", "attn.q_bias"),
    ("attn.v_proj.bias", "attn.v_bias"),
    ("mlp.fc1_g", "mlp.w1"),
    ("mlp.fc1_x", "mlp.w2"),
    ("mlp.norm", "mlp.ffn_ln"),
    ("mlp.fc2", "mlp.w3"),
    ("attn.norm", "attn.inner_attn_ln"),
)


def evaclip_state(ref: Eva) -> dict[str, torch.Tensor]:
    """``ref``'s tower tensors under the original EVA-CLIP names (separate q/k/v with q_bias/v_bias,
    w1/w2/ffn_ln/w3, inner_attn_ln), without the final norm and head, as EVA-CLIP's visual tower
    saves them (prefix ``visual.`` not included)."""
    state = {}
    for k, v in ref.state_dict().items():
        if k.startswith(("norm.", "head.")):
            continue
        for a, b in EVACLIP_NAMES:
            k = k.replace(a, b)
        state[k] = v
    return state
