"""Rotary position embeddings (half-split layout), angles in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x_BTHD: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotates pairs (x[..., i], x[..., i + D/2]) by positions * theta^(-2i/D)."""
    d = x_BTHD.shape[-1]
    inv_freq_F = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
    angles_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq_F
    cos_BT1F, sin_BT1F = jnp.cos(angles_BTF)[:, :, None, :], jnp.sin(angles_BTF)[:, :, None, :]
    x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos_BT1F - x2 * sin_BT1F, x2 * cos_BT1F + x1 * sin_BT1F], axis=-1)
    return out.astype(x_BTHD.dtype)
