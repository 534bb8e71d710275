"""The one train step: loss -> gradients (with micro-batch accumulation) -> optax update.

`train_step(model, optimizer, batch, grad_accum=1)` runs the step in place on NNX objects; the trainer and the
AOT report use `make_sharded_step`, which jits the step as a pure function of the state with explicit
shardings (train_step uses it too, with the inputs' shardings). The batch has the one layout of
mhc_jax.data.layout (`batch_spec(cfg)`).

Sparse Engram rows (engram.update=sparse): the batch also holds `engram_rows` (E, U, W) float32, the batch's
unique table rows gathered on the host (replicated, not split into micro-batches), and `engram_ids` are
slots into them. The step differentiates the loss by these rows too, clips them together with the
parameters' gradients (one global norm), and returns them as `engram_row_grads` beside the metrics; the
host applies them with the row-wise Adam of mhc_jax.engram.host_tables.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mhc_jax.model.moe import moe_stats, update_router_bias
from mhc_jax.model.transformer import shift_left
from mhc_jax.train.optimizer import clip_to_norm, nonfinite_in_row

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
log = logging.getLogger(__name__)

# XLA:CPU hands fusions to YNNPACK: dots, and by default also reductions and elementwise ops. Its
# reductions (e.g. the softmax sums of attention's backward) ran slower than XLA's own loop fusions: with
# dots only, the 2-core CPU train step at nanoGPT's shape took 0.90x the time (README "mHC speed").
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def _masked_nll_sum(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT) * mask_BT)


def _main_loss_sum_and_count(logits_BTV: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    return _masked_nll_sum(logits_BTV, batch["targets"], mask_BT), jnp.sum(mask_BT)


def loss_sum_and_count(model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Sum of token cross-entropies over the loss mask, and the number of tokens counted."""
    logits_BTV = model(batch["inputs"], positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"],
                       engram_ids_BTEG=batch.get("engram_ids"), engram_rows_EUW=batch.get("engram_rows"))
    return _main_loss_sum_and_count(logits_BTV, batch)


def mtp_loss_sum(mtp_logits: list[jax.Array], batch: Batch) -> jax.Array:
    """Multi-token prediction (DeepSeek-V3 Sec. 2.2, Eq. 24-25): the mean over depths k of the summed cross
    entropies of depth k's prediction of token t + k + 1 (`targets` k positions ahead), counted where that target
    counts and is in position t's document. Divided by the main token count (as the paper's 1/T), times
    mtp_loss_weight, it is the MTP term of the training objective."""
    total = jnp.float32(0.0)
    for k, logits_BTV in enumerate(mtp_logits, start=1):
        targets_BT = shift_left(batch["targets"], k)
        same_doc_BT = shift_left(batch["segment_ids"], k, fill=-1) == batch["segment_ids"]
        mask_BT = shift_left(batch["loss_mask"].astype(jnp.float32), k) * same_doc_BT
        total = total + _masked_nll_sum(logits_BTV, targets_BT, mask_BT)
    return total / max(len(mtp_logits), 1)


def objective_terms(model: nnx.Module, batch: Batch) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """The training objective's numerator and (token count, main loss sum, MTP loss sum): main sum +
    mtp_loss_weight x MTP sum (0 without MTP), to be divided by the count. Evaluation uses `loss_sum_and_count`
    (no MTP: the modules are off at eval and generation)."""
    m = model.cfg.model
    if m.mtp_depth == 0:
        loss_sum, count = loss_sum_and_count(model, batch)
        return loss_sum, (count, loss_sum, jnp.float32(0.0))
    logits_BTV, mtp_logits = model.with_mtp(
        batch["inputs"], positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"],
        engram_ids_BTEG=batch.get("engram_ids"), engram_rows_EUW=batch.get("engram_rows"))
    (loss_sum, count), mtp_sum = _main_loss_sum_and_count(logits_BTV, batch), mtp_loss_sum(mtp_logits, batch)
    return loss_sum + m.mtp_loss_weight * mtp_sum, (count, loss_sum, mtp_sum)


def with_balance_loss(model: nnx.Module, objective: jax.Array, count: jax.Array) -> tuple[jax.Array, dict]:
    """After a forward pass of `model`: (objective + model.aux_loss_weight x count x the MoE layers' summed
    sequence-wise balance losses, so that dividing by the count adds their weighted mean; the MoE routing
    statistics with the balance losses token-weighted likewise). (objective, {}) without MoE."""
    stats = moe_stats(model)
    if not stats:
        return objective, stats
    stats["balance_loss_L"] = stats["balance_loss_L"] * count
    weight = model.cfg.model.aux_loss_weight
    return (objective + weight * jnp.sum(stats["balance_loss_L"]) if weight else objective), stats


def _split_micro(batch: Batch, k: int) -> Batch:
    def one(x: jax.Array) -> jax.Array:
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into training.grad_accum={k} micro-batches")
        return x.reshape(k, x.shape[0] // k, *x.shape[1:])
    return jax.tree.map(one, batch)


def loss_and_grads(model: nnx.Module, batch: Batch, grad_accum: int = 1) -> tuple[jax.Array, Any, jax.Array]:
    """Mean token loss over the whole batch and the gradient of the training objective (the loss, plus the
    weighted MTP loss with model.mtp_depth > 0), accumulated over `grad_accum` micro-batches (sums of per-token
    losses and counts, so the result equals one big batch up to float rounding)."""
    loss, (grads, _), count = _loss_and_grads(model, batch, grad_accum)[:3]
    return loss, grads, count


def _loss_and_grads(model: nnx.Module, batch: Batch, grad_accum: int) -> tuple:
    """`loss_and_grads` with the gradient as (params, sparse Engram rows or None), then the token count, the
    (unweighted) MTP loss (0 without MTP) and the MoE routing statistics of the whole batch
    (mhc_jax.model.moe.moe_stats: loads and drops summed over micro-batches, balance loss token-weighted; {}
    without MoE). The gradient is the objective's (loss + weighted MTP loss + weighted balance loss); the loss
    returned is the language-model loss alone."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    data = {k: v for k, v in batch.items() if k != "engram_rows"}  # rows serve every micro-batch

    def micro(p: Any, rows: jax.Array | None, mb: Batch) -> tuple[jax.Array, tuple]:
        m = nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rest))  # fresh Variables: MoE layers write their stats
        objective, sums = objective_terms(m, mb if rows is None else {**mb, "engram_rows": rows})
        objective, stats = with_balance_loss(m, objective, sums[0])
        return objective, (sums, stats)

    grad_fn = jax.value_and_grad(micro, argnums=(0, 1), has_aux=True)
    diff = (params, batch.get("engram_rows"))
    if grad_accum == 1:
        (_, (sums, stats)), grads = grad_fn(*diff, data)
    else:
        def body(carry, mb):
            (_, aux), g = grad_fn(*diff, mb)
            return jax.tree.map(jnp.add, carry, (g, aux)), None

        zeros = jax.tree.map(jnp.zeros_like, (diff, ((jnp.float32(0.0),) * 3, moe_stats(model))))
        (grads, (sums, stats)), _ = jax.lax.scan(body, zeros, _split_micro(data, grad_accum))
    count, loss_sum, mtp_sum = sums
    denom = jnp.maximum(count, 1.0)
    if stats:
        stats["balance_loss_L"] = stats["balance_loss_L"] / denom
    return loss_sum / denom, jax.tree.map(lambda g: g / denom, grads), count, mtp_sum / denom, stats


def clip_with_rows(grads: Any, row_grads: jax.Array, clip_norm: float) -> tuple[Any, jax.Array, jax.Array]:
    """Sparse Engram: (grads, row_grads) clipped by their one global norm, computed once, with the arithmetic
    that clips the dense tree (`optimizer.clip_to_norm`; untouched rows have zero gradient, so the norm is the
    dense one); a non-finite norm makes the optimiser (`optimizer.clip_if_finite`) skip the step as it does
    with dense tables. Returns (grads, row_grads, global norm)."""
    norm = optax.tree.norm((grads, row_grads))
    if clip_norm > 0:
        grads, row_grads = clip_to_norm((grads, row_grads), norm, clip_norm)
    return grads, row_grads, norm


def _in_host_memory(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.typeof(x).memory_space == jax.memory.Space.Host


def to_device_memory(tree: Any) -> Any:
    """`tree` with its host-memory leaves (Engram tables and their Adam moments with
    engram.placement=host) copied to device memory; other leaves unchanged."""
    return jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Device) if _in_host_memory(x) else x, tree)


def step_fn(model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch, grad_accum: int = 1) -> Metrics:
    """One optimisation step in place on `model` and `optimizer`, the gradient accumulated over
    `grad_accum` micro-batches (training.grad_accum); returns scalar metrics.

    Host-resident Engram tables (engram.placement=host) stay in host memory for the forward and backward
    passes (rows are gathered on the host). The optimiser update (global-norm clipping, Adam, the
    non-finite check) runs on the device, so the table, its gradient and its moments are copied in for
    the update; the jit's out_shardings (pinned_host) put the new table and moments back in host memory:
    JAX's optimizer-state offloading pattern."""
    loss, (grads, row_grads), count, mtp_loss, stats = _loss_and_grads(model, batch, grad_accum)
    grads = to_device_memory(grads)
    for node in (model, optimizer):  # a no-op unless tables (and their moments) are host-resident
        nnx.update(node, to_device_memory(nnx.state(node)))
    if row_grads is None:
        grad_norm = optax.tree.norm(grads)
    else:  # sparse Engram rows: the optimiser chain has no clipping; both are clipped here, together
        grads, row_grads, grad_norm = clip_with_rows(grads, row_grads, model.cfg.optimizer.clip_norm)
    optimizer.update(model, grads, grad_norm=grad_norm)  # one norm: metrics, clipping, finiteness
    metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count,
               "nonfinite": jnp.logical_not(jnp.isfinite(loss) & jnp.isfinite(grad_norm)),
               "nonfinite_in_row": nonfinite_in_row(optimizer)}
    if model.cfg.model.mtp_depth:
        metrics["mtp_loss"] = mtp_loss  # mean over depths, unweighted
    if stats:  # DeepSeekMoE: aux-loss-free bias update from this step's loads, then its metrics
        metrics.update(moe_load_LI=stats["load_LI"], moe_dropped_L=stats["dropped_L"],
                       moe_balance_loss=jnp.sum(stats["balance_loss_L"]),
                       moe_bias_LI=update_router_bias(model, stats["load_LI"],
                                                      model.cfg.model.bias_update_rate))
    if row_grads is not None:
        metrics["engram_row_grads"] = row_grads
    return metrics


@functools.cache
def compiler_options(platform: str) -> dict[str, str] | None:
    """The train step's XLA options on `platform` (CPU_COMPILER_OPTIONS on "cpu", else none). An XLA that
    does not know an option (a compile error naming it) gets none, logged: the step then compiles with
    XLA's defaults. The probe takes no arguments, so a context mesh (jax.set_mesh) does not affect it."""
    if platform != "cpu":
        return None
    try:
        jax.jit(lambda: jnp.zeros((), jnp.float32) + 1, compiler_options=CPU_COMPILER_OPTIONS).lower().compile()
    except jax.errors.JaxRuntimeError as e:
        log.warning("XLA:CPU rejected the train step's compiler options %s (%s); using its defaults",
                    CPU_COMPILER_OPTIONS, e)
        return None
    return dict(CPU_COMPILER_OPTIONS)


@functools.cache
def _step_for(graphdef: nnx.GraphDef, grad_accum: int, platform: str):
    return make_sharded_step(graphdef, None, None, grad_accum, platform)


def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch, grad_accum: int = 1) -> Metrics:
    """`step_fn` in place on `model` and `optimizer`: `make_sharded_step` (state donated, shardings those of
    the inputs) compiled once per model structure for the default backend, with its `compiler_options`."""
    graphdef, state = nnx.split((model, optimizer))
    state, metrics = _step_for(graphdef, grad_accum, jax.default_backend())(state, batch)
    nnx.update((model, optimizer), state)
    return metrics


def make_sharded_step(graphdef: nnx.GraphDef, state_shardings: Any, batch_shardings: Any, grad_accum: int = 1,
                      platform: str | None = None):
    """`step(state, batch) -> (state, metrics)` as a `jax.jit` with explicit in/out shardings and the
    state donated, where state = nnx.state((model, optimizer)). The same step as `train_step`. `platform`:
    where it runs, for its `compiler_options` (None: none, as for an ahead-of-time compile for a TPU)."""

    def pure(state: Any, batch: Batch) -> tuple[Any, Metrics]:
        model, optimizer = nnx.merge(graphdef, state)
        metrics = step_fn(model, optimizer, batch, grad_accum)
        return nnx.state((model, optimizer)), metrics

    return jax.jit(pure, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=0,
                   compiler_options=compiler_options(platform) if platform else None)
