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

_STACK = re.compile(r"^(.*?)((?:\[\d+\])+)$")
_STACK_TEMPLATE = re.compile(r"^(.*?)((?:\[(?:\{\d+\}|\d+)\])+)$")  # a rule's target: [{0}] or [1]


class ConversionError(ValueError):
    """A checkpoint does not match the model: lists every unused, missing or mis-shaped tensor."""


@dataclass(frozen=True)
class Rule:
    """``pattern`` fully matches a source name; ``target`` is formatted with the match groups."""

    pattern: str
    target: str
    transform: Transform | None = None
    exported: bool = True  # False for an alias of another rule's source name (import only)

    def match(self, name: str) -> str | None:
        m = re.fullmatch(self.pattern, name)
        return None if m is None else self.target.format(*m.groups(), **m.groupdict())


# --- transforms (each with its inverse, so a table also exports) -------------------------------------
@dataclass(frozen=True)
class Transform:
    """``forward``: source tensor -> our param; ``inverse``: back (export)."""

    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.forward(np.asarray(x)))

    def back(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.inverse(np.asarray(x)))


def reshape(source_shape: tuple[int, ...] | Callable, ours: tuple[int, ...] | Callable) -> Transform:
    """A pure reshape between a source shape and ours (each a tuple, or a function of the array)."""
    shape = lambda s, x: s(x) if callable(s) else s
    return Transform(lambda x: x.reshape(shape(ours, x)), lambda x: x.reshape(shape(source_shape, x)))


transpose = Transform(lambda x: x.T, lambda x: x.T)  # torch Linear (out, in) <-> flax kernel (in, out)
conv_oihw_to_hwio = Transform(lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))


def split_heads_out(num_heads: int) -> Transform:
    """torch (H*D, in) <-> flax DenseGeneral kernel (in, H, D)."""
    return Transform(lambda x: x.T.reshape(x.shape[1], num_heads, -1), lambda x: x.reshape(x.shape[0], -1).T)


def split_heads_bias(num_heads: int) -> Transform:
    """(H*D,) <-> (H, D)."""
    return Transform(lambda x: x.reshape(num_heads, -1), lambda x: x.reshape(-1))


def merge_heads_in(num_heads: int) -> Transform:
    """torch (out, H*D) <-> flax DenseGeneral kernel (H, D, out) contracting heads."""
    return Transform(lambda x: x.T.reshape(num_heads, -1, x.shape[0]), lambda x: x.reshape(-1, x.shape[-1]).T)


def linear_to(shape: tuple[int, ...], num_in: int) -> Transform:
    """torch Linear (out, in) <-> our kernel of ``shape`` whose first ``num_in`` axes are the input."""
    return Transform(lambda x: x.T.reshape(shape), lambda x: x.reshape(int(np.prod(shape[:num_in])), -1).T)


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


# --- export: a table read backwards ------------------------------------------------------------------
def source_name(pattern: str, groups: tuple) -> str:
    """The source name ``pattern`` matches with its capture groups set to ``groups``: groups and
    escapes are filled in, a non-capturing ``(?:a|b)`` becomes its first alternative, ``(?:a)?``
    nothing."""
    out, i, g = [], 0, iter(groups)
    while i < len(pattern):
        if pattern.startswith("(?:", i):
            depth, j = 1, i + 3
            while depth:
                depth += {"(": 1, ")": -1}.get(pattern[j], 0)
                j += 1
            if pattern.startswith("?", j):
                j += 1
            else:
                out.append(source_name(pattern[i + 3 : j - 1].split("|")[0], ()))
            i = j
        elif pattern[i] == "(":
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(pattern[j], 0)
                j += 1
            out.append(str(next(g)))
            i = j
        elif pattern[i] == "\\":
            out.append(pattern[i + 1])
            i += 2
        else:
            out.append(pattern[i])
            i += 1
    return "".join(out)


def export(
    params: Mapping[str, np.ndarray], rules: Iterable[Rule], *, what: str = "model"
) -> dict[str, np.ndarray]:
    """Our flat params (``{"a/b": array}``) -> source tensors by the rules read backwards: each rule's
    target template is matched against our paths (``{k}`` in a path is a group, ``[{k}]`` a stacked
    axis, ``[j]`` a fixed index), the tensor is cut out, inverse-transformed and named by the
    pattern. Raises :class:`ConversionError` naming any param no rule exports."""
    params = {k: np.asarray(v) for k, v in params.items()}
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for rule in rules:
        if not rule.exported:
            continue
        m = _STACK_TEMPLATE.match(rule.target)
        path_t, stack = (m.group(1), re.findall(r"\[([^\]]*)\]", m.group(2))) if m else (rule.target, [])
        path_re = re.compile(re.sub(r"\\\{(\d+)\\\}", r"(?P<g\1>[^/]+)", re.escape(path_t)))
        for path, value in params.items():
            hit = path_re.fullmatch(path)
            if hit is None:
                continue
            fixed = {int(k[1:]): v for k, v in hit.groupdict().items()}
            axes = [int(t[1:-1]) for t in stack if t.startswith("{")]
            for idx in np.ndindex(*value.shape[: len(axes)]):
                groups, x, it = dict(fixed), value, iter(idx)
                for t in stack:
                    if t.startswith("{"):
                        groups[int(t[1:-1])] = j = next(it)
                    else:
                        j = int(t)
                    x = x[j]
                name = source_name(rule.pattern, tuple(groups[k] for k in sorted(groups)))
                if not re.fullmatch(rule.pattern, name):  # a path group the pattern does not allow
                    break
                used.add(path)
                out[name] = rule.transform.back(x) if rule.transform else np.ascontiguousarray(x)
    missing = sorted(set(params) - used)
    if missing:
        raise ConversionError(f"Cannot export the {what}: no rule exports {', '.join(missing)}.")
    return out


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


def save_safetensors(
    path: str, tensors: Mapping[str, np.ndarray], max_shard_bytes: int = 2 << 30
) -> list[str]:
    """``tensors`` as ``model.safetensors``, or as shards + ``model.safetensors.index.json`` (the HF
    layout :meth:`LazySource.from_dir` reads) when larger than ``max_shard_bytes``. Returns the files."""
    from safetensors.numpy import save_file

    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        x = np.ascontiguousarray(tensors[name])
        if current and size + x.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = x, size + x.nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"))
        return ["model.safetensors"]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards, strict=True):
        save_file(shard, os.path.join(path, file))
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(x.nbytes for x in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": int(total)}, "weight_map": weight_map}, f, indent=2)
    return files
