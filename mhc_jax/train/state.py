"""Building the train state (model + optimiser) directly sharded on the mesh, and loading it from a workdir.

Shared by the trainer, `mhc_jax.evaluate`, `mhc_jax.generate` and the AOT report, so all of them see the
same parameters, shardings and checkpoint layout.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from mhc_jax.config import CheckpointConfig, Config, ConfigError, config_from_dict
from mhc_jax.errors import CheckpointError
from mhc_jax.distributed import Launch, maybe_initialize_distributed
from mhc_jax.model import Transformer
from mhc_jax.sharding import make_mesh, train_state_shardings, undivided_params
from mhc_jax.train.checkpoint import Checkpointer, abstract_like
from mhc_jax.train.optimizer import make_optimizer

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
# The init program draws each parameter with its own threefry loop and erf_inv, dozens of small loops that
# XLA:CPU hands to LLVM one by one. At LLVM's -O1 they compile in a third to two thirds of the default's
# time (2 CPU cores: tiny config 5.4 -> 1.8 s, default config 6.4 -> 4.2 s) into bit-identical parameters
# (tested), and the program runs once. Keyed by platform; other platforms keep XLA's defaults.
INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 1}}


def build(cfg: Config) -> tuple[Transformer, nnx.Optimizer]:
    model = Transformer(cfg, rngs=nnx.Rngs(cfg.training.seed))
    return model, make_optimizer(cfg, model)


def abstract_train_state(cfg: Config, mesh: Mesh) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, abstract state, state shardings) without allocating any parameter. Logs a warning for
    every parameter dimension that its mesh axis does not divide (it is replicated over that axis)."""
    model, optimizer = nnx.eval_shape(lambda: build(cfg))
    graphdef, state = nnx.split((model, optimizer))
    for line in undivided_params(nnx.state(model), mesh, cfg):
        log.warning("parameter not sharded as its logical axes ask: %s", line)
    return graphdef, state, train_state_shardings(model, optimizer, mesh, cfg)


def init_train_state(cfg: Config, mesh: Mesh) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, state, shardings): parameters initialised on the devices that hold them (never all on
    one host first), so a model larger than one device's memory can be created."""
    graphdef, _, shardings = abstract_train_state(cfg, mesh)
    state = jax.jit(lambda: nnx.state(build(cfg)), out_shardings=shardings,
                    compiler_options=INIT_COMPILER_OPTIONS.get(jax.default_backend()))()
    return graphdef, state, shardings


def restore_train_state(ckpt: Checkpointer, graphdef: nnx.GraphDef, state: Any, shardings: Any,
                        step: int | None = None, check_meta: Any = None,
                        host_target: Any = None) -> tuple[Any, dict | None, dict, int]:
    """Restores into the structure of `state` on `shardings` (which may be another mesh than the saved one);
    `check_meta(meta)` vets the checkpoint's metadata (e.g. its config) before any array is read.
    `host_target`: sparse Engram tables' numpy tree, restored and verified with the step (`ckpt.host_state`)."""
    target = abstract_like(nnx.to_pure_dict(state), nnx.to_pure_dict(shardings))
    pure, data_state, meta, step = ckpt.restore(target, step, check_meta, host_target)
    restored = jax.tree.map(lambda x: x, state)  # a structural copy to fill in
    nnx.replace_by_pure_dict(restored, pure)
    return restored, data_state, meta, step


def open_workdir_checkpoints(workdir: str) -> Checkpointer:
    """A read-only Checkpointer of a trained workdir; ConfigError if there is nothing to read."""
    if "://" not in workdir and not os.path.isdir(workdir):
        raise ConfigError(f"workdir {workdir!r} does not exist; pass the --workdir of a run of train.py")
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if "://" not in workdir and not os.path.isdir(directory):
        raise ConfigError(f"no checkpoint under {directory}: {workdir!r} is not a trained workdir "
                          "(train first, or pass the --workdir of a run of train.py)")
    ckpt = Checkpointer(directory, CheckpointConfig(), read_only=True)
    if ckpt.latest_step() is None:
        raise ConfigError(f"no checkpoint under {directory}; train first")
    return ckpt


def load_config_from_workdir(workdir: str, overrides: list[str] | tuple[str, ...] = (),
                             step: int | None = None) -> Config:
    """The config stored in the workdir's checkpoint `step` (default: the newest whose metadata reads),
    the source of truth; `config.yaml` beside it is a copy for people."""
    ckpt = open_workdir_checkpoints(workdir)
    steps = ckpt.all_steps()
    if step is not None and step not in steps:
        raise CheckpointError(f"checkpoint step {step} does not exist in {ckpt.directory}; it holds steps {steps}")
    errors = []
    for s in ([step] if step is not None else reversed(steps)):
        try:
            meta = ckpt.read_meta(s)
        except Exception as err:  # noqa: BLE001 - an unreadable step: try the previous one
            errors.append(f"step {s}: {type(err).__name__}: {err}"[:300])
            continue
        if "config" in meta:
            return config_from_dict(meta["config"], overrides)
        errors.append(f"step {s}: its metadata holds no config")
    raise CheckpointError(f"no readable checkpoint metadata in {ckpt.directory}: " + "; ".join(errors))


def load_model_from_workdir(workdir: str, overrides: list[str] | tuple[str, ...] = (),
                            mesh: Mesh | None = None, step: int | None = None) -> tuple[Config, Transformer, int]:
    """The trained model of a workdir (newest readable checkpoint, or `step`) and its config."""
    cfg = load_config_from_workdir(workdir, overrides, step)
    mesh = mesh or make_mesh(cfg.mesh)
    ckpt = open_workdir_checkpoints(workdir)
    with jax.set_mesh(mesh):
        graphdef, abstract, shardings = abstract_train_state(cfg, mesh)
        state, _, _, step = restore_train_state(ckpt, graphdef, abstract, shardings, step)
        model, _ = nnx.merge(graphdef, state)
    ckpt.close()
    return cfg, model, step


def join_and_load_model(workdir: str, launch: Launch, step: int | None = None) -> tuple[Config, Transformer, int, Mesh]:
    """For the CLIs: joins the multi-process job (`launch`, before any device is touched), then loads the
    workdir's model onto its saved mesh (every process holds its shards). Returns (cfg, model, step, mesh)."""
    maybe_initialize_distributed(launch)
    mesh = make_mesh(load_config_from_workdir(workdir, step=step).mesh)
    cfg, model, step = load_model_from_workdir(workdir, mesh=mesh, step=step)
    return cfg, model, step, mesh
