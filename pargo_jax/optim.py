"""The optax chain: learning-rate schedules, clipping, and freeze / LR multiplier by regex over param paths.

A run says what trains with ``trainable = {regex: lr_multiplier}``; each regex is ``re.fullmatch``-ed
against a param's ``/``-joined path (``"projector/fc1_kernel"``, ``"llm/layers/attn/q/kernel"``). A
param takes the label of the FIRST regex that matches it, else ``"frozen"``. The optimizer is::

    masked(clip_by_global_norm(clip_norm), trainable)           # norm over trainable grads only
    multi_transform({
        (label, decay): adam(b1, b2, eps) [+ weight_decay * p] * -(schedule(step) * multiplier),
        "frozen": set_to_zero(),                                   # no optimizer state at all
    })

so a frozen 7B LLM costs no Adam moments. Weight decay (AdamW, scaled by the learning rate as in
``optax.adamw``) skips biases, norm scales and other vectors: a param is not decayed when it has
``ndim <= 1`` or when its leaf name contains ``bias``, ``scale`` or ``norm`` (the name rule is what
catches stacked-layer params of scanned modules, whose leading ``layers`` axis makes a bias 2-D).
Embeddings and query tokens are decayed.

The optimizer works on the *unboxed* param tree (``flax.linen.meta.unbox``), the tree the train state
holds. Gradient accumulation is the train step's business.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from pargo_jax.configs import check_keys
from pargo_jax.param_tree import path_tree

FROZEN = "frozen"

_DEFAULTS: dict[str, Any] = dict(
    lr=1e-4,
    warmup_steps=0,
    total_steps=None,
    schedule="cosine",
    min_lr_ratio=0.0,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    clip_norm=None,
    mu_dtype=None,
)
SCHEDULES = ("cosine", "linear", "constant")
_NO_DECAY = re.compile(r".*(bias|scale|norm).*", re.IGNORECASE)


def param_paths(tree):
    """The same tree with every leaf replaced by its ``"a/b/c"`` path (``nn.Partitioned`` unboxed)."""
    return path_tree(nn.meta.unbox(tree))


def trainable_labels(params, trainable: Mapping[str, float], strict: bool = True):
    """Tree of labels: each param's first fully-matching regex in ``trainable``, else ``"frozen"``.

    ``strict``: raise ValueError naming any regex that matches no param (a typo would silently freeze
    it); off when ``params`` is only part of the model."""
    patterns = [(p, re.compile(p)) for p in trainable]
    used: set[str] = set()

    def label(path: str) -> str:
        for p, rx in patterns:
            if rx.fullmatch(path):
                used.add(p)
                return p
        return FROZEN

    labels = jax.tree.map(label, param_paths(params))
    unused = [p for p, _ in patterns if p not in used]
    if unused and strict:
        some = sorted(jax.tree.leaves(param_paths(params)))[:8]
        raise ValueError(
            f"trainable regex(es) {unused} match no parameter path (re.fullmatch); fix the pattern. "
            f"Example paths: {some}"
        )
    return labels


def store_frozen(params, labels, dtype: str):
    """``params`` with every floating leaf labelled frozen stored in ``dtype`` (``model.frozen_dtype``):
    they get no gradient and no optimizer state, so bfloat16 halves their memory and nothing else."""
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"model.frozen_dtype={str(dtype)!r}; use 'float32', 'bfloat16' or 'float16'.")

    def store(p, lab):
        return p.astype(dtype) if lab == FROZEN and jnp.issubdtype(p.dtype, jnp.floating) else p

    return jax.tree.map(store, params, labels)


def trainable_mask(labels):
    """Tree of bools (True = trains) from :func:`trainable_labels` output."""
    return jax.tree.map(lambda lab: lab != FROZEN, labels)


def _options(optim_cfg) -> dict[str, Any]:
    cfg = dict(optim_cfg.to_dict() if hasattr(optim_cfg, "to_dict") else optim_cfg)
    check_keys(cfg, _DEFAULTS, "config.optim")
    return {**_DEFAULTS, **cfg}


def learning_rate_schedule(optim_cfg) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then ``schedule`` decay to
    ``lr * min_lr_ratio`` at ``total_steps`` (cosine or linear; ``constant`` stays at ``lr``)."""
    o = _options(optim_cfg)
    lr, warmup, total, kind = float(o["lr"]), int(o["warmup_steps"]), o["total_steps"], o["schedule"]
    if kind not in SCHEDULES:
        raise ValueError(f"optim.schedule={kind!r}; choose one of {SCHEDULES}.")
    if kind != "constant" and total is None:
        raise ValueError(f"optim.total_steps is required for the {kind!r} schedule.")
    total = int(total) if total is not None else warmup
    if kind != "constant" and total < warmup:
        raise ValueError(f"optim.total_steps={total} is smaller than warmup_steps={warmup}.")
    end = lr * float(o["min_lr_ratio"])
    span = max(total - warmup, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = lr * step / max(warmup, 1)
        t = jnp.clip((step - warmup) / span, 0.0, 1.0)
        if kind == "cosine":
            decayed = end + (lr - end) * 0.5 * (1.0 + jnp.cos(math.pi * t))
        elif kind == "linear":
            decayed = lr + (end - lr) * t
        else:
            decayed = jnp.full_like(t, lr)
        return jnp.where(step < warmup, warm, decayed)

    return schedule


def _decays(path: str, leaf) -> bool:
    return len(getattr(leaf, "shape", ())) > 1 and not _NO_DECAY.fullmatch(path.rsplit("/", 1)[-1])


def make_optimizer(optim_cfg, params, trainable: Mapping[str, float]):
    """``(optax.GradientTransformation, labels)``; see the module docstring. ``params`` may be concrete,
    abstract (``jax.ShapeDtypeStruct``) or ``nn.Partitioned``-boxed; the transformation itself expects
    the unboxed tree."""
    o = _options(optim_cfg)
    params = nn.meta.unbox(params)
    labels = trainable_labels(params, trainable)
    schedule = learning_rate_schedule(o)
    wd = float(o["weight_decay"])
    paths = param_paths(params)

    def group(lab: str, path: str, p) -> str:
        if lab == FROZEN:
            return FROZEN
        return f"{lab}|{'decay' if wd and _decays(path, p) else 'nodecay'}"

    groups = jax.tree.map(group, labels, paths, params)
    transforms: dict[str, optax.GradientTransformation] = {FROZEN: optax.set_to_zero()}
    for name in sorted(set(jax.tree.leaves(groups)) - {FROZEN}):
        lab, decay = name.rsplit("|", 1)
        mult = float(trainable[lab])
        chain = [optax.scale_by_adam(o["b1"], o["b2"], o["eps"], mu_dtype=o["mu_dtype"])]
        if decay == "decay":
            chain.append(optax.add_decayed_weights(wd))
        chain.append(optax.scale_by_learning_rate(lambda step, m=mult: schedule(step) * m))
        transforms[name] = optax.chain(*chain)
    parts = []
    if o["clip_norm"]:
        parts.append(optax.masked(optax.clip_by_global_norm(float(o["clip_norm"])), trainable_mask(labels)))
    parts.append(optax.multi_transform(transforms, groups))
    return optax.chain(*parts), labels
