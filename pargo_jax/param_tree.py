"""Param trees as flat ``{"a/b/c": leaf}`` dicts: the one way every part of the code names a param.

Paths join the nested dict keys with ``/`` (``"projector/fc1_kernel"``, ``"llm/layers/attn/q/kernel"``);
anything that is not a mapping (arrays, ``nn.Partitioned`` boxes, labels) is a leaf.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a/b/c": leaf}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    """``{"a/b/c": leaf}`` -> nested dict."""
    tree: dict = {}
    for key, v in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def path_tree(tree: Mapping, prefix: str = "") -> dict:
    """The same tree (same structure, also when its keys already hold ``/``) with every leaf replaced
    by its ``"a/b/c"`` path."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        out[k] = path_tree(v, key) if isinstance(v, Mapping) else key
    return out


def flat_arrays(tree: Mapping) -> dict[str, Any]:
    """``flatten`` (a flat dict stays as it is) with every leaf as a host numpy array."""
    import numpy as np

    return {k: np.asarray(v) for k, v in flatten(tree).items()}
