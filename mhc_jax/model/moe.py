"""DeepSeekMoE (DeepSeek-V3, arXiv 2412.19437, Sec. 2.1.2): shared experts plus sigmoid-routed experts,
aux-loss-free load balancing, dropless grouped matmuls and expert parallelism.

    h = sum_shared FFN_s(x) + sum_{i in top-k} g_i FFN_i(x)                      (V3 Eq. 12)
    s_i = sigmoid(x . e_i)                                                         (V3 Eq. 15)
    top-k over s_i + b_i (b: per-expert bias, selection only)                      (V3 Eq. 16)
    g_i = s_i / sum_{j chosen} s_j  x  routed_scaling_factor                        (V3 Eq. 13)

Group-limited routing (model.n_groups > 1): the experts split into n_groups groups; a token picks the
topk_groups groups with the largest sum of their two best s + b, then its k experts among those groups.

Aux-loss-free balancing (V3 Sec. 2.1.2): `RouterBias` is a per-expert Variable, not a Param (no gradient,
no optimiser), kept in the train state and its checkpoints. After each step the train step adds
`bias_update_rate * sign(mean load - load_i)` (`update_router_bias`), from the step's per-expert
assignment counts (the whole global batch, every micro-batch). The sequence-wise balance loss
(V3 Eq. 17-20, `sequence_balance_loss`) is optional (model.aux_loss_weight).

Routed experts run on the token-expert assignments sorted by expert:
- dropless (capacity_factor = 0): a grouped matmul on the sorted rows (one group per expert;
  `mhc_jax.grouped_matmul`: XLA's ragged dot on TPU, megablox's tile schedule elsewhere), no token is dropped;
- capacity (capacity_factor > 0): each expert takes at most ceil(cf * tokens * k / n_routed) assignments
  (earlier tokens first) into a dense (experts, capacity, C) buffer and one batched einsum; the rest are
  dropped (counted).
Under a mesh the routed experts run inside `jax.shard_map`: every device routes its own tokens (the batch is
split over dcn_data, data, fsdp and expert), sends each assignment to the device of the `expert` axis
holding its expert with `jax.lax.all_to_all`, runs its experts (their hidden width split over `tensor`,
partial sums added with psum) and gets the results back with a second all-to-all. XLA:CPU has no
`ragged_all_to_all`, so the dropless buffers are padded to the worst case (every local assignment to one
device: p x the local assignments); the capacity variant sends exactly the capacity buffers. Without a
mesh the same code runs with one shard and no collective.

Every forward writes what it routed into `MoeStats` variables (per-expert load, dropped assignments,
balance loss), which the train step reads (`moe_stats`); under model.scan_layers the scan carries them out.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from mhc_jax.config import ModelConfig
from mhc_jax.errors import ConfigError
from mhc_jax.grouped_matmul import grouped_matmul
from mhc_jax.layers import param
from mhc_jax.model.mlp import MLP
from mhc_jax.sharding import logical_to_spec


class RouterBias(nnx.Variable):
    """Per-expert selection bias b of aux-loss-free balancing (train state and checkpoints, no gradient)."""


class MoeStats(nnx.Variable):
    """What the last forward pass routed (overwritten by each one; read by the train step)."""


class ExpertLoad(MoeStats):
    """Token-expert assignments per routed expert (before any drop)."""


class DroppedTokens(MoeStats):
    """Assignments dropped by the capacity limit (capacity_factor > 0)."""


class BalanceLoss(MoeStats):
    """The sequence-wise balance loss of the last forward pass (V3 Eq. 17-20, before aux_loss_weight)."""


# --------------------------------------------------------------------------------------------------
# Routing (pure functions)
# --------------------------------------------------------------------------------------------------


def route(logits_mI: jax.Array, bias_I: jax.Array, m: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(expert ids idx_mk, gate weights gate_mk, affinities s_mI) in float32 for router logits u . e_i."""
    s_mI = jax.nn.sigmoid(logits_mI.astype(jnp.float32))  # V3 Eq. 15
    select_mI = s_mI + bias_I.astype(jnp.float32)  # the bias steers the choice only (V3 Eq. 16)
    I, g = m.n_routed_experts, m.n_groups
    if g > 1:  # group-limited routing: keep the topk_groups groups ranked by their top-2 sum
        per = I // g
        select_mgI = select_mI.reshape(*select_mI.shape[:-1], g, per)
        group_score_mg = jnp.sum(jax.lax.top_k(select_mgI, min(2, per))[0], axis=-1)
        _, groups_mk = jax.lax.top_k(group_score_mg, m.topk_groups)
        keep_mg = jnp.sum(jax.nn.one_hot(groups_mk, g, dtype=jnp.bool_), axis=-2)
        select_mI = jnp.where(keep_mg[..., None], select_mgI, -jnp.inf).reshape(select_mI.shape)
    _, idx_mk = jax.lax.top_k(select_mI, m.experts_per_token)
    s_mk = jnp.take_along_axis(s_mI, idx_mk, axis=-1)
    gate_mk = s_mk / jnp.sum(s_mk, axis=-1, keepdims=True) * m.routed_scaling_factor  # V3 Eq. 13
    return idx_mk, gate_mk, s_mI


def sequence_balance_loss(s_BTI: jax.Array, idx_BTk: jax.Array) -> jax.Array:
    """V3 Eq. 17-20 without alpha: mean over sequences of sum_i f_i P_i, with f_i = N_r / (K_r T) x (tokens
    of the sequence routed to i) and P_i = mean over the sequence of s_i / sum_j s_j."""
    T, I, k = s_BTI.shape[1], s_BTI.shape[2], idx_BTk.shape[2]
    chosen_BTI = jnp.sum(jax.nn.one_hot(idx_BTk, I, dtype=jnp.float32), axis=2)
    f_BI = I / (k * T) * jnp.sum(chosen_BTI, axis=1)
    p_BI = jnp.mean(s_BTI / jnp.sum(s_BTI, axis=-1, keepdims=True), axis=1)
    return jnp.mean(jnp.sum(f_BI * p_BI, axis=-1))


def expert_capacity(tokens: int, m: ModelConfig) -> int:
    """Assignments one expert takes from `tokens` routed together: ceil(cf * tokens * k / n_routed)."""
    return max(1, math.ceil(m.capacity_factor * tokens * m.experts_per_token / m.n_routed_experts))


# --------------------------------------------------------------------------------------------------
# Routed experts on one device's tokens (called inside shard_map, or directly without a mesh)
# --------------------------------------------------------------------------------------------------


def _swiglu_ragged(x_PC: jax.Array, sizes_I: jax.Array, w_gate_ICO, w_up_ICO, w_down_IOC) -> jax.Array:
    """SwiGLU of each row by its expert: rows sorted by expert, `sizes_I` rows per expert; rows past
    sum(sizes_I) come out zero (grouped_matmul)."""
    h_PO = jax.nn.silu(grouped_matmul(x_PC, w_gate_ICO, sizes_I)) * grouped_matmul(x_PC, w_up_ICO, sizes_I)
    return grouped_matmul(h_PO, w_down_IOC, sizes_I)


def _sort_assignments(idx_mk: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(order_P, expert_P): assignments (token-major, m * k of them) sorted by expert, stably, and their experts."""
    flat_P = idx_mk.reshape(-1)
    order_P = jnp.argsort(flat_P, stable=True)
    return order_P, flat_P[order_P]


def _dropless(x_mC, idx_mk, w_gate_ICO, w_up_ICO, w_down_IOC, *, n_routed: int, ep_axis: str | None,
              ep: int, tp_axis: str | None) -> tuple[jax.Array, jax.Array]:
    """(outputs of each assignment in token-major order y_PC, dropped count 0). The local experts are the
    ep-th part of n_routed held by this device (all of them with ep = 1)."""
    k, C = idx_mk.shape[1], x_mC.shape[1]
    P, local = idx_mk.size, n_routed // ep
    order_P, expert_P = _sort_assignments(idx_mk)
    x_PC = x_mC[order_P // k]
    if ep_axis is None:
        y_PC = _swiglu_ragged(x_PC, jnp.bincount(expert_P, length=n_routed), w_gate_ICO, w_up_ICO, w_down_IOC)
    else:  # rows to the device holding their expert: destination-major buffers padded to P rows each
        dest_P = expert_P // local
        counts_p = jnp.bincount(dest_P, length=ep)
        slot_P = jnp.arange(P) - (jnp.cumsum(counts_p) - counts_p)[dest_P]
        send_pPC = jnp.zeros((ep, P, C), x_PC.dtype).at[dest_P, slot_P].set(x_PC)
        send_pP = jnp.full((ep, P), local, jnp.int32).at[dest_P, slot_P].set(expert_P % local)  # local = empty
        recv_pPC = jax.lax.all_to_all(send_pPC, ep_axis, 0, 0)
        recv_pP = jax.lax.all_to_all(send_pP, ep_axis, 0, 0)
        order_r, expert_r = _sort_assignments(recv_pP.reshape(-1, 1))  # r = ep * P received rows
        out_rC = _swiglu_ragged(recv_pPC.reshape(-1, C)[order_r], jnp.bincount(expert_r, length=local + 1)[:local],
                                w_gate_ICO, w_up_ICO, w_down_IOC)
        if tp_axis is not None:  # hidden width split over tensor: partial sums
            out_rC = jax.lax.psum(out_rC, tp_axis)
        back_pPC = jax.lax.all_to_all(jnp.zeros_like(out_rC).at[order_r].set(out_rC).reshape(ep, P, C), ep_axis, 0, 0)
        y_PC = back_pPC[dest_P, slot_P]
    if ep_axis is None and tp_axis is not None:  # (with ep the sum is taken before sending back)
        y_PC = jax.lax.psum(y_PC, tp_axis)
    return jnp.zeros_like(y_PC).at[order_P].set(y_PC), jnp.zeros((), jnp.float32)


def _capacity(x_mC, idx_mk, w_gate_ICO, w_up_ICO, w_down_IOC, *, n_routed: int, ep_axis: str | None,
              ep: int, tp_axis: str | None, capacity: int) -> tuple[jax.Array, jax.Array]:
    """(y_PC token-major, dropped count): at most `capacity` assignments per expert from these tokens
    (earlier tokens first) in a dense (experts, capacity, C) buffer; the others give zero output."""
    k, C = idx_mk.shape[1], x_mC.shape[1]
    P, local, Y = idx_mk.size, n_routed // ep, capacity
    order_P, expert_P = _sort_assignments(idx_mk)
    counts_I = jnp.bincount(expert_P, length=n_routed)
    pos_P = jnp.arange(P) - (jnp.cumsum(counts_I) - counts_I)[expert_P]
    keep_P = pos_P < Y
    buf_IYC = jnp.zeros((n_routed, Y, C), x_mC.dtype).at[expert_P, jnp.where(keep_P, pos_P, Y)].set(
        x_mC[order_P // k], mode="drop")
    if ep_axis is not None:  # (sources p, local experts, Y) after the all-to-all -> (local, p * Y)
        recv = jax.lax.all_to_all(buf_IYC.reshape(ep, local, Y, C), ep_axis, 0, 0)
        buf_IYC = recv.transpose(1, 0, 2, 3).reshape(local, ep * Y, C)
    h_IYO = jax.nn.silu(jnp.einsum("iyc,ico->iyo", buf_IYC, w_gate_ICO)) * jnp.einsum("iyc,ico->iyo", buf_IYC, w_up_ICO)
    out_IYC = jnp.einsum("iyo,ioc->iyc", h_IYO, w_down_IOC)
    if tp_axis is not None:
        out_IYC = jax.lax.psum(out_IYC, tp_axis)
    if ep_axis is not None:
        out_IYC = jax.lax.all_to_all(out_IYC.reshape(local, ep, Y, C).transpose(1, 0, 2, 3), ep_axis, 0, 0)
        out_IYC = out_IYC.reshape(n_routed, Y, C)
    y_PC = jnp.where(keep_P[:, None], out_IYC[expert_P, jnp.minimum(pos_P, Y - 1)], 0)
    return jnp.zeros_like(y_PC).at[order_P].set(y_PC), jnp.sum(~keep_P).astype(jnp.float32)


def _routed_local(x_mC, idx_mk, gate_mk, w_gate_ICO, w_up_ICO, w_down_IOC, *, m: ModelConfig,
                  ep_axis: str | None, ep: int, tp_axis: str | None, batch_axes: tuple[str, ...]):
    """One device's tokens through the routed experts, weighted by their gates and summed over the k."""
    kw = dict(n_routed=m.n_routed_experts, ep_axis=ep_axis, ep=ep, tp_axis=tp_axis)
    if m.capacity_factor > 0:
        y_PC, dropped = _capacity(x_mC, idx_mk, w_gate_ICO, w_up_ICO, w_down_IOC, **kw,
                                  capacity=expert_capacity(x_mC.shape[0], m))
    else:
        y_PC, dropped = _dropless(x_mC, idx_mk, w_gate_ICO, w_up_ICO, w_down_IOC, **kw)
    y_mkC = y_PC.reshape(*idx_mk.shape, -1)
    y_mC = jnp.einsum("mkc,mk->mc", y_mkC, gate_mk.astype(y_mkC.dtype))
    if batch_axes:
        dropped = jax.lax.psum(dropped, batch_axes)
    return y_mC, dropped


def routed_experts(x_mC: jax.Array, idx_mk: jax.Array, gate_mk: jax.Array, w_gate_ICO: jax.Array,
                   w_up_ICO: jax.Array, w_down_IOC: jax.Array, m: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """(sum over the k chosen experts of gate x expert output, per token; dropped assignments). Under a
    mesh of more than one device: inside shard_map, tokens split over the batch axes, experts over `expert`,
    their hidden width over `tensor` (module docstring)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _routed_local(x_mC, idx_mk, gate_mk, w_gate_ICO, w_up_ICO, w_down_IOC, m=m, ep_axis=None, ep=1,
                             tp_axis=None, batch_axes=())
    batch = logical_to_spec(("activation_batch",), None, mesh)[0]
    batch_axes = (batch,) if isinstance(batch, str) else tuple(batch or ())
    ep, tp = mesh.shape.get("expert", 1), mesh.shape.get("tensor", 1)
    if m.n_routed_experts % ep:
        raise ConfigError(f"mesh.expert={ep} is not allowed: must divide model.n_routed_experts={m.n_routed_experts}")
    ways = math.prod(mesh.shape[a] for a in batch_axes)
    pad = -x_mC.shape[0] % ways  # e.g. one decoded token on a big mesh: padding tokens with zero gates
    if pad:
        x_mC, idx_mk, gate_mk = (jnp.pad(a, ((0, pad), (0, 0))) for a in (x_mC, idx_mk, gate_mk))
    e_ax, t_ax = ("expert" if ep > 1 else None), ("tensor" if tp > 1 else None)
    tokens, up, down = PartitionSpec(batch, None), PartitionSpec(e_ax, None, t_ax), PartitionSpec(e_ax, t_ax, None)
    fn = functools.partial(_routed_local, m=m, ep_axis=e_ax, ep=ep, tp_axis=t_ax, batch_axes=batch_axes)
    y_mC, dropped = jax.shard_map(fn, in_specs=(tokens, tokens, tokens, up, up, down),
                                  out_specs=(tokens, PartitionSpec()))(x_mC, idx_mk, gate_mk, w_gate_ICO,
                                                                       w_up_ICO, w_down_IOC)
    return (y_mC[:-pad] if pad else y_mC), dropped


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------


class MoE(nnx.Module):
    """DeepSeekMoE feed-forward: `moe(x_BTC)` -> (B, T, C); records its routing in MoeStats variables."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, out_std: float, rngs: nnx.Rngs):
        C, I, O = cfg.d_model, cfg.n_routed_experts, cfg.moe_d_ff
        init = nnx.initializers.normal(cfg.init_std)
        pdt = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.dtype = dtype
        # n_shared SwiGLU experts of width O summed = one SwiGLU of width n_shared * O (hidden units concatenated).
        self.shared = nnx.data(None if cfg.n_shared_experts == 0 else
                               MLP(cfg, dtype=dtype, out_std=out_std, rngs=rngs, d_ff=cfg.n_shared_experts * O))
        self.router_CI = param(rngs, init, (C, I), ("embed", None), pdt)  # expert centroids e_i
        self.w_gate_ICO = param(rngs, init, (I, C, O), ("experts", "embed", "moe_mlp"), pdt)
        self.w_up_ICO = param(rngs, init, (I, C, O), ("experts", "embed", "moe_mlp"), pdt)
        self.w_down_IOC = param(rngs, nnx.initializers.normal(out_std), (I, O, C), ("experts", "moe_mlp", "embed"), pdt)
        self.bias_I = RouterBias(jnp.zeros((I,), jnp.float32), axes=(None,))
        self.load_I = ExpertLoad(jnp.zeros((I,), jnp.float32), axes=(None,))
        self.dropped = DroppedTokens(jnp.zeros((), jnp.float32))
        self.balance_loss = BalanceLoss(jnp.zeros((), jnp.float32))

    def __call__(self, x_BTC: jax.Array) -> jax.Array:
        m = self.cfg
        B, T, C = x_BTC.shape
        x = x_BTC.astype(self.dtype)
        logits_BTI = jnp.einsum("btc,ci->bti", x.astype(jnp.float32), self.router_CI[...].astype(jnp.float32))
        idx_BTk, gate_BTk, s_BTI = route(logits_BTI, self.bias_I[...], m)
        self.load_I[...] = jnp.bincount(idx_BTk.reshape(-1), length=m.n_routed_experts).astype(jnp.float32)
        self.balance_loss[...] = (sequence_balance_loss(s_BTI, idx_BTk) if m.aux_loss_weight > 0
                                  else jnp.zeros((), jnp.float32))
        w = [v[...].astype(self.dtype) for v in (self.w_gate_ICO, self.w_up_ICO, self.w_down_IOC)]
        k = m.experts_per_token
        y_mC, dropped = routed_experts(x.reshape(B * T, C), idx_BTk.reshape(B * T, k), gate_BTk.reshape(B * T, k),
                                       *w, m)
        self.dropped[...] = dropped
        y_BTC = y_mC.reshape(B, T, C)
        return y_BTC if self.shared is None else y_BTC + self.shared(x)


# --------------------------------------------------------------------------------------------------
# The train step's view: statistics of every MoE layer, and the bias update
# --------------------------------------------------------------------------------------------------


def _layer_rows(model: nnx.Module, kind: type, item_ndim: int) -> list[jax.Array]:
    """Every `kind` variable's value in block order, one row per layer (stacked layers unrolled); one
    layer's value has `item_ndim` dimensions."""
    return [v.reshape(-1, *v.shape[v.ndim - item_ndim:]) for v in jax.tree.leaves(nnx.state(model, kind))]


def moe_stats(model: nnx.Module) -> dict[str, jax.Array]:
    """{"load_LI", "dropped_L", "balance_loss_L"} of the last forward pass, one row per MoE block in block
    order (L here counts MoE blocks only); {} for a model (or module) without MoE."""
    load = _layer_rows(model, ExpertLoad, 1)
    if not load:
        return {}
    return {"load_LI": jnp.concatenate(load), "dropped_L": jnp.concatenate(_layer_rows(model, DroppedTokens, 0)),
            "balance_loss_L": jnp.concatenate(_layer_rows(model, BalanceLoss, 0))}


def update_router_bias(model: nnx.Module, load_LI: jax.Array, rate: float) -> jax.Array:
    """b_i += rate * sign(mean load - load_i) per MoE block (V3 Sec. 2.1.2; rate = model.bias_update_rate),
    in place, outside any gradient; `load_LI` as `moe_stats` orders it. Returns the new biases (L, I)."""
    leaves, treedef = jax.tree.flatten(nnx.state(model, RouterBias))
    new, row = [], 0
    for b in leaves:
        n = b.size // load_LI.shape[1]
        load = load_LI[row:row + n].reshape(b.shape)
        row += n
        new.append(b + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load))
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return jnp.concatenate([b.reshape(-1, load_LI.shape[1]) for b in new])


def is_moe_block(m: ModelConfig, index: int) -> bool:
    """Whether block `index` has DeepSeekMoE as its feed-forward (every block after the dense leading ones;
    also blocks past n_layers, e.g. multi-token-prediction modules)."""
    return m.ffn == "moe" and index >= m.first_dense_layers


def moe_blocks(m: ModelConfig) -> list[int]:
    """Indices of the MoE blocks in the order `moe_stats` lists them: the main stack, then the blocks of any
    multi-token-prediction modules (n_layers + depth)."""
    indices = list(range(m.n_layers)) + [m.n_layers + k for k in range(1, m.mtp_depth + 1)]
    return [i for i in indices if is_moe_block(m, i)]
