"""The Grain input pipeline: documents -> seeded global shuffle -> one document stream per row of the
global batch -> tokenize -> pack -> this process's rows -> Engram ids -> prefetch (threads, or
`data.worker_count` processes) -> global arrays sharded over the mesh's batch axes.

Every batch has the one layout of mhc_jax.data.layout (inputs, targets, segment_ids, positions, loss_mask,
and engram_ids with engram.enabled, from mhc_jax.engram.ids.EngramIds), with B = data.batch_size /
process_count local rows and T = data.seq_len.

Row slots: row r of every global batch (r < B = data.batch_size) comes from its own packer, fed with the
documents r, r + B, r + 2B, ... of the (shuffled) document order. A process runs only the slots of its
own rows (the rows its devices hold under the batch sharding; a contiguous block), so it reads, tokenizes
and packs 1 / process_count of the data, and the global batch is the same whatever the process count.
With a mesh the local rows become global `jax.Array`s (`jax.make_array_from_process_local_data`, sharded
over the batch axes of `mhc_jax.sharding.batch_shardings`); without one they are the local numpy rows.
`data.read_threads` threads step the process's slots in parallel. `tokenized()` counts the documents and
tokens this process has tokenized (in-process pipelines; not those of `data.worker_count` workers).

Finite (evaluation) data: a slot whose documents run out yields empty rows (loss_mask 0). On one
process the iterator stops once every slot has run out; across processes no process knows the others'
slots, so it keeps yielding (empty) batches up to its limit, and `mhc_jax.train.evaluation` stops at
the first batch with no tokens (a count reduced over the whole global batch, the same on every process).

Determinism and resume: the shuffle is a seeded permutation of the documents, reseeded every epoch; the
iterator returned by `make_train_iterator` is a Grain `DatasetIterator` whose state holds each local
slot's position, so `get_state()`/`set_state()` and Orbax (`save_args(it)` / `restore_args(it)` under a
checkpoint item named "data", one file per process) resume exactly with the same process count.
The batches depend on `data.worker_count` (each worker packs its own share of every slot's documents).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from mhc_jax.config import Config, ConfigError
from mhc_jax.data.corpus import DataError, TextSource, open_text_source
from mhc_jax.data.layout import BATCH_KEYS  # noqa: F401 (re-exported)
from mhc_jax.data.packing import PackDocuments, TokenizeDocument
from mhc_jax.data.tokenizer import Tokenizer, load_tokenizer
from mhc_jax.engram.ids import EngramIds
from mhc_jax.sharding import batch_shardings, global_batch

log = logging.getLogger(__name__)

__all__ = ["DataError", "load_tokenizer", "make_train_iterator", "make_eval_iterator", "open_split",
           "save_args", "restore_args", "tokenized"]


def open_split(cfg: Config, split: str) -> TextSource:
    """The documents of `split` of `cfg.data.dataset` (built into `data_dir` on first use)."""
    d = cfg.data
    return open_text_source(d.dataset, split, data_dir=d.data_dir, text_key=d.text_key,
                            corpus_max_mb=d.corpus_max_mb, doc_chars=d.doc_chars)


def _tokenizer_for(cfg: Config) -> Tokenizer:
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of "
                          f"data.tokenizer={cfg.data.tokenizer!r} ({tokenizer.vocab_size} ids); set "
                          f"model.vocab_size={tokenizer.vocab_size}")
    return tokenizer


class _TokenCounts:
    """Documents and tokens tokenized by this process (thread-safe; see `tokenized`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.documents = self.tokens = 0

    def add(self, tokens: int) -> None:
        with self._lock:
            self.documents += 1
            self.tokens += tokens


_COUNTS = _TokenCounts()


def tokenized() -> dict[str, int]:
    """{"documents", "tokens"} tokenized so far by this process's pipelines (the per-host share check)."""
    return {"documents": _COUNTS.documents, "tokens": _COUNTS.tokens}


class _CountingTokenize(TokenizeDocument):
    def __call__(self, text: str) -> dict[str, np.ndarray]:
        out = super().__call__(text)
        _COUNTS.add(int(out["inputs"].shape[0]))
        return out


_ROW_KEYS = ("inputs", "targets", "inputs_segment_ids", "inputs_positions")


class RowSlots(grain.IterDataset):
    """Batches of this process's rows, row i from packer `slots[i]` (one row per slot per batch). A slot
    that runs out (finite data) yields empty rows (all zeros: segment id 0); with `stop_when_exhausted`
    the iterator stops once every slot has run out."""

    def __init__(self, slots: Sequence[grain.IterDataset], *, seq_len: int, threads: int,
                 stop_when_exhausted: bool):
        super().__init__(list(slots))
        self.seq_len = seq_len
        self.threads = threads
        self.stop_when_exhausted = stop_when_exhausted

    def __iter__(self) -> grain.DatasetIterator:
        return _RowSlotsIterator(self)

    def __str__(self) -> str:
        return f"RowSlots(slots={len(self.parents)})"


class _RowSlotsIterator(grain.DatasetIterator):
    def __init__(self, ds: RowSlots):
        super().__init__([iter(p) for p in ds.parents])
        self._ds = ds
        self._done = [False] * len(self._parents)
        self._pool = ThreadPoolExecutor(ds.threads) if ds.threads > 1 and len(self._parents) > 1 else None
        self._empty = {k: np.zeros((ds.seq_len,), np.int32) for k in _ROW_KEYS}

    def _row(self, i: int) -> dict[str, np.ndarray]:
        if not self._done[i]:
            try:
                row = next(self._parents[i])
                return {k: row[k] for k in _ROW_KEYS}
            except StopIteration:
                self._done[i] = True
        return self._empty

    def __next__(self) -> dict[str, np.ndarray]:
        if self._ds.stop_when_exhausted and all(self._done):
            raise StopIteration
        slots = range(len(self._parents))
        rows = list(self._pool.map(self._row, slots)) if self._pool else [self._row(i) for i in slots]
        if self._ds.stop_when_exhausted and all(self._done) and all(r is self._empty for r in rows):
            raise StopIteration
        return {k: np.stack([r[k] for r in rows]) for k in _ROW_KEYS}

    def get_state(self) -> dict:
        return {"slots": [p.get_state() for p in self._parents], "done": list(self._done)}

    def set_state(self, state: dict) -> None:
        if len(state["slots"]) != len(self._parents):
            raise DataError(f"the saved data-iterator state has {len(state['slots'])} row slots, this process "
                            f"runs {len(self._parents)}: resume with the process count and data.batch_size "
                            "of the saved run")
        for p, s in zip(self._parents, state["slots"]):
            p.set_state(s)
        self._done = [bool(d) for d in state["done"]]


class FinishBatch:
    """Packed local rows -> the trainer's format (+ Engram ids); padding tokens become `pad_id`."""

    def __init__(self, *, pad_id: int, engram_ids: Any = None):
        self.pad_id = pad_id
        self.engram_ids = engram_ids

    def __call__(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {key: np.asarray(packed[src], np.int32) for key, src in (
            ("inputs", "inputs"), ("targets", "targets"), ("segment_ids", "inputs_segment_ids"),
            ("positions", "inputs_positions"))}
        valid = out["segment_ids"] > 0
        out["inputs"] = np.where(valid, out["inputs"], self.pad_id).astype(np.int32)
        out["targets"] = np.where(valid, out["targets"], self.pad_id).astype(np.int32)
        out["loss_mask"] = valid.astype(np.float32)
        if self.engram_ids is not None:
            out["engram_ids"] = self.engram_ids(out["inputs"], out["segment_ids"])
        return out


def local_rows(global_rows: int, seq_len: int, *, mesh: Mesh | None, process_index: int,
               process_count: int) -> range:
    """The rows of the global batch this process holds: those of its devices under the batch sharding
    (with a mesh), else the contiguous block `process_index` of `process_count`."""
    if mesh is None:
        n = global_rows // process_count
        return range(process_index * n, (process_index + 1) * n)
    sharding = batch_shardings(jax.ShapeDtypeStruct((global_rows, seq_len), np.int32), mesh)
    rows = sorted({r for idx in sharding.addressable_devices_indices_map((global_rows, seq_len)).values()
                   for r in range(global_rows)[idx[0]]})
    if rows != list(range(rows[0], rows[-1] + 1)):
        raise ConfigError(f"this process's devices hold rows {rows} of the global batch, not a contiguous "
                          "block; order the mesh's devices by process (mhc_jax.sharding.make_mesh does)")
    return range(rows[0], rows[-1] + 1)


class ToGlobalArrays:
    """Local numpy rows -> global jax.Arrays split over the mesh's batch axes (the last stage)."""

    def __init__(self, mesh: Mesh, global_rows: int, seq_len: int):
        self.mesh = mesh
        # Fails now, with the batch size and mesh axes named, if the rows do not split over the mesh.
        batch_shardings(jax.ShapeDtypeStruct((global_rows, seq_len), np.int32), mesh)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return global_batch(batch, batch_shardings(batch, self.mesh))


def _build(cfg: Config, split: str, *, train: bool, mesh: Mesh | None, process_index: int | None,
           process_count: int | None) -> grain.IterDataset:
    d = cfg.data
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if d.batch_size % process_count:
        raise ConfigError(f"data.batch_size={d.batch_size} must divide by the process count {process_count}")
    if mesh is not None and (process_index, process_count) != (jax.process_index(), jax.process_count()):
        raise ValueError("a mesh needs the real process_index/process_count (leave them None)")
    tokenizer = _tokenizer_for(cfg)
    engram_ids = None
    if cfg.engram.enabled:
        engram_ids = EngramIds(cfg.engram, tokenizer)

    docs = grain.MapDataset.source(open_split(cfg, split))
    if train:
        docs = docs.shuffle(seed=d.shuffle_seed).repeat(None)  # reseeded every epoch (seed + epoch)
    tokenize = _CountingTokenize(tokenizer)
    rows = local_rows(d.batch_size, d.seq_len, mesh=mesh, process_index=process_index,
                      process_count=process_count)
    # Slot r packs documents r, r + B, ...: read in its own order, so a slot's rows never depend on
    # the others' (threads step the slots in parallel instead of reading ahead inside one).
    slots = [PackDocuments(docs[r::d.batch_size].map(tokenize).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)), d.seq_len) for r in rows]
    it = RowSlots(slots, seq_len=d.seq_len, threads=d.read_threads, stop_when_exhausted=process_count == 1)
    it = it.map(FinishBatch(pad_id=tokenizer.pad_id, engram_ids=engram_ids))
    if d.worker_count > 0:
        from absl import flags

        flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags; we do not use absl's parser
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count))
    if d.prefetch > 0:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=d.prefetch)
    if mesh is not None:
        it = it.map(ToGlobalArrays(mesh, d.batch_size, d.seq_len))
    return it


def make_train_iterator(cfg: Config, *, mesh: Mesh | None = None, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
    """An endless iterator of training batches (see the module docstring) over `data.train_split`, with
    `get_state()`/`set_state()`. Same config and seed, same batches."""
    return iter(_build(cfg, cfg.data.train_split, train=True, mesh=mesh, process_index=process_index,
                       process_count=process_count))


def make_eval_iterator(cfg: Config, *, mesh: Mesh | None = None, process_index: int | None = None,
                       process_count: int | None = None, num_batches: int | None = None) -> grain.IterDataset:
    """Evaluation batches of `data.eval_split`, unshuffled (row slot r packs documents r, r + B, ... in
    order): a re-iterable dataset; each `iter()` starts again from the first document and yields at most
    `num_batches` batches (default `training.eval_batches`). Rows whose slot ran out are empty (masked);
    on one process the iterator stops when every slot has run out, across processes the batches after
    the end are empty (see the module docstring)."""
    num_batches = cfg.training.eval_batches if num_batches is None else num_batches
    ds = _build(cfg, cfg.data.eval_split, train=False, mesh=mesh, process_index=process_index,
                process_count=process_count)
    return grain.experimental.LimitIterDataset(ds, count=num_batches)


def save_args(iterator: grain.DatasetIterator) -> Any:
    """Orbax args that save the iterator state (as JSON, one file per process) under a checkpoint item,
    e.g. `ocp.args.Composite(state=..., data=save_args(it))`."""
    return grain.checkpoint.CheckpointSave(iterator)


def restore_args(iterator: grain.DatasetIterator) -> Any:
    """Orbax args that restore a state saved by `save_args` into `iterator` (a fresh train iterator)."""
    return grain.checkpoint.CheckpointRestore(iterator)
