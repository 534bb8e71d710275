"""The plain residual x + F(x) (one stream), and the sum collapse shared by HC and mHC."""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx


class PlainResidual(nnx.Module):
    """x_{l+1} = x_l + F(x_l) on a single stream, shaped (B, T, 1, C) like the n-stream kinds."""

    def __call__(self, x_BTnC: jax.Array, branch: Callable[[jax.Array], jax.Array]) -> jax.Array:
        if x_BTnC.shape[2] != 1:
            raise ValueError(f"plain residual expects 1 stream, got shape {x_BTnC.shape}")
        return x_BTnC + branch(x_BTnC[:, :, 0, :])[:, :, None, :].astype(x_BTnC.dtype)


class SumCollapse(nnx.Module):
    """(B, T, n, C) -> (B, T, C) by summing the streams (HC paper, MaxText)."""

    def __call__(self, x_BTnC: jax.Array) -> jax.Array:
        return x_BTnC.sum(axis=2)
