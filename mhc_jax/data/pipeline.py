"""The Grain input pipeline: documents -> seeded global shuffle -> tokenize -> pack into rows -> batch ->
this process's rows -> Engram ids -> prefetch (threads, or `data.worker_count` processes) -> global arrays
sharded over the mesh's batch axes.

Every batch has the one layout of mhc_jax.data.layout (inputs, targets, segment_ids, positions, loss_mask,
and engram_ids with engram.enabled, from mhc_jax.engram.ids.EngramIds), with B = data.batch_size /
process_count local rows and T = data.seq_len.

Every process builds the same global batch (so batches do not depend on the process count) and keeps its
contiguous slice of rows. With a mesh the arrays are global `jax.Array`s sharded over the batch axes
(`mhc_jax.sharding.batch_shardings`); without one they are the local numpy rows.

Determinism and resume: the shuffle is a seeded permutation of the documents, reseeded every epoch; the
iterator returned by `make_train_iterator` is a Grain `DatasetIterator`, so `get_state()`/`set_state()`
and Orbax (`save_args(it)` / `restore_args(it)` under a checkpoint item named "data") resume exactly.
The batches depend on `data.worker_count` (each worker packs its own share of the documents).
"""

from __future__ import annotations

import logging
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
           "save_args", "restore_args"]


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


class FinishBatch:
    """Packed global batch -> this process's rows in the trainer's format (+ Engram ids). Pads a short
    final batch (finite eval data) with empty rows so every batch has the same shape."""

    def __init__(self, *, global_rows: int, process_index: int, process_count: int, pad_id: int,
                 engram_ids: Any = None):
        self.global_rows = global_rows
        self.local_rows = global_rows // process_count
        self.start = process_index * self.local_rows
        self.pad_id = pad_id
        self.engram_ids = engram_ids

    def __call__(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        short = self.global_rows - packed["inputs"].shape[0]
        rows = slice(self.start, self.start + self.local_rows)
        out: dict[str, np.ndarray] = {}
        for key, src in (("inputs", "inputs"), ("targets", "targets"), ("segment_ids", "inputs_segment_ids"),
                         ("positions", "inputs_positions")):
            value = packed[src]
            if short:
                value = np.concatenate([value, np.zeros((short,) + value.shape[1:], value.dtype)])
            out[key] = np.asarray(value[rows], np.int32)
        valid = out["segment_ids"] > 0
        out["inputs"] = np.where(valid, out["inputs"], self.pad_id).astype(np.int32)
        out["targets"] = np.where(valid, out["targets"], self.pad_id).astype(np.int32)
        out["loss_mask"] = valid.astype(np.float32)
        if self.engram_ids is not None:
            out["engram_ids"] = self.engram_ids(out["inputs"], out["segment_ids"])
        return out


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

    source = open_split(cfg, split)
    ds = grain.MapDataset.source(source)
    if train:
        ds = ds.shuffle(seed=d.shuffle_seed).repeat(None)  # reseeded every epoch (seed + epoch)
    ds = ds.map(TokenizeDocument(tokenizer))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=d.read_threads, prefetch_buffer_size=64))
    it = PackDocuments(it, d.seq_len)
    it = it.batch(d.batch_size, drop_remainder=False)
    it = it.map(FinishBatch(global_rows=d.batch_size, process_index=process_index,
                            process_count=process_count, pad_id=tokenizer.pad_id, engram_ids=engram_ids))
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
    """Evaluation batches of `data.eval_split`, in order, unshuffled: a re-iterable dataset; each
    `iter()` starts again from the first document and yields at most `num_batches` batches (default
    `training.eval_batches`; fewer if the split runs out; a short last batch is padded with masked rows)."""
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
