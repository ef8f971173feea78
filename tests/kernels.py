"""Which attention kernel a model's calls pick on a GPU, traced on this CPU."""

from __future__ import annotations

import jax.numpy as jnp

from pargo_jax.models import attention


def record_kernels(monkeypatch, module, backend: str = "gpu") -> list[str]:
    """Replaces ``module.attention`` with one that appends the kernel each call would pick on
    ``backend`` to the returned list, and still runs XLA's kernel."""
    picked: list[str] = []

    def spy(q, k, v, mask=None, *, causal=False, implementation="xla"):
        shape = None if mask is None else jnp.shape(mask)
        picked.append(attention.choose_implementation(implementation, q.shape, k.shape, q.dtype, shape,
                                                      backend=backend))  # fmt: skip
        return attention.attention(q, k, v, mask, causal=causal, implementation="xla")

    monkeypatch.setattr(module, "attention", spy)
    return picked
