"""ParGo vision-language model config for transformers (written by ``python -m pargo_jax.export``)."""

from transformers import PretrainedConfig


class PargoConfig(PretrainedConfig):
    """``tower_config``: ``{"model_type": "siglip_vision_model" | "clip_vision_model" | "eva02",
    ...HF fields}`` (EVA02 adds ``attn_norm``, ``mlp_norm``, ``rope_ref_grid``) plus
    ``final_norm`` (apply the tower's post-layernorm to its last hidden state) and ``drop_cls``;
    ``projector_config``: ``{"name": "pargo" | "mlp", ...}`` (ParGo: ``hidden``, ``heads``, ``layers``,
    ``mlp_dim``, ``num_queries``, ``max_positions``, ``eps``, ``vision_eps``; masks are weights);
    ``lm_config``: an HF causal-LM config dict; ``image_token_id``: the placeholder the image tokens
    replace, one per token; ``num_image_tokens`` per image."""

    model_type = "pargo"

    def __init__(
        self,
        tower_config=None,
        projector_config=None,
        lm_config=None,
        image_token_id=0,
        num_image_tokens=0,
        **kwargs,
    ):
        self.tower_config = dict(tower_config or {})
        self.projector_config = dict(projector_config or {})
        self.lm_config = dict(lm_config or {})
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        super().__init__(**kwargs)
