"""The one host-side entry point that turns raw token ids into Engram table ids.

The data pipeline calls it on packed batches (with segment ids) and generation calls it on the token
history (`last`), so training and decoding hash through the same code.
"""

from __future__ import annotations

import logging

import numpy as np

from mhc_jax.config import EngramConfig
from mhc_jax.engram.compression import CompressedVocab, TokenizerLike, compress_tokenizer, identity_vocab
from mhc_jax.engram.hashing import NgramHasher

log = logging.getLogger(__name__)


class EngramIds:
    """`ids(tokens_BT, segment_ids_BT)` -> int32 (B, T, E, G): E = len(engram.layers) in
    config order; entry [..., l, j] lies in [0, primes[layer l][j]) (the layer adds per-head row offsets)."""

    def __init__(self, e: EngramConfig, tokenizer: TokenizerLike):
        self.layers = tuple(e.layers)
        self.max_ngram = e.max_ngram
        self.vocab: CompressedVocab = (compress_tokenizer(tokenizer) if e.compress_tokenizer
                                       else identity_vocab(tokenizer.vocab_size))
        pad_raw = tokenizer.pad_id
        if not 0 <= pad_raw < tokenizer.vocab_size:
            raise ValueError(f"tokenizer.pad_id={pad_raw} must be a token id in [0, {tokenizer.vocab_size})")
        self.pad_id = int(self.vocab.lookup[pad_raw])
        self.hasher = NgramHasher(self.vocab.size, self.layers, e.max_ngram, e.heads_per_ngram,
                                  table_base_sizes=e.table_size, seed=e.seed, pad_id=self.pad_id)
        primes_max = max(int(p.max()) for p in self.hasher.primes.values())
        if primes_max > np.iinfo(np.int32).max:
            raise ValueError(f"engram.table_size={e.table_size} gives primes up to {primes_max}, beyond int32")
        log.info("Engram ids: tokenizer V=%d compressed to V'=%d (%.1f%% smaller, compress_tokenizer=%s), "
                 "layers %s, %d ids per position", self.vocab.raw_size, self.vocab.size,
                 100 * self.vocab.reduction, e.compress_tokenizer, self.layers, self.hasher.ids_per_position)

    @property
    def ids_per_position(self) -> int:
        return self.hasher.ids_per_position

    def __call__(self, tokens_BT: np.ndarray, segment_ids_BT: np.ndarray | None = None) -> np.ndarray:
        tokens_BT = np.asarray(tokens_BT)
        if tokens_BT.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, time), got {tokens_BT.shape}")
        compressed_BT = self.vocab(tokens_BT)
        per_layer = [self.hasher(compressed_BT, layer, segment_ids_BT) for layer in self.layers]
        return np.stack(per_layer, axis=2).astype(np.int32)

    def last(self, history_BT: np.ndarray, n_new: int = 1) -> np.ndarray:
        """Ids of the last `n_new` positions of `history_BT` (generation): the same call as training on the
        trailing window, which is all an n-gram of order <= max_ngram can see. (B, n_new, E, G) int32."""
        history_BT = np.asarray(history_BT)
        if not 1 <= n_new <= history_BT.shape[1]:
            raise ValueError(f"n_new={n_new} must be in [1, history length {history_BT.shape[1]}]")
        window = n_new + self.max_ngram - 1
        start = max(0, history_BT.shape[1] - window)
        return self(history_BT[:, start:])[:, -n_new:]
