"""Mesh construction and the single table that maps logical axis names to mesh axes.

The model tags every parameter with logical axis names (`nnx.Param(..., axes=("embed", "mlp"))`) and
activations with `constrain(x, ("batch", "length", "embed"))`. Only this file knows which mesh axis a
logical name lands on, so changing the parallelism is a config change, never a model change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mhc_jax.config import Config, ConfigError, MeshConfig

MESH_AXES: tuple[str, ...] = ("dcn_data", "data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes, or None for replicated). FSDP shards the "embed" dimension of
# every weight (ZeRO-3); tensor parallelism splits heads, MLP width and the vocabulary.
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("dcn_data", "data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "streams": None,  # the n residual streams: tiny, replicated
    "mhc": None,  # mHC/HC coefficient dimensions (n^2 + 2n): tiny, replicated
    "norm": None,
    "engram_rows": "tensor",  # replaced by engram.shard_axis, see rules_for()
    "engram_mem": None,
    "conv": None,
}


def rules_for(cfg: Config | None = None) -> dict[str, str | tuple[str, ...] | None]:
    """The rule table with the config's choices applied (where Engram rows go)."""
    rules = dict(LOGICAL_AXIS_RULES)
    if cfg is not None:
        axis = cfg.engram.shard_axis
        if axis not in MESH_AXES:
            raise ConfigError(f"engram.shard_axis={axis!r} is not allowed: must be one of {MESH_AXES}")
        rules["engram_rows"] = axis
    return rules


def logical_to_spec(axes: Sequence[str | None], rules: dict | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
    """("batch", "length", "embed") -> PartitionSpec(("dcn_data", "data", "fsdp"), None, "fsdp")...
    A mesh axis is used at most once per array; mesh axes of size 1 are dropped (cleaner specs)."""
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
        target = rules[name]
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        if mesh is not None:
            targets = tuple(t for t in targets if mesh.shape.get(t, 1) > 1)
        targets = tuple(t for t in targets if t not in used)
        used.update(targets)
        out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*out)


def _divisible_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes that do not divide the array dimension (small test shapes on big meshes)."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        out.append(entry if dim % size == 0 else None)
    return PartitionSpec(*out)


def param_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    axes = variable.get_metadata().get("axes")
    if axes is None:
        return (None,) * np.ndim(variable[...])
    return tuple(axes)


def state_shardings(state: Any, mesh: Mesh, rules: dict | None = None) -> Any:
    """NamedShardings for an nnx.State (or any pytree of Variables) from their `axes` metadata."""

    def one(v: Any) -> NamedSharding:
        if isinstance(v, nnx.Variable):
            spec = logical_to_spec(param_axes(v), rules, mesh)
            return NamedSharding(mesh, _divisible_spec(spec, np.shape(v[...]), mesh))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, axes: Sequence[str | None], rules: dict | None = None) -> jax.Array:
    """with_sharding_constraint by logical names under the current mesh; a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(axes, rules, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def resolve_mesh_shape(mc: MeshConfig, n_devices: int) -> tuple[int, ...]:
    sizes = [mc.dcn_data, mc.data, mc.fsdp, mc.tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes multiply to {known}, "
                              f"which does not divide the {n_devices} devices")
        sizes[sizes.index(-1)] = n_devices // known
    if int(np.prod(sizes)) != n_devices:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} multiplies to {int(np.prod(sizes))} but there "
                          f"are {n_devices} devices; make the product match or set one axis to -1")
    return tuple(sizes)


def make_mesh(mc: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (dcn_data, data, fsdp, tensor), Auto axis types (sharding-constraint semantics)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mc, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
