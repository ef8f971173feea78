"""ParGo vision-language model in plain torch + transformers (written by ``python -m pargo_jax.export``).

tower (SigLIP / CLIP from transformers, or EVA02 written here) -> projector (ParGo with the release's
module names, or an MLP) -> image tokens spliced at ``image_token_id`` -> causal LM
(AutoModelForCausalLM). ParGo's attention masks (partial windows, cascade) are stored as buffers, so
this file holds no mask logic.
"""

import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_pargo import PargoConfig


def _attend(q, k, v, allowed, heads):
    """Multi-head attention with a boolean ``allowed`` (Q, K) mask; logits in float32."""
    b, n_q, width = q.shape
    d = width // heads
    split = lambda x: x.view(b, -1, heads, d).transpose(1, 2)
    q, k, v = split(q), split(k), split(v)
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(d)
    logits = logits.masked_fill(~allowed, torch.finfo(torch.float32).min)
    out = logits.softmax(-1).to(v.dtype) @ v
    return out.transpose(1, 2).reshape(b, n_q, width)


class _BertAttention(nn.Module):
    """``self.query/key/value`` + ``output.dense/LayerNorm`` (post-LN residual), as in BERT."""

    def __init__(self, hidden, kv_width, eps):
        super().__init__()
        self.self = nn.Module()
        self.self.query = nn.Linear(hidden, hidden)
        self.self.key = nn.Linear(kv_width, hidden)
        self.self.value = nn.Linear(kv_width, hidden)
        self.output = nn.Module()
        self.output.dense = nn.Linear(hidden, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, h, kv, allowed, heads):
        s = self.self
        ctx = _attend(s.query(h), s.key(kv), s.value(kv), allowed, heads)
        return self.output.LayerNorm(self.output.dense(ctx) + h)


class _Dense(nn.Module):
    """A module holding one ``dense`` Linear (BERT's ``intermediate_query`` naming)."""

    def __init__(self, width_in, width_out):
        super().__init__()
        self.dense = nn.Linear(width_in, width_out)


class _ParGoLayer(nn.Module):
    def __init__(self, hidden, mlp_dim, vision_width, eps):
        super().__init__()
        self.attention = _BertAttention(hidden, hidden, eps)
        self.crossattention = _BertAttention(hidden, vision_width, eps)
        self.intermediate_query = _Dense(hidden, mlp_dim)
        self.output_query = nn.Module()
        self.output_query.dense = nn.Linear(mlp_dim, hidden)
        self.output_query.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, h, feats, self_allowed, cross_allowed, heads):
        h = self.attention(h, h, self_allowed, heads)
        h = self.crossattention(h, feats, cross_allowed, heads)
        y = self.output_query.dense(nn.functional.gelu(self.intermediate_query.dense(h)))
        return self.output_query.LayerNorm(y + h)


class ParGoProjector(nn.Module):
    """ln_vision -> learnable partial + global queries (BERT post-LN layers: masked self-attention,
    masked cross-attention to the patches, FFN) -> llm_proj. Names follow the official checkpoint."""

    def __init__(self, c, vision_width, llm_width, num_patches):
        super().__init__()
        hidden, q = c["hidden"], c["num_queries"]
        self.heads = c["heads"]
        self.ln_vision = nn.LayerNorm(vision_width, eps=c["vision_eps"])
        self.query_tokens = nn.Parameter(torch.zeros(1, q, hidden))
        self.ParGo = nn.Module()
        self.ParGo.bert = nn.Module()
        emb = self.ParGo.bert.embeddings = nn.Module()
        emb.position_embeddings = nn.Embedding(c["max_positions"], hidden)
        emb.LayerNorm = nn.LayerNorm(hidden, eps=c["eps"])
        self.ParGo.bert.encoder = nn.Module()
        self.ParGo.bert.encoder.layer = nn.ModuleList(
            [_ParGoLayer(hidden, c["mlp_dim"], vision_width, c["eps"]) for _ in range(c["layers"])]
        )
        self.llm_proj = nn.Linear(hidden, llm_width)
        self.register_buffer("self_masks", torch.ones(c["layers"], q, q, dtype=torch.bool))
        self.register_buffer("cross_mask", torch.ones(q, num_patches, dtype=torch.bool))

    def forward(self, features):
        feats = self.ln_vision(features)
        emb = self.ParGo.bert.embeddings
        q = self.query_tokens.shape[1]
        h = emb.LayerNorm(self.query_tokens + emb.position_embeddings.weight[:q][None])
        h = h.expand(feats.shape[0], -1, -1)
        for i, layer in enumerate(self.ParGo.bert.encoder.layer):
            h = layer(h, feats, self.self_masks[i], self.cross_mask, self.heads)
        return self.llm_proj(h)


class MLPProjector(nn.Module):
    """LLaVA-1.5's MLP over groups of ``group`` adjacent patches (raster order)."""

    def __init__(self, c, vision_width, llm_width, num_patches):
        super().__init__()
        self.group = c.get("group", 1)
        self.fc1 = nn.Linear(vision_width * self.group, llm_width)
        self.fc2 = nn.Linear(llm_width, llm_width)

    def forward(self, features):
        b, n, width = features.shape
        x = features.reshape(b, n // self.group, self.group * width)
        return self.fc2(nn.functional.gelu(self.fc1(x)))


PROJECTORS = {"pargo": ParGoProjector, "mlp": MLPProjector}


def _eva_rope(head_dim, grid, ref_grid, like):
    """EVA02's 2-D RoPE (timm ``RotaryEmbeddingCat``, ``in_pixels=False``): (sin, cos) of (grid^2,
    head_dim), y bands then x bands, each angle used for one interleaved pair of channels."""
    bands = head_dim // 4
    freqs = 10000.0 ** -(torch.arange(bands, dtype=torch.float32) / bands)
    t = torch.arange(grid, dtype=torch.float32) / grid * ref_grid
    yx = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1)[..., None] * freqs  # (grid, grid, 2, bands)
    angles = yx.reshape(grid * grid, -1).repeat_interleave(2, -1).to(like.device)
    return angles.sin().to(like.dtype), angles.cos().to(like.dtype)


def _rotate_pairs(x, sin, cos):
    """x * cos + rot(x) * sin, rot turning each channel pair (a, b) into (-b, a)."""
    rot = torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
    return x * cos + rot * sin


class _Eva02Block(nn.Module):
    """Pre-LN block: attention (q / v bias, no k bias, RoPE on the patch tokens, optional LayerNorm
    before ``proj``) and SwiGLU (optional LayerNorm before ``fc2``), in timm's ``EvaBlock`` names."""

    def __init__(self, c):
        super().__init__()
        d, h, eps = c["hidden_size"], c["intermediate_size"], c["layer_norm_eps"]
        norm = lambda width, on: nn.LayerNorm(width, eps=eps) if on else nn.Identity()
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.attn = nn.Module()
        self.attn.q_proj, self.attn.v_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.attn.k_proj = nn.Linear(d, d, bias=False)
        self.attn.norm, self.attn.proj = norm(d, c["attn_norm"]), nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.fc1_g, self.mlp.fc1_x = nn.Linear(d, h), nn.Linear(d, h)
        self.mlp.norm, self.mlp.fc2 = norm(h, c["mlp_norm"]), nn.Linear(h, d)

    def forward(self, x, sin, cos, heads):
        a, m, y = self.attn, self.mlp, self.norm1(x)
        b, n, d = y.shape
        heads_first = lambda t: t.view(b, n, heads, d // heads).transpose(1, 2)
        q, k, v = heads_first(a.q_proj(y)), heads_first(a.k_proj(y)), heads_first(a.v_proj(y))
        q, k = (torch.cat([t[:, :, :1], _rotate_pairs(t[:, :, 1:], sin, cos)], 2) for t in (q, k))
        y = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + a.proj(a.norm(y))
        y = self.norm2(x)
        return x + m.fc2(m.norm(nn.functional.silu(m.fc1_g(y)) * m.fc1_x(y)))


class Eva02Tower(nn.Module):
    """EVA02-CLIP's vision tower in timm's ``Eva`` names: patch conv, CLS + absolute positions, the
    blocks, and the final ``norm`` only when the exported model applies it."""

    def __init__(self, c):
        super().__init__()
        d, patch = c["hidden_size"], c["patch_size"]
        self.heads, self.grid = c["num_attention_heads"], c["image_size"] // patch
        self.ref_grid = c["rope_ref_grid"]
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2 + 1, d))
        self.blocks = nn.ModuleList([_Eva02Block(c) for _ in range(c["num_hidden_layers"])])
        self.norm = nn.LayerNorm(d, eps=c["layer_norm_eps"]) if c["final_norm"] else None

    def forward(self, pixel_values):
        x = self.patch_embed.proj(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        sin, cos = _eva_rope(x.shape[-1] // self.heads, self.grid, self.ref_grid, x)
        for block in self.blocks:
            x = block(x, sin, cos, self.heads)
        return x if self.norm is None else self.norm(x)


class PargoForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = PargoConfig
    _no_split_modules = []

    def __init__(self, config: PargoConfig):
        super().__init__(config)
        from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

        v = dict(config.tower_config)
        self.final_norm, self.drop_cls = v["final_norm"], v.pop("drop_cls")
        kind = v.pop("model_type")
        if kind == "eva02":
            self.vision_tower = Eva02Tower(v)
        else:
            v.pop("final_norm")
            tower_cls, tower_cfg = {
                "siglip_vision_model": (SiglipVisionModel, SiglipVisionConfig),
                "clip_vision_model": (CLIPVisionModel, CLIPVisionConfig),
            }[kind]
            self.vision_tower = tower_cls(tower_cfg(**v))
        num_patches = (v["image_size"] // v["patch_size"]) ** 2
        text = AutoConfig.for_model(**config.lm_config)
        p = config.projector_config
        self.projector = PROJECTORS[p["name"]](p, v["hidden_size"], text.hidden_size, num_patches)
        self.language_model = AutoModelForCausalLM.from_config(text)
        self.post_init()

    def _init_weights(self, module):
        pass  # every weight comes from the exported checkpoint

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def image_tokens(self, pixel_values):
        """(B, 3, H, W) normalized pixels -> (B, T_img, D_llm)."""
        if isinstance(self.vision_tower, Eva02Tower):
            x = self.vision_tower(pixel_values)  # final norm included when applied
        else:
            x = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]
            if self.final_norm:
                x = self.vision_tower.post_layernorm(x)  # transformers >= 5 layout
        if self.drop_cls:
            x = x[:, 1:]
        return self.projector(x)

    def embed(self, input_ids, pixel_values=None):
        embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds
        tokens = self.image_tokens(pixel_values).to(embeds.dtype)
        is_image = input_ids == self.config.image_token_id
        return embeds.masked_scatter(
            is_image[..., None].expand_as(embeds), tokens.reshape(-1, tokens.shape[-1])
        )

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, labels=None, **kwargs):
        embeds = self.embed(input_ids, pixel_values)
        out = self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs
        )
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits, past_key_values=out.past_key_values)

    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):
        """New tokens only (the prompt is given as embeddings)."""
        embeds = self.embed(input_ids, pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        kwargs.setdefault("generation_config", self.generation_config)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
