"""Mesh construction and the single table that maps logical axis names to mesh axes.

The model tags every parameter with logical axis names (`nnx.Param(..., axes=("embed", "mlp"))`) and
activations with their own names (`constrain(x, ("activation_batch", "activation_length", "activation_embed"))`).
Only this file knows which mesh axis a logical name lands on, so changing the parallelism is a config
change, never a model change. A parameter dimension that its mesh axis does not divide stays replicated
over that axis; `undivided_params` names each one and the train state logs them at start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mhc_jax.config import MESH_AXES, Config, ConfigError, MeshConfig
from mhc_jax.engram.layer import table_shardings

log = logging.getLogger(__name__)

# Logical name -> mesh axis (or axes, or None for replicated). FSDP shards the "embed" dimension of
# every weight (ZeRO-3); tensor parallelism splits heads, MLP width and the vocabulary.
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    # Activations and batch arrays (every `constrain` call), named apart from the parameters' axes so that
    # what an activation is split over is decided here, not by reusing a parameter's name.
    "activation_batch": ("dcn_data", "data", "fsdp", "expert"),  # expert: data-parallel outside the routed experts
    "activation_length": None,
    "activation_embed": None,  # fsdp splits the batch of activations (it splits weights' embed dimension)
    "activation_streams": None,
    "activation_heads": "tensor",
    "activation_head_dim": None,
    "activation_mlp": "tensor",
    "activation_vocab": "tensor",
    # Parameters (`param(..., axes=...)`).
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "q_lora": None,  # MLA query latent (q_lora_rank): small, replicated
    "kv_lora": None,  # MLA compressed KV latent (kv_lora_rank): small, replicated
    "mlp": "tensor",
    "vocab": "tensor",
    "streams": None,  # the n residual streams: tiny, replicated
    "mhc": None,  # mHC/HC coefficient dimensions (n^2 + 2n): tiny, replicated
    "norm": None,
    "engram_rows": ("fsdp", "tensor"),  # engram.shard_axis ("auto": this), see rules_for()
    "engram_mem": None,
    "conv": None,
    "experts": "expert",  # the routed-expert dimension of DeepSeekMoE weights (expert parallelism, mhc_jax.model.moe)
    "moe_mlp": "tensor",  # one expert's hidden width
    "layers": None,  # the stacked-layer axis of model.scan_layers: every device holds every layer's shard
}


def rules_for(cfg: Config | None = None) -> dict[str, str | tuple[str, ...] | None]:
    """The rule table with the config's choices applied (where Engram rows go)."""
    rules = dict(LOGICAL_AXIS_RULES)
    if cfg is not None:
        if cfg.engram.shard_axis != "auto":  # "auto": the default rule, fsdp and tensor (checked by config.validate)
            rules["engram_rows"] = cfg.engram.shard_axis
    return rules


def logical_to_spec(axes: Sequence[str | None], rules: dict | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
    """("activation_batch", "activation_length", "vocab") -> PartitionSpec(("dcn_data", "data", "fsdp"), None,
    "tensor")...
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


def _shape(x: Any) -> tuple[int, ...]:
    """Shape of an array or of an abstract value (ShapeDtypeStruct from nnx.eval_shape)."""
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def param_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    axes = variable.get_metadata().get("axes")
    if axes is None:
        return (None,) * len(_shape(variable.get_value()))
    return tuple(axes)


def state_shardings(state: Any, mesh: Mesh, rules: dict | None = None) -> Any:
    """NamedShardings for an nnx.State (or any pytree of Variables) from their `axes` metadata."""

    def one(v: Any) -> NamedSharding:
        if isinstance(v, nnx.Variable):
            spec = logical_to_spec(param_axes(v), rules, mesh)
            return NamedSharding(mesh, _divisible_spec(spec, _shape(v.get_value()), mesh))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, axes: Sequence[str | None], rules: dict | None = None) -> jax.Array:
    """with_sharding_constraint by logical names under the current mesh; a no-op without one. A dimension
    its mesh axes do not divide is left replicated over them (e.g. the batch of 1 of generation on a
    data x fsdp mesh: asking to split it would make the partitioner replicate and re-split the tensor)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = _divisible_spec(logical_to_spec(axes, rules, mesh), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def resolve_mesh_shape(mc: MeshConfig, n_devices: int) -> tuple[int, ...]:
    sizes = [getattr(mc, axis) for axis in MESH_AXES]
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


def make_mesh(mc: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with axes (dcn_data, data, fsdp, tensor, expert), Auto axis types (sharding-constraint semantics).

    `devices` defaults to all devices; it may also be the devices of a TPU topology description (AOT
    compilation). Devices from several TPU slices (`slice_index`) are laid out with `dcn_data` across
    slices (data-centre network) and the other axes inside a slice (ICI), so only the data-parallel gradient
    reduction crosses slices; mesh.dcn_data must then equal the number of slices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mc, len(devices))
    types = (AxisType.Auto,) * len(MESH_AXES)
    slices = sorted({getattr(d, "slice_index", 0) or 0 for d in devices})
    if len(slices) > 1:
        if shape[0] != len(slices):
            raise ConfigError(f"mesh.dcn_data={mc.dcn_data} (resolved {shape[0]}) is not allowed: the devices "
                              f"span {len(slices)} slices, so mesh.dcn_data must be {len(slices)} (the other "
                              "axes stay inside one slice)")
        grid = mesh_utils.create_hybrid_device_mesh((1, *shape[1:]), (shape[0],) + (1,) * (len(shape) - 1), devices,
                                                    allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=types)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=types)
    if devices[0].platform == "tpu":
        # Physical (torus-aware) order, so that the inner axes are ICI neighbours.
        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError) as err:
            log.info("no torus-aware device order for mesh %s (%s); using the device list order", shape, err)
            grid = np.asarray(devices).reshape(shape)
        return Mesh(grid, MESH_AXES, axis_types=types)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=types)


# --------------------------------------------------------------------------------------------------
# The whole train state and the batch
# --------------------------------------------------------------------------------------------------


def param_rules(cfg: Config | None = None) -> dict[str, str | tuple[str, ...] | None]:
    """Rules for the parameters: `rules_for(cfg)`, except that with mesh.zero1 no parameter is split over
    `fsdp` (ZeRO-1: parameters replicated over fsdp, only the optimiser state is sharded; activations keep
    their rules)."""
    rules = rules_for(cfg)
    if cfg is None or not cfg.mesh.zero1:
        return rules

    def drop(target: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
        targets = tuple(t for t in ((target,) if isinstance(target, str) else tuple(target or ())) if t != "fsdp")
        return None if not targets else targets[0] if len(targets) == 1 else targets

    return {name: (target if name.startswith("activation_") else drop(target)) for name, target in rules.items()}


def train_state_shardings_of(state: Any, mesh: Mesh, cfg: Config | None = None) -> Any:
    """NamedShardings for `nnx.state((model, optimizer))` (real or abstract).

    Parameters follow their `axes` metadata through `param_rules(cfg)`; optimiser moments are OptVariables
    that carry a copy of their parameter's metadata (flax.nnx.Optimizer copies it), so they follow the same
    axes through the full rules (`rules_for(cfg)`: ZeRO-3/FSDP by default, and also under zero1); scalars
    (step, counts) are replicated. Engram tables go to host memory with engram.placement=host."""
    p_rules, o_rules = param_rules(cfg), rules_for(cfg)

    def one(v: Any) -> NamedSharding:
        if not isinstance(v, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        rules = o_rules if isinstance(v, nnx.training.optimizer.OptState) else p_rules
        spec = logical_to_spec(param_axes(v), rules, mesh)
        return NamedSharding(mesh, _divisible_spec(spec, _shape(v.get_value()), mesh))

    shardings = jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    if cfg is not None and cfg.engram.enabled and cfg.engram.placement == "device":
        warn_replicated_tables(state, shardings, mesh, cfg)
    if cfg is not None and cfg.engram.enabled and cfg.engram.placement == "host":
        shardings = table_shardings(state, shardings, cfg.engram)
    return shardings


def warn_replicated_tables(state: Any, shardings: Any, mesh: Mesh, cfg: Config) -> list[str]:
    """Logs (and returns) every device-placed Engram table whose rows are not split on a multi-device mesh,
    with the bytes each device then holds: engram.shard_axis names an axis of size 1 here (e.g. "tensor" on
    an FSDP mesh), or the rows do not divide it."""
    if mesh.size == 1:
        return []
    out = []
    flat_v, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, v), s in zip(flat_v, flat_s):
        if not isinstance(v, nnx.Param) or "engram_rows" not in param_axes(v) or not isinstance(s, NamedSharding):
            continue
        if s.spec and s.spec[0] is not None:
            continue
        shape = _shape(v.get_value())
        nbytes = int(np.prod(shape)) * np.dtype(v.get_value().dtype).itemsize
        msg = (f"Engram table {jax.tree_util.keystr(path)} {shape} is replicated: each of the {mesh.size} devices "
               f"holds all {nbytes / 2**20:.1f} MiB (and Adam moments, 3x) because engram.shard_axis="
               f"{cfg.engram.shard_axis!r} does not split it on mesh {dict(mesh.shape)}; use engram.shard_axis=auto, "
               f"an axis of size > 1 that divides its rows (engram.row_pad_multiple), or engram.placement=host")
        log.warning(msg)
        out.append(msg)
    return out


def train_state_shardings(model: nnx.Module, optimizer: nnx.Optimizer, mesh: Mesh, cfg: Config | None = None) -> Any:
    """Shardings for `nnx.state((model, optimizer))`; see `train_state_shardings_of`."""
    return train_state_shardings_of(nnx.state((model, optimizer)), mesh, cfg)


def undivided_params(state: Any, mesh: Mesh, cfg: Config | None = None) -> list[str]:
    """One line per variable dimension whose logical sharding was dropped because its mesh axis does not
    divide it, naming the variable, the dimension and the mesh axis (the dimension ends up replicated over
    that axis: harmless for test shapes, a memory problem for a large model)."""
    p_rules, o_rules = param_rules(cfg), rules_for(cfg)
    out = []
    flat, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for path, v in flat:
        if not isinstance(v, nnx.Variable):
            continue
        spec = logical_to_spec(param_axes(v), o_rules if isinstance(v, nnx.training.optimizer.OptState)
                               else p_rules, mesh)
        shape = _shape(v.get_value())
        kept = _divisible_spec(spec, shape, mesh)
        for i, (wanted, got) in enumerate(zip(spec, kept)):
            if wanted != got:
                names = (wanted,) if isinstance(wanted, str) else tuple(wanted)
                size = int(np.prod([mesh.shape[n] for n in names]))
                out.append(f"{jax.tree_util.keystr(path)} {shape}: dimension {i} ({shape[i]}) is not divisible by "
                           f"mesh axis {'x'.join(names)} ({size}), so it is replicated over it")
    return out


def batch_spec(ndim: int, mesh: Mesh | None = None) -> PartitionSpec:
    """(batch, length, rest replicated): every batch array is (B, T, ...) and split over the batch axes."""
    return logical_to_spec(("activation_batch", "activation_length", *([None] * (ndim - 2)))[:ndim], None, mesh)


def batch_ways(mesh: Mesh) -> int:
    """How many ways the batch dimension is split: the product of the mesh axes "activation_batch" maps to."""
    spec = batch_spec(2, mesh)
    names = (spec[0],) if isinstance(spec[0], str) else tuple(spec[0] or ())
    return int(np.prod([mesh.shape[n] for n in names])) if names else 1


def check_global_batch(rows: int, mesh: Mesh, grad_accum: int = 1) -> None:
    """Raises a clear error unless every micro-batch of the global batch splits evenly over the batch axes."""
    ways = batch_ways(mesh)
    if rows % grad_accum or (rows // grad_accum) % ways:
        raise ConfigError(f"data.batch_size={rows} with training.grad_accum={grad_accum} gives micro-batches of "
                         f"{rows / grad_accum:g} rows, which do not split over the {ways} ways of the batch mesh "
                         f"axes {batch_spec(2, mesh)[0]}; make data.batch_size a multiple of {ways * grad_accum}")


# Batch entries that are not (B, T, ...) rows: sparse Engram rows (L, R, D), which every device needs whole.
REPLICATED_BATCH_KEYS = ("engram_rows",)


def batch_shardings(batch_like: Any, mesh: Mesh) -> Any:
    """NamedShardings for a batch (dict of arrays / ShapeDtypeStructs of shape (B, T, ...), or one such
    leaf): rows over the batch axes (dcn_data, data, fsdp), everything else replicated. A ShapeDtypeStruct
    describes the global batch, so its rows are checked to split evenly (`check_global_batch`); concrete
    arrays may be one host's rows and are not checked. Entries named in REPLICATED_BATCH_KEYS are replicated."""
    if isinstance(batch_like, dict) and any(k in batch_like for k in REPLICATED_BATCH_KEYS):
        rows = {k: v for k, v in batch_like.items() if k not in REPLICATED_BATCH_KEYS}
        return {**batch_shardings(rows, mesh), **{k: NamedSharding(mesh, PartitionSpec())
                                                  for k in batch_like if k in REPLICATED_BATCH_KEYS}}

    def one(x: Any) -> NamedSharding:
        shape = _shape(x)
        if isinstance(x, jax.ShapeDtypeStruct) and shape:
            check_global_batch(shape[0], mesh)
        return NamedSharding(mesh, batch_spec(len(shape), mesh))

    return jax.tree.map(one, batch_like)


def global_batch(local_batch: Any, shardings: Any) -> Any:
    """Global arrays from this process's rows of the batch (`jax.make_array_from_process_local_data`); on
    one process the local batch is the global batch."""
    return jax.tree.map(lambda s, x: jax.make_array_from_process_local_data(s, np.asarray(x)), shardings,
                        local_batch)
