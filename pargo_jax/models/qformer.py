"""The BLIP-2 Q-Former, by the name stage-1 code imports it under. It lives with the projectors that
it is registered among (``"blip2"``): :mod:`pargo_jax.models.projectors.blip2` has the model and its
documentation; importing it from there first keeps the projector registry free of an import circle."""

from pargo_jax.models.projectors.blip2 import QFormer, QFormerConfig, QFormerLayer

__all__ = ["QFormer", "QFormerConfig", "QFormerLayer"]
