"""Weight conversion by tables: source-name regex -> our param path + transform.

A table is a list of :class:`Rule`. :func:`convert` walks every source tensor once, applies the first
rule whose pattern fully matches its name, and writes the (transformed) array at the target path.
Targets may carry ``[i]`` stack indices (``"layers/attn/q/kernel[3]"``, or ``"...kernel[3][1]"``
for a fused q/k/v axis after the layer axis) to assemble stacked tensors of scanned layers. At the
end every source tensor must be consumed (or matched by an ``ignore`` pattern) and every expected
parameter filled with the expected shape; otherwise one error lists every offending name.

Sources are read lazily (``LazySource``) one tensor at a time, and each finished parameter goes
through ``place`` (e.g. ``jax.device_put`` onto its target sharding), so a 7B model never needs two
host copies.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pargo_jax.param_tree import flatten, unflatten

Transform = Callable[[np.ndarray], np.ndarray]
_STACK = re.compile(r"^(.*?)((?:\[\d+\])+)$")


class ConversionError(ValueError):
    """A checkpoint does not match the model: lists every unused, missing or mis-shaped tensor."""


@dataclass(frozen=True)
class Rule:
    """``pattern`` fully matches a source name; ``target`` is formatted with the match groups."""

    pattern: str
    target: str
    transform: Transform | None = None

    def match(self, name: str) -> str | None:
        m = re.fullmatch(self.pattern, name)
        return None if m is None else self.target.format(*m.groups(), **m.groupdict())


# --- transforms ------------------------------------------------------------------------------------
def transpose(x: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> flax Dense kernel (in, out)."""
    return np.ascontiguousarray(x.T)


def split_heads_out(num_heads: int) -> Transform:
    """torch (H*D, in) -> flax DenseGeneral kernel (in, H, D)."""
    return lambda x: np.ascontiguousarray(x.T.reshape(x.shape[1], num_heads, -1))


def split_heads_bias(num_heads: int) -> Transform:
    """(H*D,) -> (H, D)."""
    return lambda x: x.reshape(num_heads, -1)


def merge_heads_in(num_heads: int) -> Transform:
    """torch (out, H*D) -> flax DenseGeneral kernel (H, D, out) contracting heads."""
    return lambda x: np.ascontiguousarray(x.T.reshape(num_heads, -1, x.shape[0]))


def conv_oihw_to_hwio(x: np.ndarray) -> np.ndarray:
    """torch Conv2d weight (out, in, kh, kw) -> flax Conv kernel (kh, kw, in, out)."""
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))


# --- sources ---------------------------------------------------------------------------------------
class LazySource(Mapping[str, np.ndarray]):
    """Read-only name -> numpy mapping over safetensors files (single or sharded with an index),
    loading each tensor only when accessed."""

    def __init__(self, files: Iterable[str]):
        from safetensors import safe_open

        self._where: dict[str, str] = {}
        self._handles = {}
        for f in files:
            h = safe_open(f, framework="numpy")
            self._handles[f] = h
            for k in h.keys():
                self._where[k] = f

    @classmethod
    def from_dir(cls, path: str) -> LazySource:
        """Opens ``model.safetensors`` or the shards named by ``model.safetensors.index.json``."""
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return cls(os.path.join(path, s) for s in shards)
        if os.path.exists(single):
            return cls([single])
        found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if found:
            return cls(os.path.join(path, f) for f in found)
        raise FileNotFoundError(
            f"No safetensors weights in {path!r}: expected model.safetensors or model.safetensors.index.json."
        )

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            t = self._handles[self._where[name]].get_tensor(name)
        except TypeError:  # bfloat16 is not a numpy dtype: go through torch-free ml_dtypes.
            t = _read_bf16(self._where[name], name)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _read_bf16(file: str, name: str) -> np.ndarray:
    import ml_dtypes
    from safetensors import safe_open

    with safe_open(file, framework="flax") as h:  # jax is installed; returns a jax array.
        return np.asarray(h.get_tensor(name)).astype(ml_dtypes.bfloat16)


# --- the converter ---------------------------------------------------------------------------------
def convert(
    source: Mapping[str, np.ndarray],
    rules: Iterable[Rule],
    expected: Mapping[str, tuple[int, ...]],
    *,
    ignore: Iterable[str] = (),
    place: Callable[[str, np.ndarray], object] | None = None,
    dtype: np.dtype | None = None,
    what: str = "checkpoint",
) -> dict:
    """Converts ``source`` with ``rules`` into a nested param dict whose flat paths and shapes are
    exactly ``expected`` ({"a/b": shape}). Raises :class:`ConversionError` listing every unused source
    tensor, every unfilled parameter and every shape mismatch."""
    rules = list(rules)
    ignore_re = [re.compile(p) for p in ignore]
    done: dict[str, object] = {}
    stacks: dict[str, dict[tuple[int, ...], np.ndarray]] = {}
    names: dict[tuple[str, tuple[int, ...]], str] = {}
    unused, bad_shape, duplicate = [], [], []
    for name in source:
        target = next((t for r in rules if (t := r.match(name)) is not None), None)
        if target is None:
            if not any(p.fullmatch(name) for p in ignore_re):
                unused.append(name)
            continue
        rule = next(r for r in rules if r.match(name) is not None)
        x = np.asarray(source[name])
        if rule.transform is not None:
            x = rule.transform(x)
        if dtype is not None:
            x = x.astype(dtype)
        stack = _STACK.match(target)
        if stack:
            path, idx = stack.group(1), tuple(int(i) for i in re.findall(r"\d+", stack.group(2)))
            if idx in stacks.setdefault(path, {}):
                duplicate.append(f"{name} -> {target}")
            stacks[path][idx] = x
            names[(path, idx)] = name
            continue
        if target in done:
            duplicate.append(f"{name} -> {target}")
        elif _check(target, x.shape, expected, bad_shape, name):
            done[target] = place(target, x) if place else x
    for path, parts in stacks.items():
        grid = tuple(max(i[d] for i in parts) + 1 for d in range(len(next(iter(parts)))))
        absent = [i for i in np.ndindex(*grid) if i not in parts]
        if absent:
            shown = ", ".join("".join(f"[{j}]" for j in i) for i in absent)
            bad_shape.append(f"{path}: stacked parts {shown} are missing")
            continue
        want = tuple(expected.get(path, ()))[len(grid) :]
        wrong = [f"{names[(path, i)]} has shape {parts[i].shape}, model expects {want}"
                 for i in np.ndindex(*grid) if expected.get(path) and parts[i].shape != want]  # fmt: skip
        if wrong:
            bad_shape.append(f"{path}: " + "; ".join(wrong))
            continue
        x = np.stack([parts[i] for i in np.ndindex(*grid)]).reshape(grid + parts[(0,) * len(grid)].shape)
        if _check(path, x.shape, expected, bad_shape, f"{path}{''.join(f'[0..{g - 1}]' for g in grid)}"):
            done[path] = place(path, x) if place else x
    missing = sorted(set(expected) - set(done) - {b.split(":")[0] for b in bad_shape})
    problems = []
    if unused:
        problems.append(f"{len(unused)} unused tensor(s) in the {what}: {', '.join(sorted(unused))}")
    if missing:
        problems.append(f"{len(missing)} parameter(s) not filled: {', '.join(missing)}")
    if bad_shape:
        problems.append(f"{len(bad_shape)} shape mismatch(es): {'; '.join(bad_shape)}")
    if duplicate:
        problems.append(f"{len(duplicate)} duplicate target(s): {'; '.join(duplicate)}")
    if problems:
        raise ConversionError(f"Cannot load the {what}: " + " | ".join(problems))
    return unflatten(done)


def _check(target, shape, expected, bad_shape, name) -> bool:
    if target not in expected:
        bad_shape.append(f"{target}: produced from {name} but the model has no such parameter")
        return False
    if tuple(shape) != tuple(expected[target]):
        want = tuple(expected[target])
        bad_shape.append(f"{target}: {name} has shape {tuple(shape)}, model expects {want}")
        return False
    return True


def expected_shapes(abstract_params: Mapping) -> dict[str, tuple[int, ...]]:
    """{"a/b": shape} from an (abstract, possibly ``nn.Partitioned``-boxed) param tree. Reads the boxes
    directly: ``nn.unbox`` would add sharding constraints, which fail under an active mesh."""
    from flax.core import meta

    return {
        k: tuple((v.unbox(apply_constraint=False) if isinstance(v, meta.AxisMetadata) else v).shape)
        for k, v in flatten(abstract_params).items()
    }


# --- torch files (.pt / .pth / .bin) ----------------------------------------------------------------
TORCH_EXTRA = (
    "pip install -r requirements-torch.txt (the CPU build: --index-url https://download.pytorch.org/whl/cpu)"
)


def read_torch_file(path: str) -> Mapping[str, Any]:
    """The tensor state dict in a torch pickle, memory-mapped where the format allows, unwrapped from
    the usual ``{"state_dict" | "model" | "model_ema" | "module": ...}`` wrappers. Needs torch (an extra
    of this package): one clear error without it, or for a file that holds more than tensors."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"Reading {path!r} needs PyTorch, which the core install leaves out: {TORCH_EXTRA}."
        ) from e
    try:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"Cannot read {path!r} as a tensor-only torch state dict ({e}); if you trust the file, load it "
            "yourself (torch.load(..., weights_only=False)) and pass the state dict."
        ) from e
    for key in ("model_ema", "model", "module", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    return state


class TorchSource(Mapping[str, np.ndarray]):
    """A torch state dict read as numpy one tensor at a time (bfloat16/float16 kept via ml_dtypes)."""

    def __init__(self, state: Mapping[str, Any]):
        self._state = state

    def __getitem__(self, name: str) -> np.ndarray:
        t = self._state[name]
        if isinstance(t, np.ndarray):
            return t
        import torch

        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)
