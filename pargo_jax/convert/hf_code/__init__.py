"""Custom-code files copied into an exported transformers directory (plain torch + transformers; no
pargo_jax import): ``configuration_pargo.py`` and ``modeling_pargo.py``."""
