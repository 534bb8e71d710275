"""Multi-process start-up: joining a `jax.distributed` job, from flags, environment variables or the
cluster's own auto-detection, and the few helpers every multi-process code path needs.

A job of N processes (one per TPU VM host, one per GPU node, or several on one machine) is joined by

    --coordinator HOST:PORT --num-processes N --process-id I        (train.py, mhc_jax.evaluate, mhc_jax.generate)
    MHC_JAX_COORDINATOR=HOST:PORT MHC_JAX_NUM_PROCESSES=N MHC_JAX_PROCESS_ID=I   (the same, as environment)

(flags win over the environment; JAX's own JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID are
read too). Without them, `jax.distributed.initialize()` auto-detects Cloud TPU pods, SLURM and Open MPI when
the environment says this is one process of several; a plain single-host run never initialises. On CPU the
cross-process collectives use gloo (JAX's CPU default has none).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mhc_jax.errors import ConfigError

log = logging.getLogger(__name__)

# Environment variables of an explicit launch (MHC_JAX_* first, then JAX's names for the same thing).
ENV_COORDINATOR = ("MHC_JAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS")
ENV_NUM_PROCESSES = ("MHC_JAX_NUM_PROCESSES", "JAX_NUM_PROCESSES")
ENV_PROCESS_ID = ("MHC_JAX_PROCESS_ID", "JAX_PROCESS_ID")

# Environment variables that mean "this process is one of several" (JAX's cluster auto-detection reads
# the same ones): an explicit coordinator, Cloud TPU multi-host / multi-slice, SLURM, Open MPI.
_MULTI_PROCESS_ENV = ("MHC_JAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS",
                      "MEGASCALE_COORDINATOR_ADDRESS")


@dataclass(frozen=True)
class Launch:
    """An explicit multi-process launch; None fields are left to JAX's cluster auto-detection."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def explicit(self) -> bool:
        return any(v is not None for v in (self.coordinator, self.num_processes, self.process_id))


def add_launch_args(parser: argparse.ArgumentParser) -> None:
    """--coordinator / --num-processes / --process-id, shared by every CLI."""
    g = parser.add_argument_group("multi-process launch (or MHC_JAX_COORDINATOR / MHC_JAX_NUM_PROCESSES / "
                                  "MHC_JAX_PROCESS_ID; auto-detected on Cloud TPU, SLURM, Open MPI)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0's coordinator service (the same on every process)")
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help="processes in the job")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process, 0..N-1")


def _env(names: tuple[str, ...]) -> str | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _int(value: str | int | None, what: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{what}={value!r} is not allowed: must be an integer") from None


def resolve_launch(args: argparse.Namespace | None = None) -> Launch:
    """The launch from CLI flags (`add_launch_args`), falling back to the environment; validated."""
    get = (lambda name: getattr(args, name, None)) if args is not None else (lambda name: None)
    launch = Launch(
        coordinator=get("coordinator") or _env(ENV_COORDINATOR),
        num_processes=_int(get("num_processes") if get("num_processes") is not None else _env(ENV_NUM_PROCESSES),
                           "--num-processes"),
        process_id=_int(get("process_id") if get("process_id") is not None else _env(ENV_PROCESS_ID),
                        "--process-id"))
    if launch.coordinator is not None:
        host, _, port = launch.coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--coordinator={launch.coordinator!r} is not allowed: must be HOST:PORT, e.g. "
                              "10.0.0.2:8476")
    if launch.num_processes is not None and launch.num_processes < 1:
        raise ConfigError(f"--num-processes={launch.num_processes} is not allowed: must be >= 1")
    if launch.process_id is not None:
        n = launch.num_processes
        if launch.process_id < 0 or (n is not None and launch.process_id >= n):
            raise ConfigError(f"--process-id={launch.process_id} is not allowed: must be in [0, "
                              f"{'--num-processes' if n is None else n})")
    if launch.coordinator is not None and (launch.num_processes is None or launch.process_id is None) \
            and not _cluster_env():
        raise ConfigError(f"--coordinator={launch.coordinator} needs --num-processes and --process-id (or "
                          "MHC_JAX_NUM_PROCESSES / MHC_JAX_PROCESS_ID) outside Cloud TPU, SLURM and Open MPI")
    return launch


def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, "0") or 0)
    except ValueError:
        return 0


def _cluster_env() -> str | None:
    """A cluster JAX auto-detects (it then knows the process count and id itself)."""
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return "TPU_WORKER_HOSTNAMES lists several hosts"
    if _env_int("SLURM_NTASKS") > 1:
        return "SLURM_NTASKS > 1"
    if _env_int("OMPI_COMM_WORLD_SIZE") > 1:
        return "OMPI_COMM_WORLD_SIZE > 1"
    if on_tpu_vm():
        # Pod hosts learn their peers from the GCE metadata server, not from the environment, so every
        # TPU VM initialises (a single-host VM becomes a one-process job; MaxText does the same).
        return "Cloud TPU VM (/dev/accel* or /dev/vfio present and libtpu installed)"
    return None


def multi_process_env() -> str | None:
    """Why this process looks like one of a multi-process job, or None (plain single-host runs)."""
    flag = os.environ.get("MHC_JAX_DISTRIBUTED", "").strip().lower()
    if flag in ("0", "false", "no"):
        return None
    if flag in ("1", "true", "yes"):
        return "MHC_JAX_DISTRIBUTED=1"
    for name in _MULTI_PROCESS_ENV:
        if os.environ.get(name):
            return name
    return _cluster_env()


def on_tpu_vm() -> bool:
    has_chips = bool(glob.glob("/dev/accel*")) or bool(glob.glob("/dev/vfio/[0-9]*"))
    return has_chips and importlib.util.find_spec("libtpu") is not None


def maybe_initialize_distributed(launch: Launch | None = None) -> bool:
    """Joins the job: `jax.distributed.initialize(coordinator, num_processes, process_id)` with an explicit
    `launch` (flags or MHC_JAX_* variables), else cluster auto-detection when the environment says this is
    one process of several (see `multi_process_env`; force with MHC_JAX_DISTRIBUTED=1/0). Never on a plain
    single-host run. Must run before anything touches jax devices. Returns whether it initialised."""
    launch = resolve_launch() if launch is None else launch
    if jax.distributed.is_initialized():
        return False
    if not launch.explicit and multi_process_env() is None:
        return False
    # JAX's CPU client has no cross-process collectives unless told which library to use; gloo ships with
    # jaxlib. Only the CPU backend reads this, so it is harmless on TPU / GPU hosts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("multi-process run (%s): jax.distributed.initialize()",
             launch if launch.explicit else multi_process_env())
    jax.distributed.initialize(launch.coordinator, launch.num_processes, launch.process_id)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def is_main_process() -> bool:
    """Process 0: the one that prints, writes metrics and TensorBoard."""
    return jax.process_index() == 0


def to_host(x: Any) -> np.ndarray:
    """A numpy copy of a (global) array on every process, also when this process holds only part of it
    (`np.asarray` fails then): gathered across processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def replicated(x: Any) -> jax.Array:
    """Host data that is the same on every process (prompt tokens, a KV cache, a lookup table) as an array
    jitted programs over the global mesh accept: on several processes a global array replicated over the
    current mesh (`jax.set_mesh`); on one process a plain device array."""
    if jax.process_count() == 1:
        return jnp.asarray(x)
    mesh = jax.sharding.get_mesh()
    if mesh.empty:
        raise RuntimeError("replicated() on several processes needs the global mesh: call it under jax.set_mesh")
    from jax.sharding import NamedSharding, PartitionSpec
    return jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec()), np.asarray(x))
