"""RMSNorm, computed in float32 whatever the activation dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mhc_jax.model.params import param


def rms_norm(x: jax.Array, eps: float, axis: int | tuple[int, ...] = -1) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over `axis`, in float32, returned in float32."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=axis, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned scale initialised to 1; output in `dtype`."""

    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return (rms_norm(x, self.eps) * self.scale[...]).astype(self.dtype)
