"""Building the train state (model + optimiser) directly sharded on the mesh, and loading it from a workdir.

Shared by the trainer, `mhc_jax.evaluate`, `mhc_jax.generate` and the AOT report, so all of them see the
same parameters, shardings and checkpoint layout.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from mhc_jax.config import Config, ConfigError, load_config
from mhc_jax.distributed import Launch, maybe_initialize_distributed
from mhc_jax.model import Transformer
from mhc_jax.sharding import make_mesh, train_state_shardings
from mhc_jax.train.checkpoint import Checkpointer, abstract_like
from mhc_jax.train.optimizer import make_optimizer

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"


def build(cfg: Config) -> tuple[Transformer, nnx.Optimizer]:
    model = Transformer(cfg, rngs=nnx.Rngs(cfg.training.seed))
    return model, make_optimizer(cfg, model)


def abstract_train_state(cfg: Config, mesh: Mesh) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, abstract state, state shardings) without allocating any parameter."""
    model, optimizer = nnx.eval_shape(lambda: build(cfg))
    graphdef, state = nnx.split((model, optimizer))
    return graphdef, state, train_state_shardings(model, optimizer, mesh, cfg)


def init_train_state(cfg: Config, mesh: Mesh) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, state, shardings): parameters initialised on the devices that hold them (never all on
    one host first), so a model larger than one device's memory can be created."""
    graphdef, _, shardings = abstract_train_state(cfg, mesh)
    state = jax.jit(lambda: nnx.state(build(cfg)), out_shardings=shardings)()
    return graphdef, state, shardings


def restore_train_state(ckpt: Checkpointer, graphdef: nnx.GraphDef, state: Any, shardings: Any,
                        step: int | None = None) -> tuple[Any, dict | None, dict, int]:
    """Restores into the structure of `state` on `shardings` (which may be another mesh than the saved one)."""
    target = abstract_like(nnx.to_pure_dict(state), nnx.to_pure_dict(shardings))
    pure, data_state, meta, step = ckpt.restore(target, step)
    restored = jax.tree.map(lambda x: x, state)  # a structural copy to fill in
    nnx.replace_by_pure_dict(restored, pure)
    return restored, data_state, meta, step


def load_config_from_workdir(workdir: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{path} does not exist: {workdir!r} is not a workdir written by train.py")
    return load_config(path, overrides)


def load_model_from_workdir(workdir: str, overrides: list[str] | tuple[str, ...] = (),
                            mesh: Mesh | None = None, step: int | None = None) -> tuple[Config, Transformer, int]:
    """The trained model of a workdir (newest readable checkpoint, or `step`) and its config."""
    cfg = load_config_from_workdir(workdir, overrides)
    mesh = mesh or make_mesh(cfg.mesh)
    ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), cfg.checkpoint)
    if ckpt.latest_step() is None:
        raise ConfigError(f"no checkpoint under {os.path.join(workdir, CHECKPOINT_DIR)}; train first")
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
    mesh = make_mesh(load_config_from_workdir(workdir).mesh)
    cfg, model, step = load_model_from_workdir(workdir, mesh=mesh, step=step)
    return cfg, model, step, mesh
