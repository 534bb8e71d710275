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
import jax.numpy as jnp
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


def scale_by_fixed_form_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's scaling (`optax.scale_by_adam`'s state and maths) in a form whose float32 rounding does not
    depend on the program it is compiled into, so dense tables (updated inside the whole train step) and
    sparse rows (updated alone on the host, mhc_jax.engram.host_tables) get bitwise the same update:

        m <- m + (1 - b1) (g - m),   v <- v + (1 - b2) (g^2 - v),   u = (m c1) / (sqrt(v c2) + eps),
        c1 = 1 / (1 - b1^t), c2 = 1 / (1 - b2^t).

    optax writes b1 m + (1 - b1) g: two products into one sum, so LLVM's multiply-add contraction may fuse
    either product, and which one varies with the surrounding code; here each sum has one product. optax
    divides by the broadcast bias corrections, which XLA rewrites by context (a multiply by the reciprocal
    in one program, one division by a product in another); here they are multiplies by scalars. Equal to
    optax's Adam up to float rounding."""

    def init(params: Any) -> optax.ScaleByAdamState:
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params),
                                      nu=optax.tree.zeros_like(params))

    def update(updates: Any, state: optax.ScaleByAdamState, params: Any = None) -> tuple[Any, Any]:
        del params
        mu = jax.tree.map(lambda g, m: m + (1 - b1) * (g - m), updates, state.mu)
        nu = jax.tree.map(lambda g, v: v + (1 - b2) * (g * g - v), updates, state.nu)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        c1, c2 = 1.0 / (1.0 - b1 ** t), 1.0 / (1.0 - b2 ** t)
        updates = jax.tree.map(lambda m, v: (m * c1.astype(m.dtype)) / (jnp.sqrt(v * c2.astype(v.dtype)) + eps),
                               mu, nu)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def adamw(oc: OptimizerConfig, lr: optax.ScalarOrSchedule, weight_decay: float) -> optax.GradientTransformation:
    """`optax.adamw` (same chain, same state tree) with the fixed-form Adam scaling above, for every group:
    then the whole update, not only the tables', is bitwise the same whichever program it is compiled
    into (dense and sparse Engram runs take the same steps, bit for bit)."""
    return optax.chain(scale_by_fixed_form_adam(oc.b1, oc.b2, oc.eps), optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(lr))


def engram_adam(cfg: Config) -> optax.GradientTransformation:
    """The Engram tables' optimiser: Adam, engram.lr_multiplier x the schedule, no weight decay."""
    schedule = lr_schedule(cfg.optimizer, cfg.training.steps)
    return adamw(cfg.optimizer, lambda s: schedule(s) * cfg.engram.lr_multiplier, 0.0)


def make_tx(cfg: Config, params: Any) -> optax.GradientTransformation:
    """Clipping -> per-group Adam(W) -> skip non-finite updates (counted in the optimiser state).
    `params` (nnx.state(model, nnx.Param)) decides each parameter's group."""
    oc = cfg.optimizer
    schedule = lr_schedule(oc, cfg.training.steps)
    groups = optax.multi_transform(
        {"decay": adamw(oc, schedule, oc.weight_decay), "no_decay": adamw(oc, schedule, 0.0),
         "engram": engram_adam(cfg)},
        labeller(group_table(params)))
    # Sparse Engram tables: the step clips parameters and table rows by one global norm (step.clip_with_rows).
    return clip_if_finite(groups, oc.clip_norm if not cfg.engram.sparse else 0.0)


def clip_to_norm(tree: Any, norm: jax.Array, clip_norm: float) -> Any:
    """`tree` scaled to global norm `clip_norm` when its global norm `norm` exceeds it:
    optax.clip_by_global_norm's arithmetic, on a norm the caller has already computed."""
    return jax.tree.map(lambda t: jax.lax.select(norm < clip_norm, t, (t / norm.astype(t.dtype)) * clip_norm), tree)


def clip_if_finite(inner: optax.GradientTransformation, clip_norm: float) -> optax.GradientTransformationExtraArgs:
    """optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(clip_norm), inner)) (no clipping when
    clip_norm is 0): the same state tree (checkpoints unchanged) and arithmetic, but the gradients' global
    norm can be the caller's, `update(grads, state, params, grad_norm=...)` (computed here when not given).
    The step computes that norm once for its metrics; optax's pair makes two more passes over every
    gradient (an is-finite test and the clip's own norm): 2% of the train step at nanoGPT's shape on 2 CPU
    cores. The gradients count as finite iff their norm is; that differs from testing every entry only
    when finite gradients' squares overflow float32 (a norm above ~1.8e19), a step then skipped too.

    A step whose gradients are not finite leaves parameters and moments untouched (a zero update); the
    trainer stops after training.max_nonfinite_in_row of them."""
    chained = optax.chain(*([optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []), inner)  # for init

    def init(params: Any) -> optax.ApplyIfFiniteState:
        return optax.ApplyIfFiniteState(notfinite_count=jnp.zeros([], jnp.int32), last_finite=jnp.array(True),
                                        total_notfinite=jnp.zeros([], jnp.int32), inner_state=chained.init(params))

    def update(updates: Any, state: optax.ApplyIfFiniteState, params: Any = None, *,
               grad_norm: jax.Array | None = None) -> tuple[Any, optax.ApplyIfFiniteState]:
        grad_norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
        finite = jnp.isfinite(grad_norm)

        def apply(_: None) -> tuple[Any, Any]:
            g = clip_to_norm(updates, grad_norm, clip_norm) if clip_norm > 0 else updates
            *clip_state, inner_state = state.inner_state  # the chain's states: ((EmptyState,) inner)
            g, inner_state = inner.update(g, inner_state, params)
            return g, (*clip_state, inner_state)

        def skip(_: None) -> tuple[Any, Any]:
            return optax.tree.zeros_like(updates), state.inner_state

        updates, inner_state = jax.lax.cond(finite, apply, skip, None)
        count = jnp.where(finite, 0, optax.safe_increment(state.notfinite_count))
        return updates, optax.ApplyIfFiniteState(
            notfinite_count=count, last_finite=finite, inner_state=inner_state,
            total_notfinite=jnp.where(finite, state.total_notfinite, optax.safe_increment(state.total_notfinite)))

    return optax.GradientTransformationExtraArgs(init, update)


def nonfinite_in_row(optimizer: nnx.Optimizer) -> jax.Array:
    """Updates skipped in a row for non-finite gradients up to now: optax.apply_if_finite's device-side
    counter in the optimiser state (checkpointed with it, so it survives a resume)."""
    return optimizer.opt_state.notfinite_count[...]


def make_optimizer(cfg: Config, model: nnx.Module) -> nnx.Optimizer:
    return nnx.Optimizer(model, make_tx(cfg, nnx.state(model, nnx.Param)), wrt=nnx.Param)
