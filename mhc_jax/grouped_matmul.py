"""Grouped matmul for dropless MoE: rows sorted by group (expert), each multiplied by its group's matrix.

    out[r] = x[r] @ w[i]   for the rows r of group i (sizes_I rows per group, in order);
    rows past sum(sizes_I) come out zero                               (jax.lax.ragged_dot's semantics)

On TPU this is `jax.lax.ragged_dot`, which XLA:TPU runs as a grouped matmul. XLA:CPU instead computes every
group as a full dense matmul over all rows and masks: I times the FLOPs and an (I, rows, f) float32
temporary (measured: 16 groups, 16x the FLOPs; 272 MiB at 64 groups for 4096 x 256 x 256), and on an H100
(jax 0.11) the mHC paper's 3B MoE (64 experts) failed to allocate the same way. Everywhere but TPU,
`grouped_matmul` runs megablox's schedule in XLA: the rows are cut into tiles of t rows, a work item is one
(tile, group) pair whose rows overlap, and a loop over the at most ceil(rows / t) + I - 1 items multiplies
each tile by its group's matrix and keeps that group's rows. FLOPs are at most (rows + (I - 1) t) e f 2,
memory O(rows (e + f)); the custom VJP runs dx as the same loop on the transposed matrices and dw as one
loop accumulating into a float32 (I, e, f) buffer (no per-item residuals are kept: the backward's extra
memory is weight-sized).

Shapes (letters of the legend in mhc_jax.model): P rows, I groups, e input width, f output width,
t rows of a tile, w work items.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

MAX_TILE = 128  # rows per tile: megablox's default row tile; a full-rate matmul on CPU


def tile_rows(rows: int, groups: int) -> int:
    """Rows per tile: the power of two at least the mean group size, in [8, MAX_TILE] (smaller tiles waste
    fewer rows where groups start mid-tile; larger ones run fewer, bigger matmuls)."""
    mean = -(-rows // max(groups, 1))
    return int(min(MAX_TILE, max(8, 1 << max(mean - 1, 0).bit_length())))


class Schedule(NamedTuple):
    """The work items: (group, tile) pairs whose rows overlap, group-major, then padding items (not valid:
    they keep no row)."""

    group_w: jax.Array
    tile_w: jax.Array
    valid_w: jax.Array
    start_I: jax.Array  # first row of each group
    end_I: jax.Array  # one past its last row (clipped to the rows there are)
    t: int

    def rows(self, a: jax.Array, item: jax.Array) -> jax.Array:
        """The item's tile of a padded (rows, ...) array."""
        return jax.lax.dynamic_slice_in_dim(a, self.tile_w[item] * self.t, self.t)

    def keep(self, item: jax.Array) -> jax.Array:
        """(t,) which of the item's tile rows belong to its group."""
        i = self.group_w[item]
        r_t = self.tile_w[item] * self.t + jnp.arange(self.t)
        return self.valid_w[item] & (r_t >= self.start_I[i]) & (r_t < self.end_I[i])


def schedule(sizes_I: jax.Array, rows: int) -> Schedule:
    """The static bound is ceil(rows / t) + I - 1 items: each group adds at most one tile it shares."""
    I = sizes_I.shape[0]
    t = tile_rows(rows, I)
    cum_rows_I = jnp.cumsum(sizes_I)
    end_I = jnp.minimum(cum_rows_I, rows)  # rows past the buffer belong to no tile
    start_I = jnp.minimum(cum_rows_I - sizes_I, rows)
    first_I = start_I // t
    count_I = jnp.where(end_I > start_I, (end_I - 1) // t - first_I + 1, 0)
    cum_items_I = jnp.cumsum(count_I)
    item_w = jnp.arange(-(-rows // t) + I - 1)
    found_w = jnp.searchsorted(cum_items_I, item_w, side="right")  # I for the padding items
    valid_w = found_w < I
    group_w = jnp.minimum(found_w, I - 1)
    tile_w = jnp.where(valid_w, first_I[group_w] + item_w - (cum_items_I[group_w] - count_I[group_w]), 0)
    return Schedule(group_w, tile_w, valid_w, start_I, end_I, t)


def _varying(a: jax.Array) -> frozenset:
    """The shard_map mesh axes `a` varies over (`.vma` in some jax releases, manual_axis_type in others)."""
    ty = jax.typeof(a)
    return frozenset(ty.vma if hasattr(ty, "vma") else ty.manual_axis_type.varying)


def _zeros_varying_like(shape: tuple[int, ...], *like: jax.Array) -> jax.Array:
    """Float32 zeros for a loop carry: inside shard_map they must vary over the same mesh axes as the
    values the loop adds into them (jax's varying-manual-axes check)."""
    axes = tuple(sorted(frozenset().union(*map(_varying, like))))
    zeros = jnp.zeros(shape, jnp.float32)
    return jax.lax.pcast(zeros, axes, to="varying") if axes else zeros


def _sum_to(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """A cotangent summed over the mesh axes it varies over and its primal does not (what autodiff does
    for an operand shared across those devices: e.g. the weight gradient over the batch axes)."""
    axes = tuple(sorted(_varying(ct) - _varying(primal)))
    return jax.lax.psum(ct, axes) if axes else ct


def _padded(a: jax.Array, t: int) -> jax.Array:
    return jnp.pad(a, ((0, -a.shape[0] % t), (0, 0)))


def _tiled_forward(x_Pe: jax.Array, w_Ief: jax.Array, s: Schedule) -> jax.Array:
    P, f = x_Pe.shape[0], w_Ief.shape[2]
    x_pad = _padded(x_Pe, s.t)

    def item(n, out_Pf):
        y_tf = jnp.dot(s.rows(x_pad, n), w_Ief[s.group_w[n]], preferred_element_type=jnp.float32)
        new_tf = s.rows(out_Pf, n) + jnp.where(s.keep(n)[:, None], y_tf, 0)
        return jax.lax.dynamic_update_slice_in_dim(out_Pf, new_tf, s.tile_w[n] * s.t, 0)

    zeros_Pf = _zeros_varying_like((x_pad.shape[0], f), x_pad, w_Ief, s.start_I)
    out_Pf = jax.lax.fori_loop(0, s.group_w.shape[0], item, zeros_Pf)
    return out_Pf[:P].astype(x_Pe.dtype)


@jax.custom_vjp
def _tiled(x_Pe: jax.Array, w_Ief: jax.Array, sizes_I: jax.Array) -> jax.Array:
    return _tiled_fwd(x_Pe, w_Ief, sizes_I)[0]


def _tiled_fwd(x_Pe, w_Ief, sizes_I):
    return _tiled_forward(x_Pe, w_Ief, schedule(sizes_I, x_Pe.shape[0])), (x_Pe, w_Ief, sizes_I)


def _tiled_bwd(res, g_Pf):
    x_Pe, w_Ief, sizes_I = res
    s = schedule(sizes_I, x_Pe.shape[0])  # one schedule for both loops
    dx_Pe = _tiled_forward(g_Pf, jnp.swapaxes(w_Ief, 1, 2), s).astype(x_Pe.dtype)
    x_pad, g_pad = _padded(x_Pe, s.t), _padded(g_Pf, s.t)

    def item(n, dw_Ief):
        x_te = jnp.where(s.keep(n)[:, None], s.rows(x_pad, n), 0)
        dw_ef = jnp.einsum("te,tf->ef", x_te, s.rows(g_pad, n), preferred_element_type=jnp.float32)
        i = s.group_w[n]
        return jax.lax.dynamic_update_index_in_dim(dw_Ief, dw_Ief[i] + dw_ef, i, 0)

    dw_Ief = jax.lax.fori_loop(0, s.group_w.shape[0], item, _zeros_varying_like(w_Ief.shape, x_pad, g_pad, s.start_I))
    return _sum_to(dx_Pe, x_Pe), _sum_to(dw_Ief, w_Ief).astype(w_Ief.dtype), None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def grouped_matmul(x_Pe: jax.Array, w_Ief: jax.Array, sizes_I: jax.Array) -> jax.Array:
    """`jax.lax.ragged_dot(x_Pe, w_Ief, sizes_I)` (module docstring): XLA's ragged dot on TPU, the tiled
    loop on every other platform (chosen per lowering platform, so TPU AOT from a CPU host gets ragged_dot).
    Result in x's dtype, accumulated in float32."""
    if x_Pe.ndim != 2 or w_Ief.ndim != 3 or sizes_I.shape != w_Ief.shape[:1] or x_Pe.shape[1] != w_Ief.shape[1]:
        raise ValueError(f"grouped_matmul expects x (rows, e), w (groups, e, f), sizes (groups,); got "
                         f"{x_Pe.shape}, {w_Ief.shape}, {sizes_I.shape}")
    x_Pe, w_Ief, sizes_I = jnp.asarray(x_Pe), jnp.asarray(w_Ief), jnp.asarray(sizes_I, jnp.int32)
    return jax.lax.platform_dependent(x_Pe, w_Ief, sizes_I, tpu=jax.lax.ragged_dot, default=_tiled)
