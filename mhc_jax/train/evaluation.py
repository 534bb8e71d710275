"""Validation loss, perplexity and bits per byte over the first N batches of the eval split."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhc_jax.distributed import replicated
from mhc_jax.train.step import Batch, loss_sum_and_count


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens): the bits-per-byte denominator."""
    return np.array([len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)], np.int64)


@nnx.jit
def eval_sums(model: nnx.Module, batch: Batch, byte_lengths_V: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of token losses, token count, UTF-8 bytes of the counted targets) of one batch, reduced inside
    the jitted program: the scalars are replicated, so every process reads them (a pod process holds only
    its rows of the batch)."""
    loss_sum, count = loss_sum_and_count(model, batch)
    targets_BT = jnp.clip(batch["targets"], 0, byte_lengths_V.shape[0] - 1)
    n_bytes = jnp.sum(jnp.where(batch["loss_mask"] > 0, byte_lengths_V[targets_BT], 0))
    return loss_sum, count, n_bytes


def evaluate_model(model: nnx.Module, batches: Any, n_batches: int, byte_lengths: np.ndarray) -> dict[str, float]:
    """Mean token loss (nats), perplexity and bits per byte over `n_batches` batches of `batches` (fewer
    when a batch holds no token: the split has run out)."""
    lengths_V = replicated(np.asarray(byte_lengths, np.int32))
    loss_sum, tokens, n_bytes, seen = 0.0, 0.0, 0, 0
    for batch in batches:
        if seen == n_batches:
            break
        s, c, b = jax.device_get(eval_sums(model, batch, lengths_V))
        if c == 0:  # every row slot of the split has run out (a multi-process pipeline pads to the limit)
            break
        loss_sum, tokens, n_bytes = loss_sum + float(s), tokens + float(c), n_bytes + int(b)
        seen += 1
    if tokens == 0:
        raise ValueError("the evaluation split gave no tokens; check data.eval_split and the dataset")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": loss_sum / math.log(2) / max(n_bytes, 1), "tokens": tokens, "batches": seen}
