"""Tokens for training: tokenizers, text datasets (TFDS builders, no TensorFlow), the Grain pipeline and
the one batch layout (`batch_spec`, `synthetic_batch`).

The tokenizers and the batch layout import without Grain and TFDS; the pipeline functions
(`make_train_iterator`, `make_eval_iterator`) load mhc_jax.data.pipeline on first use. Package code imports
them from mhc_jax.data.pipeline directly.
"""

from __future__ import annotations

from typing import Any

from mhc_jax.data.layout import BATCH_KEYS, batch_spec, synthetic_batch
from mhc_jax.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

__all__ = ["BATCH_KEYS", "ByteTokenizer", "SentencePieceTokenizer", "Tokenizer", "batch_spec", "load_tokenizer",
           "make_eval_iterator", "make_train_iterator", "synthetic_batch"]


def __getattr__(name: str) -> Any:
    if name in ("make_train_iterator", "make_eval_iterator"):
        from mhc_jax.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'mhc_jax.data' has no attribute {name!r}")
