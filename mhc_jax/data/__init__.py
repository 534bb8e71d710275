"""Tokens for training: tokenizers, text datasets (TFDS builders, no TensorFlow) and the Grain pipeline.

`load_tokenizer` is cheap to import; the pipeline (Grain, JAX) is imported on first use.
"""

from __future__ import annotations

from typing import Any

from mhc_jax.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "SentencePieceTokenizer", "Tokenizer", "load_tokenizer", "make_train_iterator",
           "make_eval_iterator"]


def __getattr__(name: str) -> Any:
    if name in ("make_train_iterator", "make_eval_iterator"):
        from mhc_jax.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'mhc_jax.data' has no attribute {name!r}")
