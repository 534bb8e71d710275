"""Ahead-of-time fit report: compile the real sharded train step for a TPU topology on this (CPU) host.

    python -m mhc_jax.aot --config configs/paper/mhc_27b.yaml --topology v4:8x8x4

needs libtpu (`pip install -e ".[tpu]"`), not a TPU. The model is built abstractly (`nnx.eval_shape`), so a
27B model never materialises on the host. The report (printed, and written as JSON) gives per-device HBM use
(`compiled.memory_analysis()`: arguments, temporaries, outputs), whether that fits the chip, the compiled
FLOPs per step (`compiled.cost_analysis()`) next to the closed-form model FLOPs (mhc_jax.flops), and the mesh.
A program that does not fit fails to compile with RESOURCE_EXHAUSTED; that is reported as "does not fit"
with the bytes the compiler asked for.

Topology names are libtpu's: `v4:4x4x4`, `v5e:16x16`, `v5p:8x8x8`, `v6e:16x16` (chips per dimension).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import jax
from flax import nnx

from mhc_jax.config import load_config
from mhc_jax.data import batch_spec
from mhc_jax.flops import model_flops_per_token
from mhc_jax.model import active_param_count
from mhc_jax.sharding import (MESH_AXES, batch_shardings, check_global_batch, make_mesh, resolve_mesh_shape,
                              undivided_params)
from mhc_jax.train.state import abstract_train_state
from mhc_jax.train.step import make_sharded_step
from mhc_jax.cli import entry_point, exit_process
from mhc_jax.errors import ConfigError

GiB = 2**30

# HBM per chip by the device_kind libtpu reports. Sources (Cloud TPU docs, "System architecture" pages):
# v4 32 GiB HBM2 per chip, 2 TensorCores; v5e 16 GiB, 1 TensorCore; v5p 95 GiB, 2 TensorCores; v6e
# (Trillium) 32 GiB, 1 TensorCore. v4 and v5p run in megacore mode: the chip's two TensorCores are ONE JAX
# device with the whole HBM (as MaxText's train_compile topologies declare), so `tpu_topology` asks libtpu
# for chip_config_name="megacore" there (v4:2x2x1 is then 4 devices, not 8 TensorCore devices).
#   https://cloud.google.com/tpu/docs/v4  https://cloud.google.com/tpu/docs/v5e
#   https://cloud.google.com/tpu/docs/v5p  https://cloud.google.com/tpu/docs/v6e
TPU_CHIPS: dict[str, tuple[str, float]] = {
    "TPU v4": ("v4", 32.0),
    "TPU v5 lite": ("v5e", 16.0),
    "TPU v5e": ("v5e", 16.0),
    "TPU v5": ("v5p", 95.0),
    "TPU v5p": ("v5p", 95.0),
    "TPU v6 lite": ("v6e", 32.0),
    "TPU v6e": ("v6e", 32.0),
}


@dataclass
class FitReport:
    config: str
    topology: str
    device_kind: str
    generation: str
    n_devices: int
    n_chips: int
    devices_per_chip: int
    hbm_per_chip_gib: float
    hbm_per_device_gib: float
    # What the compiler lets one program use on one device (HBM minus the runtime's reserve), read from
    # the device itself (see `usable_hbm_bytes`); the verdict compares against it.
    hbm_usable_per_device_gib: float
    mesh: dict[str, int]
    zero1: bool
    params: int
    global_batch: int
    seq_len: int
    grad_accum: int
    remat: str
    dtype: str
    fits: bool
    verdict: str
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    total_bytes_per_device: int = 0
    # Host memory per device (engram.placement=host tables and their Adam moments), outside the HBM total.
    host_bytes_per_device: int = 0
    needed_bytes_per_device: int = 0  # from a RESOURCE_EXHAUSTED message
    compiled_flops_per_device: float = 0.0
    compiled_flops_per_step: float = 0.0
    model_flops_per_token: float = 0.0
    model_flops_per_step: float = 0.0
    compiled_over_model_flops: float = 0.0
    lower_seconds: float = 0.0
    compile_seconds: float = 0.0
    replicated_by_divisibility: list[str] = field(default_factory=list)
    active_params: int = 0  # per token (mhc_jax.model.active_param_count): MoE's chosen experts, no lookups
    error: str = ""


MEGACORE_GENERATIONS = ("v4", "v5p")  # two TensorCores per chip, run as one device


def tpu_topology(name: str, num_slices: int = 1) -> Any:
    """libtpu's description of a TPU topology (no TPU needed), as it runs: v4 / v5p in megacore mode (one
    device per chip). Raises a clear error without libtpu."""
    try:
        import libtpu  # noqa: F401
    except ImportError as err:
        raise ConfigError("the AOT report needs libtpu: pip install -e \".[tpu]\"") from err
    from jax.experimental import topologies

    kwargs: dict[str, Any] = {"num_slices": num_slices} if num_slices > 1 else {}
    if name.split(":")[0] in MEGACORE_GENERATIONS:
        kwargs["chip_config_name"] = "megacore"
    try:
        return topologies.get_topology_desc(name, "tpu", **kwargs)
    except Exception as err:  # noqa: BLE001 - libtpu rejects unknown names with assorted error types
        raise ConfigError(f"--topology {name!r} is not a TPU topology libtpu knows ({' '.join(str(err).split())[:200]}); "
                          f"use e.g. v4:2x2x1, v5e:4x4, v5p:2x2x1") from err


_AVAILABLE = re.compile(r"(?:exceeds available HBM \(|\sof\s+)([0-9.]+)([KMGT]?)(?:\)|\s+hbm)", re.IGNORECASE)


def usable_hbm_bytes(device: Any) -> int:
    """HBM one program may use on `device`, as the TPU compiler knows it. libtpu's compile-only devices have
    no memory_stats(), so a deliberately oversized 1 TiB program is compiled and the capacity read from its
    RESOURCE_EXHAUSTED message ("... exceeds available HBM (30.75G)"). 0 if the message does not say."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    one = NamedSharding(Mesh(np.asarray([device]), ("d",)), PartitionSpec())
    huge = jax.ShapeDtypeStruct((2**38,), jnp.float32, sharding=one)
    try:
        jax.jit(lambda x: x * 2, out_shardings=one).lower(huge).compile()
    except Exception as err:  # noqa: BLE001 - the out-of-memory message is the measurement
        m = _AVAILABLE.search(str(err))
        return int(float(m.group(1)) * _UNITS[m.group(2).upper()]) if m else 0
    return 0


def chip_info(device_kind: str) -> tuple[str, float]:
    if device_kind not in TPU_CHIPS:
        raise ValueError(f"unknown TPU device kind {device_kind!r}; known: {sorted(TPU_CHIPS)}")
    return TPU_CHIPS[device_kind]


def n_chips_of(topology: str, num_slices: int = 1) -> int:
    dims = topology.split(":")[-1].split("_")[0]
    return num_slices * math.prod(int(d) for d in dims.split("x"))


_NEEDED = re.compile(r"Used\s+([0-9.]+)([KMGT]?)\s+of\s+([0-9.]+)([KMGT]?)\s+hbm", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


_REQUIRED = re.compile(r"required for [^(]*\(([0-9.]+)([KMGT]?)\) exceeds available HBM", re.IGNORECASE)


def needed_bytes(message: str) -> int:
    """The HBM bytes a RESOURCE_EXHAUSTED compile error says the program needs (0 if not stated). libtpu
    words it as "Used 20.50G of 15.48G hbm" or "memory required for HLO temporaries (1.28T) exceeds
    available HBM (15.75G)"."""
    m = _NEEDED.search(message) or _REQUIRED.search(message)
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()]) if m else 0


def with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings` for every leaf of `tree` (nnx Variables keep their type)."""

    def one(x: Any, s: Any) -> Any:
        if isinstance(x, nnx.Variable):
            v = x.get_value()
            return x.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(one, tree, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def compile_train_step(cfg: Any, devices: Any) -> tuple[Any, Any, dict[str, float]]:
    """Lowers and compiles `make_sharded_step` for `devices` (real, or a topology's). Returns (compiled,
    mesh, {"lower": s, "compile": s}); compile errors propagate."""
    mesh = make_mesh(cfg.mesh, devices)
    check_global_batch(cfg.data.batch_size, mesh, cfg.training.grad_accum)
    graphdef, state, state_sh = abstract_train_state(cfg, mesh)
    batch = batch_spec(cfg)
    batch_sh = batch_shardings(batch, mesh)
    step = make_sharded_step(graphdef, state_sh, batch_sh, cfg.training.grad_accum)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = step.lower(with_shardings(state, state_sh), with_shardings(batch, batch_sh))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, mesh, {"lower": t1 - t0, "compile": t2 - t1}


def for_tpu(cfg: Any) -> Any:
    """dtype 'auto' means float32 on this CPU host; the report is for TPUs, where it means bfloat16."""
    return cfg.replace(model={"dtype": "bfloat16"}) if cfg.model.dtype == "auto" else cfg


def fit_report(cfg: Any, topology: str, num_slices: int = 1, config_name: str = "") -> FitReport:
    cfg = for_tpu(cfg)
    topo = tpu_topology(topology, num_slices)
    devices = list(topo.devices)
    kind = devices[0].device_kind
    generation, hbm_chip = chip_info(kind)
    chips = n_chips_of(topology, num_slices)
    per_chip = max(len(devices) // chips, 1)  # 1 for every generation (megacore on v4 / v5p)
    hbm_device = hbm_chip / per_chip * GiB
    usable = usable_hbm_bytes(devices[0]) or hbm_device
    mesh_shape = dict(zip(MESH_AXES, resolve_mesh_shape(cfg.mesh, len(devices))))
    mesh = make_mesh(cfg.mesh, devices)
    _, abstract, _ = abstract_train_state(cfg, mesh)
    n_params = sum(math.prod(v.get_value().shape) for v in jax.tree.leaves(
        abstract, is_leaf=lambda x: isinstance(x, nnx.Variable)) if isinstance(v, nnx.Param))
    tokens = cfg.data.batch_size * cfg.data.seq_len
    mft = model_flops_per_token(cfg)
    report = FitReport(
        config=config_name, topology=topology + (f" x{num_slices} slices" if num_slices > 1 else ""),
        device_kind=kind, generation=generation, n_devices=len(devices), n_chips=chips,
        devices_per_chip=per_chip, hbm_per_chip_gib=hbm_chip, hbm_per_device_gib=hbm_device / GiB,
        hbm_usable_per_device_gib=usable / GiB,
        mesh=mesh_shape, zero1=cfg.mesh.zero1, params=int(n_params), global_batch=cfg.data.batch_size,
        seq_len=cfg.data.seq_len, grad_accum=cfg.training.grad_accum, remat=cfg.training.remat,
        dtype=cfg.model.dtype, fits=False, verdict="", model_flops_per_token=mft, model_flops_per_step=mft * tokens)
    report.replicated_by_divisibility = undivided_params(abstract, mesh, cfg)
    report.active_params = active_param_count(cfg)
    try:
        compiled, _, times = compile_train_step(cfg, devices)
    except Exception as err:  # noqa: BLE001 - the compiler's out-of-memory is a result, not a crash
        msg = str(err)
        if "RESOURCE_EXHAUSTED" not in msg and "Ran out of memory" not in msg:
            raise
        report.needed_bytes_per_device = needed_bytes(msg)
        report.error = msg[:2000]
        report.verdict = (f"does not fit: the compiler needs {report.needed_bytes_per_device / GiB:.2f} GiB per "
                          f"device of {usable / GiB:.2f} GiB usable" if report.needed_bytes_per_device
                          else "does not fit (RESOURCE_EXHAUSTED)")
        return report
    report.lower_seconds, report.compile_seconds = times["lower"], times["compile"]
    mem = compiled.memory_analysis()
    report.argument_bytes = int(mem.argument_size_in_bytes)
    report.output_bytes = int(mem.output_size_in_bytes)
    report.alias_bytes = int(mem.alias_size_in_bytes)
    report.temp_bytes = int(mem.temp_size_in_bytes)
    report.code_bytes = int(mem.generated_code_size_in_bytes)
    # Donated outputs reuse their argument buffers (alias), so they are not counted twice.
    report.total_bytes_per_device = (report.argument_bytes + report.output_bytes - report.alias_bytes
                                     + report.temp_bytes + report.code_bytes)
    report.host_bytes_per_device = int(mem.host_argument_size_in_bytes + mem.host_output_size_in_bytes
                                       - mem.host_alias_size_in_bytes + mem.host_temp_size_in_bytes)
    report.fits = report.total_bytes_per_device <= usable
    report.verdict = (f"{'fits' if report.fits else 'does not fit'}: "
                      f"{report.total_bytes_per_device / GiB:.2f} GiB per device of {usable / GiB:.2f} GiB usable "
                      f"({hbm_device / GiB:.0f} GiB HBM per device)")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report.compiled_flops_per_device = float(cost.get("flops", 0.0))
    # XLA's cost analysis counts a loop body once: the grad_accum micro-batch scan runs it grad_accum times.
    # With model.scan_layers the layer scan's body (one layer per run) is counted once too, so the compiled
    # count is then no measure of the step (compiled/model is left at 0 = not comparable).
    report.compiled_flops_per_step = report.compiled_flops_per_device * len(devices) * cfg.training.grad_accum
    if report.model_flops_per_step and not cfg.model.scan_layers:
        report.compiled_over_model_flops = report.compiled_flops_per_step / report.model_flops_per_step
    return report


def format_report(r: FitReport) -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in r.mesh.items())
    lines = [
        f"config {r.config}  topology {r.topology} ({r.device_kind}: {r.n_chips} chips, {r.n_devices} devices, "
        f"{r.hbm_per_device_gib:.0f} GiB HBM per device, {r.hbm_usable_per_device_gib:.2f} GiB usable)",
        f"mesh {mesh}{'  zero1' if r.zero1 else ''}",
        f"model {r.params / 1e6:.1f}M params ({r.active_params / 1e6:.1f}M active), batch {r.global_batch} x {r.seq_len} tokens, grad_accum "
        f"{r.grad_accum}, remat {r.remat}, dtype {r.dtype}",
        f"HBM per device: arguments {r.argument_bytes / GiB:.2f} GiB, outputs {r.output_bytes / GiB:.2f} GiB "
        f"(aliased {r.alias_bytes / GiB:.2f}), temporaries {r.temp_bytes / GiB:.2f} GiB, code "
        f"{r.code_bytes / 2**20:.1f} MiB -> total {r.total_bytes_per_device / GiB:.2f} GiB"
        + (f"; host memory {r.host_bytes_per_device / GiB:.3f} GiB" if r.host_bytes_per_device else ""),
        f"verdict: {r.verdict}",
        f"FLOPs per step: compiled {r.compiled_flops_per_step:.3e} ({r.compiled_flops_per_device:.3e} per device and "
        f"micro-batch, x{r.grad_accum} micro-batches; includes remat recompute), "
        f"model {r.model_flops_per_step:.3e} ({r.model_flops_per_token:.3e} per token); compiled/model "
        + (f"{r.compiled_over_model_flops:.2f}" if r.compiled_over_model_flops else "n/a (scanned layers: XLA "
           "counts a loop body once)"),
        f"compile time: lower {r.lower_seconds:.1f} s, compile {r.compile_seconds:.1f} s (this host)",
    ]
    if r.replicated_by_divisibility:
        lines.append(f"WARNING: {len(r.replicated_by_divisibility)} arrays replicated because a mesh axis does "
                     f"not divide them, e.g. {r.replicated_by_divisibility[0]}")
    return "\n".join(lines)


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (path or name under configs/)")
    parser.add_argument("--topology", required=True, help="libtpu topology, e.g. v4:4x4x4, v5e:16x16, v5p:8x8x8")
    parser.add_argument("--num-slices", type=int, default=1, help="multi-slice: slices joined over DCN")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override (repeatable)")
    parser.add_argument("--json", default="", help="where to write the JSON report "
                        "(default benchmarks/results/aot/<config>_<topology>.json)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    name = os.path.splitext(os.path.basename(args.config))[0]
    report = fit_report(cfg, args.topology, args.num_slices, config_name=name)
    print(format_report(report))
    path = args.json or os.path.join("benchmarks", "results", "aot",
                                     f"{name}_{re.sub(r'[^A-Za-z0-9]+', '-', args.topology)}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({**asdict(report), "command": " ".join(["python -m mhc_jax.aot"] + (argv or sys.argv[1:]))},
                  f, indent=2)
    print(f"wrote {path}")
    return 0 if report.fits else 1


if __name__ == "__main__":
    exit_process(main())
