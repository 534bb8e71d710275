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
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import numpy as np
import optax

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


class HostTables:
    """The Engram tables of every layer (config order) with their Adam moments, in host RAM."""

    def __init__(self, e: EngramConfig, tx: optax.GradientTransformation, *, seed: int = 0, initialise: bool = True):
        """`e`: the engram section; `tx`: the Engram group's optimiser (`mhc_jax.train.optimizer.engram_adam`);
        `seed`: the run's training.seed, which with engram.seed and the layer seeds each table's init."""
        if not e.enabled:
            raise ConfigError("HostTables needs engram.enabled=true")
        self.layers = tuple(e.layers)
        self.dim = e.head_dim
        self.offsets = [head_offsets(e, layer) for layer in self.layers]
        self.n_rows = [table_rows(e, layer) for layer in self.layers]
        self.tables = [np.empty((r, self.dim), np.float32) for r in self.n_rows]
        # np.zeros maps zero pages lazily: moments of rows never touched cost no physical memory.
        self.mu = [np.zeros((r, self.dim), np.float32) for r in self.n_rows]
        self.nu = [np.zeros((r, self.dim), np.float32) for r in self.n_rows]
        self.count = 0  # applied (finite) updates: Adam's step count and the LR schedule's
        self.touched = [np.zeros(r, bool) for r in self.n_rows]  # rows updated since this process started
        if initialise:
            for layer, table in zip(self.layers, self.tables):
                # N(0, table_init_std) like the dense table (demo: torch nn.Embedding), seeded per layer;
                # written in place, so a 2.5 GB table needs no temporary copy.
                np.random.default_rng([seed, e.seed, layer]).standard_normal(
                    out=table, dtype=np.float32)
                table *= np.float32(e.table_init_std)
        self._cpu = jax.devices("cpu")[0]
        self._cpu_mesh = jax.sharding.Mesh(np.asarray([self._cpu]), ("host",))  # not the trainer's mesh
        # Wrapped as the dense chain wraps it (optax.apply_if_finite, a lax.cond), so XLA fuses the row update
        # as it fuses the dense one and the results agree bitwise (no FMA contraction across the cond).
        self._tx = optax.apply_if_finite(tx, max_consecutive_errors=10**9)
        self._adam = jax.jit(self._adam_rows)
        log.info("Engram host tables: %s rows x %d, %.2f GB with moments (host RAM)", self.n_rows, self.dim,
                 3 * sum(self.n_rows) * self.dim * 4 / 1e9)

    @property
    def nbytes(self) -> int:
        """Host bytes of tables and both moments."""
        return 3 * sum(self.n_rows) * self.dim * 4

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
        unique = []
        for l in range(E):
            flat = ids[:, :, l, :].astype(np.int64) + self.offsets[l]  # each head's ids live at its offset
            u, inverse = np.unique(flat, return_inverse=True)
            if u.size > bucket:
                raise DataError(f"this batch touches {u.size} distinct rows of Engram layer {self.layers[l]}'s "
                                f"table, more than engram.row_bucket={bucket}; raise engram.row_bucket (0 = "
                                f"B * T * ids per position = {B * T * G}, never exceeded)")
            slots[:, :, l, :] = inverse.reshape(B, T, G)
            np.take(self.tables[l], u, axis=0, out=rows[l, :u.size])
            unique.append(u)
        return RowFeed(unique, slots, rows)

    def refresh(self, feed: RowFeed, updated: list[np.ndarray]) -> None:
        """Re-reads the rows of `feed` that an update after its gather changed (`updated[l]`: sorted rows)."""
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
        grads = np.asarray(row_grads_EUW, np.float32)
        with jax.set_mesh(self._cpu_mesh):
            self._apply(feed, grads)
        self.count += 1
        return list(feed.unique)

    def _apply(self, feed: RowFeed, grads: np.ndarray) -> None:
        R = grads.shape[1]
        count = jax.device_put(np.int32(self.count), self._cpu)
        for l, u in enumerate(feed.unique):
            n = u.size
            mu = np.zeros((R, self.dim), np.float32)
            nu = np.zeros((R, self.dim), np.float32)
            np.take(self.mu[l], u, axis=0, out=mu[:n])
            np.take(self.nu[l], u, axis=0, out=nu[:n])
            args = jax.device_put((feed.rows_EUW[l], mu, nu, grads[l]), self._cpu)
            new_rows, new_mu, new_nu = (np.asarray(a) for a in self._adam(count, *args))
            self.tables[l][u] = new_rows[:n]
            self.mu[l][u] = new_mu[:n]
            self.nu[l][u] = new_nu[:n]
            self.touched[l][u] = True

    # ---------------------------------------------------------------------------------------------
    # Checkpoints and statistics
    # ---------------------------------------------------------------------------------------------

    def state_dict(self, copy: bool = False) -> dict[str, Any]:
        """Numpy tree of tables, moments and step count (an Orbax item; restore with `load_state_dict`).
        `copy`: a snapshot, for an asynchronous save that must not see the next steps' updates (3x the
        tables' memory for the duration of the save)."""
        c = np.copy if copy else (lambda a: a)
        return {"count": np.asarray(self.count, np.int64),
                **{f"layer_{layer}": {"table": c(t), "mu": c(m), "nu": c(v)}
                   for layer, t, m, v in zip(self.layers, self.tables, self.mu, self.nu)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, layer in enumerate(self.layers):
            item = state[f"layer_{layer}"]
            for name, dst in (("table", self.tables), ("mu", self.mu), ("nu", self.nu)):
                arr = np.asarray(item[name])
                if arr.shape != (self.n_rows[i], self.dim):
                    raise ConfigError(f"checkpointed Engram layer {layer} {name} has shape {arr.shape}, the config "
                                      f"gives {(self.n_rows[i], self.dim)}: engram.table_size/head_dim changed")
                dst[i] = np.ascontiguousarray(arr, np.float32)
        self.count = int(np.asarray(state["count"]))

    def hit_stats(self, feed: RowFeed, n_ids: int) -> dict[str, float]:
        """Per layer: distinct rows over ids in the batch (1 = no reuse) and the fraction of the table
        updated since this process started."""
        out: dict[str, float] = {}
        for layer, u, touched in zip(self.layers, feed.unique, self.touched):
            out[f"engram{layer}_unique_rows_frac"] = u.size / max(n_ids, 1)
            out[f"engram{layer}_table_touched_frac"] = float(touched.mean())
        return out


def host_tables_from_model(e: EngramConfig, model: Any, tx: optax.GradientTransformation) -> HostTables:
    """HostTables holding the tables of a model with dense Engram tables (tests, conversions)."""
    tables = HostTables(e, tx, initialise=False)
    # Engram blocks are never stacked (model.scan_layers), so each is one of model.blocks.
    engrams = [block.engram for block in model.blocks if getattr(block, "engram", None) is not None]
    for i, engram in enumerate(engrams):
        tables.tables[i][...] = np.asarray(jax.device_get(engram.table[...]), np.float32)
    return tables

