"""Which keys a query may attend to: causal, optionally within a sliding window (Longformer / Mistral /
Gemma local layers), never across packed documents. Also which blocks use a window (`layer_windows`).

Every attention implementation (xla, chunked, cuDNN, splash, and the KV-cache path) applies this same rule:
key j is visible to query i iff seg[i] == seg[j] and 0 <= i - j < window (window 0 = unbounded), with i, j
the token indices in the packed row (in a KV cache: the tokens' positions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def layer_windows(n_layers: int, window: int, global_every: int) -> tuple[int, ...]:
    """The attention window of each block (0 = full causal). With `global_every` k > 0, blocks k-1, 2k-1, ...
    attend fully and the others use `window` (Gemma 3: five local layers, then one global)."""
    if window == 0:
        return (0,) * n_layers
    return tuple(0 if global_every and (i + 1) % global_every == 0 else window for i in range(n_layers))


def visible(q_idx: jax.Array, k_idx: jax.Array, q_seg: jax.Array | None, k_seg: jax.Array | None,
            window: int) -> jax.Array:
    """Boolean mask broadcast from the given index / segment arrays (e.g. (B, T, 1) against (B, 1, S))."""
    ok = k_idx <= q_idx
    if window:
        ok &= q_idx - k_idx < window
    if q_seg is not None:
        ok &= q_seg == k_seg
    return ok


def visible_BTS(segment_ids_BT: jax.Array, window: int) -> jax.Array:
    """(B, T, T) self-attention mask of a packed row."""
    idx_T = jnp.arange(segment_ids_BT.shape[1])
    return visible(idx_T[None, :, None], idx_T[None, None, :], segment_ids_BT[:, :, None],
                   segment_ids_BT[:, None, :], window)
