"""ALiBi positions (Press et al. 2021, arXiv 2108.12409): no position embedding; each head adds
-slope_h * (query position - key position) to its attention logits, with a fixed geometric slope per head."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def alibi_slopes(n_heads: int) -> np.ndarray:
    """The paper's head slopes (float64, shape (H,)): for H a power of two, 2^(-8/H), 2^(-16/H), ..., 2^(-8)
    (8 heads: 1/2 ... 1/256, paper Sec. 3). Otherwise the slopes of the largest power of two P below H,
    followed by every other slope of 2P (the authors' reference code) so that any head count works."""
    if n_heads < 1:
        raise ValueError(f"n_heads={n_heads} must be >= 1")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return np.asarray(power_of_two(n_heads), np.float64)
    p = 2 ** math.floor(math.log2(n_heads))
    return np.concatenate([power_of_two(p), alibi_slopes(2 * p)[0::2][: n_heads - p]])


def alibi_bias(slopes_H: jax.Array, q_pos_BT: jax.Array, k_pos_BS: jax.Array) -> jax.Array:
    """(B, H, T, S) float32 logit bias -slope_h * (q_pos - k_pos) (future keys get a positive bias, but the
    causal mask removes them)."""
    distance_BTS = (q_pos_BT[:, :, None] - k_pos_BS[:, None, :]).astype(jnp.float32)
    return -jnp.asarray(slopes_H, jnp.float32)[None, :, None, None] * distance_BTS[:, None]
