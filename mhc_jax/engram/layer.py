"""The Engram module: hashed n-gram rows -> per-stream gate -> causal depthwise conv -> added to the streams.

For position t with table ids (precomputed on the host, mhc_jax.engram.ids):

    e_t   = concat of the G = (max_ngram - 1) * heads_per_ngram rows     (d_mem)
    k_m   = W_K^(m) e_t,  v = W_V e_t                                    (one key per stream, shared value)
    s_m   = <RMSNorm(h_t^(m)), RMSNorm(k_m)> / sqrt(d)
    g_m   = sigmoid(sign(s_m) * sqrt(max(|s_m|, 1e-6)))                  (signed sqrt: demo and DeepSeek-V4.1)
    u_m   = g_m * v
    Y     = SiLU(Conv1D(RMSNorm(U))) + U     depthwise over n * d channels, kernel 4, dilation max_ngram,
                                             causal, zero-initialised (so Y = U at init)

and Y (n streams) is added to the residual streams before the block's attention (engram.md).

Projections have no bias, like the rest of this backbone (the demo's nn.Linear has one). When segment ids
are given, conv taps whose source lies in an earlier document are zeroed, as the hashing treats tokens of
other documents as pad; the demo does neither.

Table placement (`engram.placement`):
- `device`: rows carry the logical axis "engram_rows", which mhc_jax.sharding maps to `engram.shard_axis`;
  the lookup is a plain gather that XLA partitions (masked local gather + all-reduce), correct on any mesh.
- `host`: the table lives in host memory (`memory_kind="pinned_host"`, see `table_shardings`); the gather
  runs on the host (`compute_on("device_host")`) and only the gathered rows move to the device; the
  backward pass scatter-adds the row gradients into a host-resident gradient. The train step
  (mhc_jax.train.step.step_fn) runs the optimiser update on the device and writes table and moments back.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.experimental.compute_on import compute_on
from jax.sharding import NamedSharding

from mhc_jax.config import EngramConfig
from mhc_jax.errors import ConfigError
from mhc_jax.engram.hashing import engram_primes
from mhc_jax.layers import RMSNorm, compute_dtype, param, rms_norm

log = logging.getLogger(__name__)

GATE_EPS = 1e-6  # demo: |s|.clamp_min(1e-6).sqrt()
HOST_MEMORY_KIND = "pinned_host"
EngramState = dict[str, jax.Array]  # {"conv": (B, (kernel - 1) * max_ngram, n, C) past normed conv inputs}


# --------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------


def layer_primes(e: EngramConfig, layer_id: int) -> np.ndarray:
    """(max_ngram - 1, K) table sizes of one Engram layer; the primes depend on the whole layer list."""
    if layer_id not in e.layers:
        raise ValueError(f"layer_id={layer_id} is not in engram.layers={e.layers}")
    return engram_primes(e.layers, e.max_ngram, e.heads_per_ngram, e.table_size)[layer_id]


def head_offsets(e: EngramConfig, layer_id: int) -> np.ndarray:
    """First row of each head's block in the layer's one table, in the order of the hashed ids."""
    sizes = layer_primes(e, layer_id).reshape(-1)
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def table_rows(e: EngramConfig, layer_id: int) -> int:
    """Sum of the per-head primes, padded to a multiple of engram.row_pad_multiple."""
    rows = int(layer_primes(e, layer_id).sum())
    m = e.row_pad_multiple
    return -(-rows // m) * m


def engram_param_count(e: EngramConfig, layer_id: int, d_model: int, n_streams: int) -> int:
    """table + n key projections + value projection + 3 per-stream RMSNorm scales + conv weights."""
    C, n = d_model, n_streams
    return (table_rows(e, layer_id) * e.head_dim + (n + 1) * e.d_mem * C + 3 * n * C
            + e.kernel_size * n * C)


def table_bytes(e: EngramConfig, layer_id: int, param_dtype: str = "float32") -> int:
    """Memory of one layer's table: rows x W (engram.head_dim) x bytes per element (model.param_dtype)."""
    return table_rows(e, layer_id) * e.head_dim * jnp.dtype(param_dtype).itemsize


# --------------------------------------------------------------------------------------------------
# Lookups
# --------------------------------------------------------------------------------------------------

_ROW_GATHER = lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,), start_index_map=(0,))


def _gather_rows(table_RW: jax.Array, ids_N: jax.Array) -> jax.Array:
    # promise_in_bounds: ids come from the hasher (< prime) plus offsets, and it adds no clamp constants
    # (which would live in device memory and break the host-side computation).
    return lax.gather(table_RW, ids_N[:, None], _ROW_GATHER, slice_sizes=(1, table_RW.shape[1]),
                      mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def device_lookup(table_RW: jax.Array, ids_N: jax.Array) -> jax.Array:
    """Rows of a device-resident (possibly row-sharded) table; the gradient is a scatter-add, so rows not
    looked up get exactly zero."""
    return jnp.take(table_RW, ids_N, axis=0, mode="clip")


def host_lookup(table_RW: jax.Array, ids_N: jax.Array) -> jax.Array:
    """Rows of a host-resident table: gathered on the host, only the rows are copied to the device. The
    gradient is a scatter-add of the row gradients, returned in the table's memory space. A table still in
    device memory (state not placed with `table_shardings`) is copied to the host, loudly."""
    space = jax.typeof(table_RW).memory_space
    if space != jax.memory.Space.Host:
        log.warning("Engram placement=host but the table is in %s memory: copying the whole table to the host "
                    "on every call; place the state with mhc_jax.engram.layer.table_shardings", space)
    return _host_lookup((tuple(table_RW.shape), str(table_RW.dtype), space == jax.memory.Space.Host),
                        table_RW, ids_N)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _host_lookup(meta: tuple, table_RW: jax.Array, ids_N: jax.Array) -> jax.Array:
    del meta
    table_host = jax.device_put(table_RW, jax.memory.Space.Host)  # no-op when already there
    ids_host = jax.device_put(ids_N, jax.memory.Space.Host)
    rows = compute_on("device_host")(jax.jit(_gather_rows))(table_host, ids_host)
    return jax.device_put(rows, jax.memory.Space.Device)


def _host_lookup_fwd(meta: tuple, table_RW: jax.Array, ids_N: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _host_lookup(meta, table_RW, ids_N), ids_N


def _host_lookup_bwd(meta: tuple, ids_N: jax.Array, grad_NW: jax.Array) -> tuple[jax.Array, None]:
    shape, dtype, on_host = meta
    grad_RW = jnp.zeros(shape, dtype).at[ids_N].add(grad_NW.astype(dtype), mode="promise_in_bounds")
    return (jax.device_put(grad_RW, jax.memory.Space.Host) if on_host else grad_RW), None


_host_lookup.defvjp(_host_lookup_fwd, _host_lookup_bwd)


def host_memory_supported() -> bool:
    return any(m.kind == HOST_MEMORY_KIND for m in jax.devices()[0].addressable_memories())


def table_shardings(state: Any, shardings: Any, e: EngramConfig) -> Any:
    """`shardings` (from mhc_jax.sharding.state_shardings(state, ...)) with every Engram table (the params
    whose axes include "engram_rows") moved to host memory when engram.placement=host; unchanged for
    device. Use the result for `jax.device_put(state, ...)` and as the jit in/out shardings."""
    if not e.enabled or e.placement != "host" or e.sparse:
        return shardings
    if not host_memory_supported():
        raise ConfigError(f"engram.placement='host' needs memory kind {HOST_MEMORY_KIND!r}, which backend "
                          f"{jax.default_backend()!r} does not offer "
                          f"({[m.kind for m in jax.devices()[0].addressable_memories()]}); use placement=device")

    def one(s: Any, v: Any) -> Any:
        axes = v.get_metadata().get("axes") if isinstance(v, nnx.Variable) else None
        if isinstance(s, NamedSharding) and axes and "engram_rows" in axes:
            return s.with_memory_kind(HOST_MEMORY_KIND)
        return s

    return jax.tree.map(one, shardings, state, is_leaf=lambda x: isinstance(x, NamedSharding))


# --------------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------------


def _scales(norms: nnx.List) -> jax.Array:
    """The learned scales of n per-stream RMSNorms, stacked to (n, C) float32."""
    return jnp.stack([norm.scale[...] for norm in norms]).astype(jnp.float32)


class Engram(nnx.Module):
    """`engram(x_BTnC, ids_BTG, segment_ids_BT, state)` -> (Y_BTnC, new_state or None)."""

    def __init__(self, e: EngramConfig, layer_id: int, *, d_model: int, n_streams: int, n_layers: int,
                 init_std: float, norm_eps: float, dtype: str, param_dtype: str, rngs: nnx.Rngs):
        """`e`: the engram section; the model's width C (`d_model`), residual streams n, depth (`n_layers`,
        which scales the value projection's init like the other projections writing the residual),
        `init_std`, `norm_eps`, compute and parameter dtypes."""
        C, n, M = d_model, n_streams, e.d_mem
        self.layer_id = layer_id
        self.n_streams = n
        self.d_model = C
        self.head_dim = e.head_dim
        self.n_ids = (e.max_ngram - 1) * e.heads_per_ngram
        self.kernel_size = e.kernel_size
        self.dilation = e.max_ngram  # demo: dilation = max_ngram_size
        self.placement = e.placement
        self.sparse = e.sparse  # no table here: the step passes the batch's rows (mhc_jax.engram.host_tables)
        self.capture_gates = False  # set by mhc_jax.diagnostics.engram_gate_stats: sow the gates
        self.eps = norm_eps
        self.dtype = compute_dtype(dtype)
        # Sparse: the host adds the offsets (HostTables.feed), so nothing here depends on the table's size and
        # one compiled step serves every table size.
        self.offsets = () if e.sparse else tuple(int(o) for o in head_offsets(e, layer_id))
        rows = table_rows(e, layer_id)
        if e.placement == "host" and not e.sparse and not host_memory_supported():
            raise ConfigError(f"engram.placement='host' needs memory kind {HOST_MEMORY_KIND!r}, which backend "
                              f"{jax.default_backend()!r} does not offer; use placement=device")
        log.info("Engram layer %d: table %d rows x %d = %.1f MB, placement=%s%s", layer_id, rows, e.head_dim,
                 table_bytes(e, layer_id, param_dtype) / 2**20, e.placement,
                 f" (rows sharded over mesh axis {e.shard_axis!r})" if e.placement == "device"
                 else " (host RAM, sparse row updates)" if e.sparse
                 else f" (memory kind {HOST_MEMORY_KIND}, gather on the host)")

        pdt = jnp.dtype(param_dtype)
        if e.sparse:
            rngs.params()  # the table's key, unused: every other parameter gets the key it has with dense tables
            self.table = nnx.data(None)
        else:
            self.table = param(rngs, nnx.initializers.normal(e.table_init_std), (rows, e.head_dim),
                               ("engram_rows", "engram_mem"), pdt)
        key_init = nnx.initializers.normal(1.0 / math.sqrt(M))  # keys are RMS-normed, scale only sets init
        out_std = init_std / math.sqrt(2 * n_layers)  # like the other projections writing the residual
        self.key_projs = nnx.List([param(rngs, key_init, (M, C), ("engram_mem", "embed"), pdt)
                                   for _ in range(n)])
        self.value_proj = param(rngs, nnx.initializers.normal(out_std), (M, C), ("engram_mem", "embed"), pdt)
        self.key_norms = nnx.List([RMSNorm(C, eps=norm_eps, dtype=jnp.float32, rngs=rngs) for _ in range(n)])
        self.query_norms = nnx.List([RMSNorm(C, eps=norm_eps, dtype=jnp.float32, rngs=rngs)
                                     for _ in range(n)])
        self.conv_norms = nnx.List([RMSNorm(C, eps=norm_eps, dtype=jnp.float32, rngs=rngs)
                                    for _ in range(n)])
        # Engram paper: the conv is zero-initialised so the module starts as Y = U.
        self.conv = param(rngs, nnx.initializers.zeros, (e.kernel_size, n, C), ("conv", "streams", "embed"), pdt)

    @property
    def context(self) -> int:
        """Past positions the causal conv reads: (kernel - 1) * dilation."""
        return (self.kernel_size - 1) * self.dilation

    def init_cache(self, batch: int) -> EngramState:
        return {"conv": jnp.zeros((batch, self.context, self.n_streams, self.d_model), self.dtype)}

    def lookup(self, ids_BTG: jax.Array, rows_UW: jax.Array | None = None) -> jax.Array:
        """Table ids (B, T, G) -> concatenated rows e (B, T, d_mem). With sparse updates `ids_BTG` are slots
        into `rows_UW`, the batch's unique rows gathered on the host (their gradient is the rows' gradient)."""
        B, T, G = ids_BTG.shape
        if G != self.n_ids:
            raise ValueError(f"Engram layer {self.layer_id} expects {self.n_ids} ids per position "
                             f"((max_ngram - 1) * heads_per_ngram), got shape {ids_BTG.shape}")
        if self.sparse:
            if rows_UW is None:
                raise ValueError(f"Engram layer {self.layer_id} has engram.update=sparse and holds no table: pass "
                                 "the batch's rows (engram_rows_EUW from mhc_jax.engram.host_tables.HostTables.feed)")
            return jnp.take(rows_UW, ids_BTG.reshape(-1), axis=0, mode="clip").reshape(B, T, G * self.head_dim)
        rows_N = (ids_BTG.astype(jnp.int32) + jnp.asarray(self.offsets, jnp.int32)).reshape(-1)
        lookup = host_lookup if self.placement == "host" else device_lookup
        rows_NW = lookup(self.table[...], rows_N)
        return rows_NW.reshape(B, T, G * self.head_dim)

    def __call__(self, x_BTnC: jax.Array, ids_BTG: jax.Array, segment_ids_BT: jax.Array | None = None,
                 state: EngramState | None = None, rows_UW: jax.Array | None = None
                 ) -> tuple[jax.Array, EngramState | None]:
        B, T, n, C = x_BTnC.shape
        if n != self.n_streams:
            raise ValueError(f"Engram layer {self.layer_id} was built for {self.n_streams} streams, got {n}")
        dt = self.dtype
        e_BTM = self.lookup(ids_BTG, rows_UW).astype(dt)
        v_BTC = jnp.einsum("btm,mc->btc", e_BTM, self.value_proj[...].astype(dt))
        gate_BTn = self.gate(x_BTnC, e_BTM)
        if self.capture_gates:
            self.sow(nnx.Intermediate, "gate", gate_BTn)
        u_BTnC = gate_BTn[..., None] * v_BTC[:, :, None, :].astype(jnp.float32)
        normed_BTnC = (rms_norm(u_BTnC, self.eps) * _scales(self.conv_norms)).astype(dt)
        conv_BTnC, new_state = self._causal_conv(normed_BTnC, segment_ids_BT, state)
        y_BTnC = jax.nn.silu(conv_BTnC) + u_BTnC
        return y_BTnC.astype(dt), new_state

    def gate(self, x_BTnC: jax.Array, e_BTM: jax.Array) -> jax.Array:
        """Per-stream gate in (0, 1), shape (B, T, n), float32."""
        w_key_nMC = jnp.stack([w[...] for w in self.key_projs]).astype(e_BTM.dtype)
        k_BTnC = jnp.einsum("btm,nmc->btnc", e_BTM, w_key_nMC)
        q_BTnC = rms_norm(x_BTnC, self.eps) * _scales(self.query_norms)
        k_BTnC = rms_norm(k_BTnC, self.eps) * _scales(self.key_norms)
        s_BTn = jnp.sum(q_BTnC * k_BTnC, axis=-1) / math.sqrt(self.d_model)
        return jax.nn.sigmoid(jnp.sign(s_BTn) * jnp.sqrt(jnp.maximum(jnp.abs(s_BTn), GATE_EPS)))

    def _causal_conv(self, normed_BTnC: jax.Array, segment_ids_BT: jax.Array | None,
                     state: EngramState | None) -> tuple[jax.Array, EngramState | None]:
        """Depthwise causal conv with dilation; tap i reads position t - (kernel - 1 - i) * dilation
        (torch Conv1d convention, as the demo). With a state, the past comes from the cache."""
        B, T = normed_BTnC.shape[:2]
        P = self.context
        past = (jnp.zeros((B, P) + normed_BTnC.shape[2:], normed_BTnC.dtype) if state is None
                else state["conv"].astype(normed_BTnC.dtype))
        hist_BSnC = jnp.concatenate([past, normed_BTnC], axis=1)  # S = P + T
        if state is None and segment_ids_BT is not None:
            t_T = jnp.arange(T)
            boundary_BT = jnp.concatenate([jnp.ones((B, 1), bool),
                                           segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
            first_BT = lax.cummax(jnp.where(boundary_BT, t_T, 0), axis=1)
        w_QnC = self.conv[...].astype(normed_BTnC.dtype)
        out = jnp.zeros_like(normed_BTnC, dtype=jnp.float32)
        for i in range(self.kernel_size):
            lag = (self.kernel_size - 1 - i) * self.dilation
            tap_BTnC = lax.dynamic_slice_in_dim(hist_BSnC, P - lag, T, axis=1)
            if state is None and segment_ids_BT is not None and lag > 0:
                tap_BTnC = jnp.where(((t_T - lag) >= first_BT)[:, :, None, None], tap_BTnC, 0)
            out = out + (tap_BTnC * w_QnC[i]).astype(jnp.float32)
        new_state = None if state is None else {"conv": hist_BSnC[:, T:]}
        return out, new_state
