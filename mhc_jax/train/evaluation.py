"""Validation loss, perplexity and bits per byte over the first N batches of the eval split."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flax import nnx

from mhc_jax.train.step import eval_step


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens): the bits-per-byte denominator."""
    return np.array([len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)], np.int64)


def evaluate_model(model: nnx.Module, batches: Any, n_batches: int, byte_lengths: np.ndarray) -> dict[str, float]:
    """Mean token loss (nats), perplexity and bits per byte over `n_batches` batches of `batches`."""
    loss_sum, tokens, n_bytes, seen = 0.0, 0.0, 0, 0
    for batch in batches:
        if seen == n_batches:
            break
        s, c = eval_step(model, batch)
        loss_sum, tokens = loss_sum + float(s), tokens + float(c)
        targets = np.asarray(batch["targets"])
        mask = np.asarray(batch["loss_mask"]) > 0
        n_bytes += int(byte_lengths[np.clip(targets, 0, len(byte_lengths) - 1)][mask].sum())
        seen += 1
    if tokens == 0:
        raise ValueError("the evaluation split gave no tokens; check data.eval_split and the dataset")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": loss_sum / math.log(2) / max(n_bytes, 1), "tokens": tokens, "batches": seen}
