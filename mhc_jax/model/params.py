"""Parameter creation with logical axis names (read by mhc_jax.sharding) and dtype helpers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str | None],
          dtype: jnp.dtype = jnp.float32) -> nnx.Param:
    """An nnx.Param whose `axes` metadata names one logical axis per dimension."""
    if len(axes) != len(shape):
        raise ValueError(f"param of shape {tuple(shape)} needs {len(shape)} axis names, got {tuple(axes)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), axes=tuple(axes))


def compute_dtype(name: str) -> jnp.dtype:
    """'auto' is bfloat16 on accelerators and float32 on CPU (bf16 matmuls are slow on CPU)."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)
