"""The trainer's glue for sparse Engram tables (engram.update=sparse): host tables, their row prefetcher,
evaluation batches with rows, and their checkpoint item. See mhc_jax.engram.host_tables for the method."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from mhc_jax.config import Config
from mhc_jax.engram.host_tables import HostTables
from mhc_jax.engram.row_prefetch import RowPrefetcher
from mhc_jax.errors import ConfigError
from mhc_jax.sharding import batch_shardings, global_batch
from mhc_jax.train.checkpoint import Checkpointer
from mhc_jax.train.optimizer import engram_adam
from mhc_jax.train.state import CHECKPOINT_DIR


def host_tables(cfg: Config, initialise: bool = True) -> HostTables:
    """This process's row range of every table (all rows on one process)."""
    return HostTables(cfg.engram, engram_adam(cfg), seed=cfg.training.seed, initialise=initialise)


def _to_device(mesh: Mesh):
    return lambda b: global_batch(b, batch_shardings(b, mesh))


def row_prefetcher(cfg: Config, mesh: Mesh, batches: Iterator[dict], tables: HostTables) -> RowPrefetcher:
    """Wraps the host-side train iterator (`make_train_iterator(cfg)` without a mesh). Several processes
    never prefetch: their `feed` is a collective, which must not run beside the step's collectives."""
    return RowPrefetcher(batches, tables, cfg.engram_row_bucket, _to_device(mesh),
                         prefetch=cfg.engram.rows_prefetch and tables.process_count == 1)


def with_rows(cfg: Config, mesh: Mesh, tables: HostTables, batches: Iterable[dict]) -> Iterator[dict]:
    """Host batches (evaluation: `make_eval_iterator(cfg)` without a mesh) -> device batches with their
    rows; no update follows."""
    to_device = _to_device(mesh)
    for batch in batches:
        feed = tables.feed(batch["engram_ids"], cfg.engram_row_bucket)
        yield to_device({**batch, "engram_ids": feed.slots_BTEG, "engram_rows": feed.rows_EUW})


def restore_tables(ckpt: Checkpointer, tables: HostTables, step: int) -> None:
    tables.load_state_dict(ckpt.restore_host_state(tables.state_dict(), step))


def load_tables(ckpt: Checkpointer, cfg: Config, step: int) -> HostTables:
    """The host tables of checkpoint `step` (generation and evaluation of a sparse run)."""
    tables = host_tables(cfg, initialise=False)
    restore_tables(ckpt, tables, step)
    return tables


def tables_from_workdir(workdir: str, cfg: Config, step: int) -> HostTables | None:
    """The host tables saved with checkpoint `step` of a workdir; None unless engram.update=sparse."""
    if not cfg.engram.sparse:
        return None
    ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), cfg.checkpoint)
    try:
        return load_tables(ckpt, cfg, step)
    finally:
        ckpt.close()


def dense_hit_stats(cfg: Config, batch: dict) -> dict[str, float]:
    """Table hit rates of a batch with hashed ids (dense tables): distinct ids per layer over ids."""
    ids = batch.get("engram_ids")
    if ids is None or not getattr(ids, "is_fully_addressable", True):
        return {}
    ids = np.asarray(ids)
    out = {}
    for l, layer in enumerate(cfg.engram.layers):
        per_head = ids[:, :, l, :].reshape(-1, ids.shape[-1])
        distinct = sum(np.unique(per_head[:, j]).size for j in range(per_head.shape[1]))
        out[f"engram{layer}_unique_rows_frac"] = distinct / max(per_head.size, 1)  # heads use disjoint rows
    return out


def stats(rows: RowPrefetcher) -> dict[str, Any]:
    """Table hit rates of the batch last fed and how much of the host gather the prefetch hid."""
    feed = rows.feed
    n_ids = 0 if feed is None else int(feed.slots_BTEG[..., 0, :].size) * rows.tables.process_count
    out = {} if feed is None else rows.tables.hit_stats(feed, n_ids)
    out["engram_gather_hidden_frac"] = rows.hidden_fraction
    return out
