"""AdamW with parameter groups and the learning-rate schedules.

Groups (by each parameter's logical `axes` metadata, see mhc_jax.sharding):
- "decay": weight matrices of the backbone (embedding, attention, MLP, head, Engram projections), AdamW.
- "no_decay": norms, biases, mHC/HC mapping parameters and gating scalars (the HC paper gives its static
  parts no weight decay; mHC's a, b and phi are treated alike), Engram conv: AdamW with weight decay 0.
- "engram": Engram embedding tables: Adam with engram.lr_multiplier x the LR and no weight decay
  (Engram paper: 5x, no decay). With engram.update=sparse the tables are not parameters: the same Adam
  (`engram_adam`) runs row-wise on the host (mhc_jax.engram.host_tables).
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx

from mhc_jax.config import Config, OptimizerConfig

# Logical axes that a decayed matrix may have; any other axis (streams, mhc, conv, norm, engram_rows)
# marks a parameter that takes no weight decay.
DECAYED_AXES = frozenset({"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "engram_mem",
                          "q_lora", "kv_lora", "experts", "moe_mlp"})


def param_group(variable: nnx.Variable) -> str:
    """'decay', 'no_decay' or 'engram' for one parameter."""
    axes = tuple(variable.get_metadata().get("axes") or ())
    if "engram_rows" in axes:
        return "engram"
    stacked = axes[:1] == ("layers",)  # model.scan_layers: one parameter per layer on a leading axis
    axes = axes[1:] if stacked else axes
    if len(variable.get_value().shape) - stacked >= 2 and axes and set(axes) <= DECAYED_AXES:
        return "decay"
    return "no_decay"


def _path_key(path: tuple[Any, ...]) -> tuple[str, ...]:
    """A parameter's path without the trailing `.value` that Variable leaves add."""
    names = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    return names[:-1] if names and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey) \
        else names


def group_table(params: Any) -> dict[tuple[str, ...], str]:
    """{parameter path: group} from an nnx.State of Params (which carry the `axes` metadata)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return {_path_key(path): param_group(v) for path, v in flat}


def labeller(table: dict[tuple[str, ...], str]):
    """optax label function: works on the State of Variables (init) and on the plain-array updates."""

    def labels(tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(lambda path, _: table[_path_key(path)], tree,
                                                is_leaf=lambda x: isinstance(x, nnx.Variable))
    return labels


def lr_schedule(oc: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine to min_lr_ratio * lr, the mHC paper's step decay
    (x0.316 at 80% and x0.1 at 90% of training, paper Table 5 setup), or constant."""
    warmup = optax.linear_schedule(0.0, oc.lr, max(oc.warmup_steps, 1))
    rest = max(total_steps - oc.warmup_steps, 1)
    if oc.schedule == "cosine":
        after = optax.cosine_decay_schedule(oc.lr, rest, alpha=oc.min_lr_ratio)
    elif oc.schedule == "step":
        b1, b2 = int(0.8 * total_steps) - oc.warmup_steps, int(0.9 * total_steps) - oc.warmup_steps
        after = lambda s: oc.lr * jax.numpy.where(s >= b2, 0.1, jax.numpy.where(s >= b1, 0.316, 1.0))
    else:
        after = optax.constant_schedule(oc.lr)
    if oc.warmup_steps == 0:
        return after
    return optax.join_schedules([warmup, after], [oc.warmup_steps])


def engram_adam(cfg: Config) -> optax.GradientTransformation:
    """The Engram tables' optimiser: Adam, engram.lr_multiplier x the schedule, no weight decay."""
    oc = cfg.optimizer
    schedule = lr_schedule(oc, cfg.training.steps)
    return optax.adamw(lambda s: schedule(s) * cfg.engram.lr_multiplier, b1=oc.b1, b2=oc.b2, eps=oc.eps,
                       weight_decay=0.0)


def make_tx(cfg: Config, params: Any) -> optax.GradientTransformation:
    """Clipping -> per-group Adam(W) -> skip non-finite updates (counted in the optimiser state).
    `params` (nnx.state(model, nnx.Param)) decides each parameter's group."""
    oc = cfg.optimizer
    schedule = lr_schedule(oc, cfg.training.steps)
    adamw = lambda lr, wd: optax.adamw(lr, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=wd)
    groups = optax.multi_transform(
        {"decay": adamw(schedule, oc.weight_decay), "no_decay": adamw(schedule, 0.0), "engram": engram_adam(cfg)},
        labeller(group_table(params)))
    # Sparse Engram tables: the step clips parameters and table rows by one global norm (step.clip_with_rows).
    chain = [optax.clip_by_global_norm(oc.clip_norm)] if oc.clip_norm > 0 and not cfg.engram.sparse else []
    # A step whose gradients are not finite leaves params and moments untouched; the trainer stops after
    # training.max_nonfinite_in_row of them.
    return optax.apply_if_finite(optax.chain(*chain, groups), max_consecutive_errors=10**9)


def nonfinite_in_row(optimizer: nnx.Optimizer) -> jax.Array:
    """Updates skipped in a row for non-finite gradients up to now: optax.apply_if_finite's device-side
    counter in the optimiser state (checkpointed with it, so it survives a resume)."""
    return optimizer.opt_state.notfinite_count[...]


def make_optimizer(cfg: Config, model: nnx.Module) -> nnx.Optimizer:
    return nnx.Optimizer(model, make_tx(cfg, nnx.state(model, nnx.Param)), wrt=nnx.Param)
