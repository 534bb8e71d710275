"""The one batch layout: the keys, shapes and dtypes of a training batch, defined once.

    inputs       int32   (B, T)        token ids; BOS starts each document; padding = tokenizer.pad_id
    targets      int32   (B, T)        the next token of the same document (EOS after its last token)
    segment_ids  int32   (B, T)        documents numbered from 1 within a row; 0 = padding
    positions    int32   (B, T)        restart at 0 where a document starts in the row
    loss_mask    float32 (B, T)        1 where `targets` counts, 0 on padding
    engram_ids   int32   (B, T, E, G)  only with engram.enabled: E = len(engram.layers) (config order),
                                       G = (max_ngram - 1) * heads_per_ngram table ids per position

B = data.batch_size (the global batch), T = data.seq_len. The input pipeline (mhc_jax.data.pipeline) fills
it from text; `batch_spec` describes it for ahead-of-time compilation; `synthetic_batch` fills it from
random or given tokens for benchmarks and tests. Its sharding is `mhc_jax.sharding.batch_shardings`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from mhc_jax.config import Config
from mhc_jax.engram.hashing import engram_primes

TOKEN_KEYS = ("inputs", "targets", "segment_ids", "positions")  # int32 (B, T)
BATCH_KEYS = TOKEN_KEYS + ("loss_mask",)  # plus "engram_ids" with engram.enabled


def batch_spec(cfg: Config) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global training batch of `cfg` (see the module docstring)."""
    B, T = cfg.data.batch_size, cfg.data.seq_len
    spec = {k: jax.ShapeDtypeStruct((B, T), np.int32) for k in TOKEN_KEYS}
    spec["loss_mask"] = jax.ShapeDtypeStruct((B, T), np.float32)
    e = cfg.engram
    if e.enabled:
        spec["engram_ids"] = jax.ShapeDtypeStruct((B, T, len(e.layers), (e.max_ngram - 1) * e.heads_per_ngram),
                                                  np.int32)
    return spec


def synthetic_batch(cfg: Config, seed: int = 0, *, tokens: np.ndarray | None = None, documents: int = 1,
                    masked: float = 0.0,
                    engram_ids: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A batch of `batch_spec(cfg)` as numpy arrays. Rows are windows of T + 1 consecutive ids of
    `tokens` (a 1-D token stream, at least B * (T + 1) long), or uniform random ids in [0, vocab_size).
    Each row holds `documents` packed documents of equal length (positions restart at each); a fraction
    `masked` of the loss mask is 0 at random. Engram ids come from `engram_ids(inputs, segment_ids)` (e.g.
    mhc_jax.engram.EngramIds, the hash the pipeline uses), else uniformly from every head's table range."""
    B, T = cfg.data.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(seed)
    if tokens is None:
        rows = rng.integers(0, cfg.model.vocab_size, (B, T + 1))
    else:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.size < B * (T + 1):
            raise ValueError(f"tokens must be a 1-D stream of at least {B * (T + 1)} ids "
                             f"(batch_size x (seq_len + 1)), got shape {tokens.shape}")
        rows = tokens[:B * (T + 1)].reshape(B, T + 1)
    if not 1 <= documents <= T:
        raise ValueError(f"documents={documents} must be in [1, seq_len={T}]")
    doc_T = np.minimum(np.arange(T) * documents // T, documents - 1)  # document index of each position
    starts = np.searchsorted(doc_T, np.arange(documents))
    spec = batch_spec(cfg)
    batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:],
             "segment_ids": np.broadcast_to(doc_T + 1, (B, T)),
             "positions": np.broadcast_to(np.arange(T) - starts[doc_T], (B, T)),
             "loss_mask": (rng.random((B, T)) >= masked) if masked else np.ones((B, T))}
    batch = {k: np.ascontiguousarray(v, dtype=spec[k].dtype) for k, v in batch.items()}
    if "engram_ids" in spec:
        if engram_ids is not None:
            ids = engram_ids(batch["inputs"], batch["segment_ids"])
        else:
            e = cfg.engram
            primes = engram_primes(e.layers, e.max_ngram, e.heads_per_ngram, e.table_size)
            high_EG = np.stack([primes[layer].reshape(-1) for layer in e.layers])
            ids = rng.integers(0, np.broadcast_to(high_EG, spec["engram_ids"].shape))
        batch["engram_ids"] = np.asarray(ids, spec["engram_ids"].dtype)
    for k, s in spec.items():
        if batch[k].shape != s.shape:
            raise ValueError(f"synthetic batch key {k!r} has shape {batch[k].shape}, the layout says {s.shape}")
    return batch
