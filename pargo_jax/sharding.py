"""Device mesh, logical-axis rules, and helpers to shard parameter trees.

Every module names its parameter and activation axes with the logical names below; the rules map them
onto mesh axes ``data``, ``fsdp`` and ``tensor``. Parameter axes:

  embed      model width of the LLM / vision tower / projector (FSDP-sharded)
  mlp        feed-forward hidden width (tensor-sharded)
  heads      attention heads (tensor-sharded); kv_heads likewise
  head_dim   per-head width (replicated)
  vocab      vocabulary (tensor-sharded)
  layers     stacked-layer axis of a scanned module (replicated)
  queries    learnable query tokens of a projector (replicated)
  norm       norm scales and biases (replicated)
  conv       patch-embedding kernel spatial / channel axes (replicated)

Activation axes: ``batch`` (data + fsdp), ``length`` and ``act_embed`` (replicated by default).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("queries", None),
    ("norm", None),
    ("conv", None),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)


def mesh_shape(spec: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves ``{data, fsdp, tensor}`` sizes (one may be -1 = fill) against ``num_devices``."""
    unknown = set(spec) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"Unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}.")
    sizes = [int(spec.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis may be -1 (fill), got {dict(zip(MESH_AXES, sizes))}.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if known <= 0 or num_devices % known:
            raise ValueError(
                f"Mesh {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices: "
                f"{num_devices} is not divisible by {known}."
            )
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f"Mesh {dict(zip(MESH_AXES, sizes))} has {int(np.prod(sizes))} devices but "
            f"{num_devices} are available; make the product equal or set one axis to -1."
        )
    return tuple(sizes)


def make_mesh(spec: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A mesh with Auto axes (what linen logical constraints expect) over ``devices`` (default: all)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(spec, len(devices))
    return jax.make_mesh(
        shape,
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def logical_shardings(abstract_tree, mesh: jax.sharding.Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a (possibly abstract) variable tree carrying ``nn.Partitioned`` metadata."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


BATCH_AXES = ("data", "fsdp")  # a batch's leading axis is split over these mesh axes


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    return jax.NamedSharding(mesh, jax.P(BATCH_AXES))


def batch_divisor(mesh: jax.sharding.Mesh) -> int:
    """A global batch must be a multiple of this (the data x fsdp mesh size)."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """This process's slice of a batch (numpy, leading batch axis) -> global jax.Arrays sharded over
    (data, fsdp); every process passes its own slice, in process order."""
    s = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(s, np.asarray(v)) for k, v in batch.items()}


def process_values(value) -> np.ndarray:
    """``value`` (a number or a fixed-shape array) of every process, stacked in process order."""
    if jax.process_count() == 1:
        return np.asarray(value)[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(value)))


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-process) global array as numpy, on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh):
    """Where models run: ``mesh`` set (flax >= 0.12.2 needs it for logical constraints) and the
    logical-axis rules active."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield
