"""Host-resident Engram tables with sparse row updates (engram.update=sparse, the default for placement=host).

The Engram paper's systems claim: the rows a step needs are known from the token ids before the step runs,
so the tables can live in host memory (engram.md, "System facts"). Here every table and its two Adam
moments are numpy arrays in host RAM, and per step

1. `feed(ids)`: the batch's table rows are deduplicated per layer (sorted unique rows), gathered from the
   host table and padded to a static bucket of U rows (`cfg.engram_row_bucket`); the batch's ids become slots into
   the bucket. The device receives (E, U, W) rows and never holds more than the batch's rows of a table.
2. the jitted step (mhc_jax.train.step) runs the model on those rows and returns their gradients, clipped
   together with the parameters' gradients by one global norm;
3. `apply(feed, row_grads)`: a row-wise Adam updates the touched rows and their moments in host memory
   with the Engram group's optimiser (passed in: `mhc_jax.train.optimizer.engram_adam`, engram.lr_multiplier
   x LR, no weight decay), run by optax itself on the host CPU, so its arithmetic is the dense update's.

Lazy Adam semantics (how sparse differs from dense Adam): the step count (bias correction, LR schedule)
is global and advances on every applied step, as in dense Adam. A row the batch does not touch keeps its
value and both moments unchanged. Dense Adam instead gives it a zero gradient: its moments decay
(m <- b1 m, v <- b2 v) and the row keeps moving by lr * m_hat / (sqrt(v_hat) + eps) on momentum alone.
The two agree exactly when every row is touched every step; otherwise an untouched row's next update uses
its moments as they were when it was last touched (TensorFlow's LazyAdam, and the Engram paper's
row-exchange design: only looked-up rows get an update).

Checkpoints: `state_dict()` / `load_state_dict()` give the tables, moments and step count as numpy trees,
saved by Orbax beside the train state (mhc_jax.train.checkpoint), bitwise.

Several processes (multi-host): process p of P owns rows [p c, (p + 1) c) of every table, c = ceil(rows / P)
(rows are a multiple of engram.row_pad_multiple, so P dividing it splits them evenly), and holds only those
rows and their moments. The trainer's step takes the batch's unique rows replicated over the mesh (as on
one process), so every process needs every row of the global batch:

1. `feed`: each process deduplicates its own rows of the batch; the ids are all-gathered (one fixed-size
   (E, U) int32 bucket per process), so every process forms the same sorted global unique set (the set one
   process computes from the whole batch) and its own slots into it; each owner fills the rows it owns
   (a contiguous run of the sorted set) and the (E, U, W) buckets are all-gathered and each row taken from
   its owner: the exchange is two `multihost_utils.process_allgather` collectives (gloo on CPU, the
   interconnect on TPU/GPU) of fixed size U per process, no device-mesh program.
2. the step's row gradients come out reduced over the whole mesh (the rows are replicated), so the return
   trip costs nothing: each owner applies the row-wise Adam to its own run of the rows.
Every process takes part in each feed, in the same order (the prefetch thread is off with several
processes, so the collectives never race the step's). Checkpoints save each process's range as its shard
of one global array per table (Orbax, every process writing its own rows); checksums are summed over the
ranges and equal the one-process checksums.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils

from mhc_jax.config import EngramConfig
from mhc_jax.errors import ConfigError, DataError
from mhc_jax.engram.layer import head_offsets, table_rows

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RowFeed:
    """One batch's Engram rows. unique[l]: the sorted table rows of layer l the batch touches (n_l,);
    slots_BTEG: int32 positions of each id in its layer's bucket; rows_EUW: float32 bucket, rows
    [0, n_l) of layer l = table[unique[l]], the rest zero (never looked up, zero gradient)."""

    unique: list[np.ndarray]
    slots_BTEG: np.ndarray
    rows_EUW: np.ndarray


_INIT_BLOCK = 1 << 16  # rows per independently seeded init block: any row range initialises alone


class HostTables:
    """The Engram tables of every layer (config order) with their Adam moments, in host RAM; with several
    processes each holds its own row range (`lo`, `hi`) of every table (see the module docstring)."""

    def __init__(self, e: EngramConfig, tx: optax.GradientTransformation, *, seed: int = 0, initialise: bool = True,
                 process_index: int | None = None, process_count: int | None = None):
        """`e`: the engram section; `tx`: the Engram group's optimiser (`mhc_jax.train.optimizer.engram_adam`);
        `seed`: the run's training.seed, which with engram.seed and the layer seeds each table's init;
        `process_index` / `process_count`: this process's row range (default: jax's)."""
        if not e.enabled:
            raise ConfigError("HostTables needs engram.enabled=true")
        self.process_count = jax.process_count() if process_count is None else process_count
        self.process_index = jax.process_index() if process_index is None else process_index
        self.layers = tuple(e.layers)
        self.dim = e.head_dim
        self.offsets = [head_offsets(e, layer) for layer in self.layers]
        self.n_rows = [table_rows(e, layer) for layer in self.layers]
        if max(self.n_rows) >= 2**31 and self.process_count > 1:
            raise ConfigError(f"Engram tables of {max(self.n_rows)} rows: the multi-process row exchange sends "
                              "int32 row ids (< 2**31 rows per layer)")
        # Row range of this process: rows_per[l] per process (the last one's tail past n_rows is padding).
        self.rows_per = [-(-r // self.process_count) for r in self.n_rows]
        self.lo = [self.process_index * c for c in self.rows_per]
        self.hi = [min(lo + c, r) for lo, c, r in zip(self.lo, self.rows_per, self.n_rows)]
        self.tables = [np.zeros((c, self.dim), np.float32) for c in self.rows_per]
        # Moments of rows never touched cost no physical memory (`_lazy_zeros`).
        self.mu = [_lazy_zeros((c, self.dim)) for c in self.rows_per]
        self.nu = [_lazy_zeros((c, self.dim)) for c in self.rows_per]
        self.count = 0  # applied (finite) updates: Adam's step count and the LR schedule's
        self.touched = [np.zeros(c, bool) for c in self.rows_per]  # own rows updated since this process started
        if initialise:
            for layer, table, lo, hi in zip(self.layers, self.tables, self.lo, self.hi):
                _init_rows(table, lo, hi, [seed, e.seed, layer], e.table_init_std)
        self._cpu = jax.local_devices(backend="cpu")[0]
        self._cpu_mesh = jax.sharding.Mesh(np.asarray([self._cpu]), ("host",))  # not the trainer's mesh
        # Wrapped in a lax.cond as the dense chain is (train.optimizer.clip_if_finite), so XLA fuses the row update
        # as it fuses the dense one and the results agree bitwise (no FMA contraction across the cond).
        self._tx = optax.apply_if_finite(tx, max_consecutive_errors=10**9)
        self._adam = jax.jit(self._adam_rows)
        log.info("Engram host tables: %s rows x %d, %.2f GB with moments (host RAM)", self.n_rows, self.dim,
                 3 * sum(self.n_rows) * self.dim * 4 / 1e9)

    @property
    def nbytes(self) -> int:
        """Host bytes of this process's tables and both moments."""
        return 3 * sum(t.nbytes for t in self.tables)

    # ---------------------------------------------------------------------------------------------
    # Rows for a batch
    # ---------------------------------------------------------------------------------------------

    def feed(self, ids_BTEG: np.ndarray, bucket: int) -> RowFeed:
        """Deduplicates the batch's table ids per layer and gathers their rows (see RowFeed)."""
        ids = np.asarray(ids_BTEG)
        if ids.ndim != 4 or ids.shape[2] != len(self.layers):
            raise ValueError(f"engram ids must have shape (batch, time, {len(self.layers)} layers, ids), "
                             f"got {ids.shape}")
        B, T, E, G = ids.shape
        slots = np.empty(ids.shape, np.int32)
        rows = np.zeros((E, bucket, self.dim), np.float32)
        flats = [ids[:, :, l, :].astype(np.int64) + self.offsets[l] for l in range(E)]  # heads at their offsets
        if self.process_count > 1:
            return self._exchange(flats, slots, rows, B * T * G * self.process_count)
        unique = []
        for l in range(E):
            u, inverse = np.unique(flats[l], return_inverse=True)
            self._check_bucket(u.size, bucket, l, B * T * G)
            slots[:, :, l, :] = inverse.reshape(B, T, G)
            np.take(self.tables[l], u, axis=0, out=rows[l, :u.size])
            unique.append(u)
        return RowFeed(unique, slots, rows)

    def _check_bucket(self, n: int, bucket: int, l: int, most: int) -> None:
        if n > bucket:
            raise DataError(f"this batch touches {n} distinct rows of Engram layer {self.layers[l]}'s "
                            f"table, more than engram.row_bucket={bucket}; raise engram.row_bucket (0 = "
                            f"B * T * ids per position = {most}, never exceeded)")

    def own(self, l: int, u: np.ndarray) -> slice:
        """The run of sorted global rows `u` (of layer l) that this process owns."""
        return slice(*np.searchsorted(u, [self.lo[l], self.hi[l]]))

    def _exchange(self, flats: list[np.ndarray], slots: np.ndarray, rows: np.ndarray, most: int) -> RowFeed:
        """`feed` across processes (module docstring): every process calls it with its own rows of the batch."""
        E, bucket = rows.shape[:2]
        local = np.full((E, bucket), -1, np.int32)
        for l, flat in enumerate(flats):
            u = np.unique(flat)
            self._check_bucket(u.size, bucket, l, most)  # the global set is larger still: same error
            local[l, :u.size] = u
        every = np.asarray(multihost_utils.process_allgather(local))  # (P, E, U)
        unique = []
        for l, flat in enumerate(flats):
            u = np.unique(every[:, l][every[:, l] >= 0]).astype(np.int64)  # the same on every process
            self._check_bucket(u.size, bucket, l, most)
            slots[:, :, l, :] = np.searchsorted(u, flat).astype(np.int32)
            mine = self.own(l, u)
            np.take(self.tables[l], u[mine] - self.lo[l], axis=0, out=rows[l, mine])
            unique.append(u)
        owned = np.asarray(multihost_utils.process_allgather(rows))  # (P, E, U, W): each row from its owner
        for p in range(self.process_count):
            for l, u in enumerate(unique):
                lo = p * self.rows_per[l]
                run = slice(*np.searchsorted(u, [lo, min(lo + self.rows_per[l], self.n_rows[l])]))
                rows[l, run] = owned[p, l, run]
        return RowFeed(unique, slots, rows)

    def refresh(self, feed: RowFeed, updated: list[np.ndarray]) -> None:
        """Re-reads the rows of `feed` that an update after its gather changed (`updated[l]`: sorted rows).
        One process only (several never prefetch: `feed` is a collective)."""
        for l, (u, changed) in enumerate(zip(feed.unique, updated)):
            common, in_feed, _ = np.intersect1d(u, changed, assume_unique=True, return_indices=True)
            if common.size:
                feed.rows_EUW[l, in_feed] = self.tables[l][common]

    # ---------------------------------------------------------------------------------------------
    # Row-wise (lazy) Adam
    # ---------------------------------------------------------------------------------------------

    def _adam_rows(self, count: jax.Array, rows: jax.Array, mu: jax.Array, nu: jax.Array,
                   grads: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        state = optax.tree_utils.tree_set(self._tx.init(rows), count=count, mu=mu, nu=nu)
        updates, state = self._tx.update(grads, state, rows)
        return (optax.apply_updates(rows, updates), optax.tree_utils.tree_get(state, "mu"),
                optax.tree_utils.tree_get(state, "nu"))

    def apply(self, feed: RowFeed, row_grads_EUW: Any, finite: bool = True) -> list[np.ndarray]:
        """Adam on the rows of `feed` with their gradients (E, U, W) from the step; returns the updated rows
        per layer. A non-finite step is skipped, as `optax.apply_if_finite` skips the parameters'."""
        if not finite:
            return [np.zeros(0, np.int64) for _ in self.layers]
        if isinstance(row_grads_EUW, jax.Array) and not row_grads_EUW.is_fully_addressable:
            row_grads_EUW = multihost_utils.process_allgather(row_grads_EUW, tiled=True)
        grads = np.asarray(row_grads_EUW, np.float32)
        with jax.set_mesh(self._cpu_mesh):
            self._apply(feed, grads)
        self.count += 1
        return list(feed.unique)

    def _apply(self, feed: RowFeed, grads: np.ndarray) -> None:
        """One Adam call for the rows this process owns of every layer, packed into a buffer of the next
        power of two rows (a handful of compiled shapes; not the whole bucket, whose tail is padding)."""
        runs = [(l, u[self.own(l, u)] - self.lo[l], self.own(l, u).start) for l, u in enumerate(feed.unique)]
        total = sum(r.size for _, r, _ in runs)
        R = 1 << max(8, (total - 1).bit_length())
        buf = np.zeros((4, R, self.dim), np.float32)  # rows, mu, nu, grads
        at = 0
        for l, rows_u, a in runs:
            n = rows_u.size
            buf[0, at:at + n], buf[3, at:at + n] = feed.rows_EUW[l, a:a + n], grads[l, a:a + n]
            np.take(self.mu[l], rows_u, axis=0, out=buf[1, at:at + n])
            np.take(self.nu[l], rows_u, axis=0, out=buf[2, at:at + n])
            at += n
        count = jax.device_put(np.int32(self.count), self._cpu)
        new_rows, new_mu, new_nu = (np.asarray(x) for x in self._adam(count, *jax.device_put(tuple(buf), self._cpu)))
        at = 0
        for l, rows_u, _ in runs:
            n = rows_u.size
            self.tables[l][rows_u] = new_rows[at:at + n]
            self.mu[l][rows_u] = new_mu[at:at + n]
            self.nu[l][rows_u] = new_nu[at:at + n]
            self.touched[l][rows_u] = True
            at += n

    # ---------------------------------------------------------------------------------------------
    # Checkpoints and statistics
    # ---------------------------------------------------------------------------------------------

    def state_dict(self, copy: bool = False) -> dict[str, Any]:
        """Numpy tree of tables, moments and step count (an Orbax item; restore with `load_state_dict`).
        `copy`: a snapshot, for an asynchronous save that must not see the next steps' updates (3x the
        tables' memory for the duration of the save)."""
        c = np.copy if copy else (lambda a: a)
        if self.process_count > 1:  # each process's range is its shard of one global array per table
            devices = np.asarray([jax.local_devices(process_index=p, backend="cpu")[0]
                                  for p in range(self.process_count)])
            rows = jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("rows",)), jax.sharding.PartitionSpec("rows"))
            c = lambda a: jax.make_array_from_process_local_data(rows, a)  # noqa: E731 - a copy in CPU memory
        return {"count": np.asarray(self.count, np.int64),
                **{f"layer_{layer}": {"table": c(t), "mu": c(m), "nu": c(v)}
                   for layer, t, m, v in zip(self.layers, self.tables, self.mu, self.nu)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """From `state_dict`'s tree (numpy, or global arrays with this process's range as its shard)."""
        for i, layer in enumerate(self.layers):
            item = state[f"layer_{layer}"]
            for name, dst in (("table", self.tables), ("mu", self.mu), ("nu", self.nu)):
                x = item[name]
                whole = (self.rows_per[i] * self.process_count, self.dim)
                if x.shape != whole:
                    raise ConfigError(f"checkpointed Engram layer {layer} {name} has shape {x.shape}, this run "
                                      f"needs {whole} ({self.process_count} process(es) x {self.rows_per[i]} rows): "
                                      "engram.table_size/head_dim or the process count changed")
                if isinstance(x, jax.Array) and not x.is_fully_addressable:
                    x = x.addressable_shards[0].data
                else:
                    x = np.asarray(x)[self.lo[i]:self.lo[i] + self.rows_per[i]]
                dst[i] = np.array(x, np.float32, order="C")
        self.count = int(np.asarray(state["count"]))

    def hit_stats(self, feed: RowFeed, n_ids: int) -> dict[str, float]:
        """Per layer: distinct rows over ids in the batch (1 = no reuse) and the fraction of the table
        updated since this process started."""
        out: dict[str, float] = {}  # several processes: touched_frac of process 0's rows (it writes them)
        for layer, u, touched in zip(self.layers, feed.unique, self.touched):
            out[f"engram{layer}_unique_rows_frac"] = u.size / max(n_ids, 1)
            out[f"engram{layer}_table_touched_frac"] = float(touched.mean())
        return out


def _lazy_zeros(shape: tuple[int, int]) -> np.ndarray:
    """float32 zeros in anonymous memory the kernel maps on first write, 4 KiB at a time. np.zeros of a
    large array is no such thing here: numpy asks for transparent huge pages, so a random row write
    commits 2 MiB, and a few thousand random rows commit the whole array (measured: 40k rows of a
    10M x 64 array commit 2.6 GB with np.zeros, 0.19 GB with this)."""
    buf = mmap.mmap(-1, max(1, int(np.prod(shape)) * 4))
    return np.frombuffer(buf, np.float32, count=int(np.prod(shape))).reshape(shape)


def _init_rows(table: np.ndarray, lo: int, hi: int, seed: list[int], std: float) -> None:
    """Rows [lo, hi) of a table into `table[:hi - lo]`: N(0, std) like the dense table (demo: torch
    nn.Embedding), each block of _INIT_BLOCK rows from its own seed, so a process initialises its range
    alone and gets the rows one process would hold; written in place (a 2.5 GB table needs no copy)."""
    for start in range(lo - lo % _INIT_BLOCK, hi, _INIT_BLOCK):
        a, b = max(start, lo), min(start + _INIT_BLOCK, hi)
        rng = np.random.default_rng([*seed, start // _INIT_BLOCK])
        if a == start and b == start + _INIT_BLOCK:
            rng.standard_normal(out=table[a - lo:b - lo], dtype=np.float32)
        else:  # a block cut by the range: draw it whole
            table[a - lo:b - lo] = rng.standard_normal((_INIT_BLOCK, table.shape[1]), np.float32)[a - start:b - start]
    table[:hi - lo] *= np.float32(std)


def host_tables_from_model(e: EngramConfig, model: Any, tx: optax.GradientTransformation) -> HostTables:
    """HostTables holding the tables of a model with dense Engram tables (tests, conversions)."""
    tables = HostTables(e, tx, initialise=False)
    # Engram blocks are never stacked (model.scan_layers), so each is one of model.blocks.
    engrams = [block.engram for block in model.blocks if getattr(block, "engram", None) is not None]
    for i, engram in enumerate(engrams):
        tables.tables[i][...] = np.asarray(jax.device_get(engram.table[...]), np.float32)
    return tables

