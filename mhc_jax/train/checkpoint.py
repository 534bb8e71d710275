"""Orbax checkpoints of the whole run: train state (model + optimiser), data-iterator state and metadata
(step, resolved config, RNG seed) in one step directory.

Orbax writes each step into a temporary directory and renames it when complete, so a partially written
checkpoint is never listed. A checkpoint that is listed but unreadable (a truncated file, a disk error) is
skipped in favour of the previous one, with a warning, so a run always resumes from the newest good state.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mhc_jax.config import CheckpointConfig
from mhc_jax.errors import CheckpointError

log = logging.getLogger(__name__)

HOST_ITEM = "engram_tables"  # sparse Engram tables + row moments (numpy, host RAM), see mhc_jax.engram.host_tables


class Checkpointer:
    """`save(step, state, data_state, meta)` / `restore(abstract_state) -> (state, data_state, meta, step)`.

    `state` is a pytree of arrays (e.g. `nnx.to_pure_dict(nnx.state((model, optimizer)))`); `abstract_state`
    the same tree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`, which decides the mesh the arrays
    are restored onto (it may differ from the mesh they were saved from)."""

    def __init__(self, directory: str, cfg: CheckpointConfig):
        self.directory = os.path.abspath(directory) if "://" not in directory else directory
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True,
                                               enable_async_checkpointing=cfg.async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, data_state: dict | None = None, meta: dict | None = None,
             force: bool = False, host_state: Any = None) -> bool:
        """`host_state`: a numpy tree kept in host RAM (sparse Engram tables and moments), item HOST_ITEM."""
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(data_state)
        if host_state is not None:
            items[HOST_ITEM] = ocp.args.StandardSave(host_state)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict | None, dict, int]:
        """Restores `step`, or the newest readable step (unreadable newer ones are skipped)."""
        steps = [step] if step is not None else list(reversed(self.all_steps()))
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        errors = []
        for s in steps:
            try:
                return self._restore_step(abstract_state, s)
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous
                errors.append(f"step {s}: {type(err).__name__}: {err}"[:500])
                log.warning("checkpoint step %d in %s is unreadable (%s); trying the previous one",
                            s, self.directory, type(err).__name__)
        raise CheckpointError(f"no readable checkpoint in {self.directory}:\n" + "\n".join(errors))

    def restore_host_state(self, target: Any, step: int) -> Any:
        """The HOST_ITEM of `step` as numpy arrays shaped like `target` (raises CheckpointError if absent)."""
        if "://" not in self.directory and not os.path.isdir(os.path.join(self.directory, str(step), HOST_ITEM)):
            raise CheckpointError(f"checkpoint {self.directory}/{step} holds no {HOST_ITEM!r} (sparse Engram "
                                  "tables): it was written with engram.update=dense")
        out = self.manager.restore(step, args=ocp.args.Composite(  # numpy leaves restore as numpy
            **{HOST_ITEM: ocp.args.StandardRestore(target)}))
        return jax.tree.map(lambda x: x if isinstance(x, np.ndarray) else np.asarray(x), out[HOST_ITEM])

    def _restore_step(self, abstract_state: Any, step: int) -> tuple[Any, dict | None, dict, int]:
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        has_data = os.path.isdir(os.path.join(self.directory, str(step), "data")) if "://" not in self.directory \
            else True
        if has_data:
            items["data"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], (out["data"] if has_data else None), out["meta"], step


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with the given shardings for a tree of arrays (a restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def pure_state(model: nnx.Module, optimizer: nnx.Optimizer) -> Any:
    """The checkpointed tree: plain nested dicts of arrays for model and optimiser."""
    return nnx.to_pure_dict(nnx.state((model, optimizer)))
