"""Feeding sparse Engram rows to the train step, with step t+1's rows gathered while step t runs.

`RowPrefetcher` wraps the data iterator (host numpy batches with hashed `engram_ids`): a background thread
takes the next batch and runs `HostTables.feed` on it (deduplicate, gather, pad to the bucket) while the
device runs the current step. The update of step t is applied to the host tables after that gather
started, so before handing the prefetched rows out, the rows that update changed are re-read (`refresh`):
the step always sees the table as of the previous update, exactly as without prefetch (tested bitwise).

Timing: `gather_s` is the thread's time in `feed`; `exposed_s` the part of it the main thread waited for
(min(wait, gather) per step); `hidden_fraction` = 1 - exposed / gather (0 without prefetch).

The iterator state (`get_state`) is the data iterator's before the prefetched, not yet returned batch,
so a checkpoint resumes with exactly the batch the next step would have taken.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from mhc_jax.engram.host_tables import HostTables, RowFeed

Batch = dict[str, Any]


class RowPrefetcher:
    """`next(it)` -> the device batch (engram_ids as slots + engram_rows); then `apply(step_outputs)`."""

    def __init__(self, batches: Iterator[Batch], tables: HostTables, bucket: int,
                 to_device: Callable[[Batch], Batch], prefetch: bool = True):
        self.batches = batches
        self.tables = tables
        self.bucket = bucket
        self.to_device = to_device
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="engram-rows") if prefetch else None
        self._pending: Future | None = None
        self._pending_state: Any = None
        self._updated: list[list[np.ndarray]] = []  # rows changed by updates since the pending gather began
        self.feed: RowFeed | None = None  # the rows of the batch last returned
        self.gather_s = self.exposed_s = 0.0
        self.steps = 0

    # data iterator protocol ------------------------------------------------------------------------

    def __iter__(self) -> "RowPrefetcher":
        return self

    def _prepare(self) -> tuple[Batch, RowFeed, float]:
        batch = next(self.batches)
        t0 = time.perf_counter()
        feed = self.tables.feed(batch["engram_ids"], self.bucket)
        return batch, feed, time.perf_counter() - t0

    def _submit(self) -> None:
        self._pending_state = self.batches.get_state() if hasattr(self.batches, "get_state") else None
        self._updated = []
        if self._pool is None:
            self._pending = Future()
            self._pending.set_result(self._prepare())
        else:
            self._pending = self._pool.submit(self._prepare)

    def __next__(self) -> Batch:
        if self._pending is None:
            self._submit()
        t0 = time.perf_counter()
        batch, feed, gather = self._pending.result()  # re-raises errors of the thread (end of data, bucket)
        wait = time.perf_counter() - t0
        for updated in self._updated:  # rows the last update(s) changed after this gather started
            self.tables.refresh(feed, updated)
        self._pending = None
        if self._pool is not None:
            self._submit()  # step t+1's rows are gathered while step t runs
        self.gather_s += gather
        self.exposed_s += gather if self._pool is None else min(wait, gather)
        self.steps += 1
        self.feed = feed
        return self.to_device({**batch, "engram_ids": feed.slots_BTEG, "engram_rows": feed.rows_EUW})

    def apply(self, outputs: dict[str, Any]) -> dict[str, Any]:
        """Pops `engram_row_grads` from the step's outputs and applies them (row-wise Adam) to the rows of
        the batch last returned; skipped like the parameters' update when the gradients are not finite."""
        grads = outputs.pop("engram_row_grads")
        finite = bool(np.isfinite(np.asarray(outputs["grad_norm"])))
        self._updated.append(self.tables.apply(self.feed, grads, finite))
        return outputs

    @property
    def hidden_fraction(self) -> float:
        return 0.0 if self.gather_s == 0 else 1.0 - self.exposed_s / self.gather_s

    def get_state(self) -> Any:
        if self._pending is not None:
            return self._pending_state
        return self.batches.get_state()

    def set_state(self, state: Any) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        self.batches.set_state(state)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
