"""The plain residual x + F(x) (one stream), and the sum collapse shared by HC and mHC."""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from mhc_jax.config import ResidualConfig
from mhc_jax.residual.base import StreamSource


class PlainResidual(nnx.Module):
    """x_{l+1} = x_l + F(x_l) on a single stream, shaped (B, T, 1, C) like the n-stream kinds. Takes the
    constructor arguments of every kind (mhc_jax.residual.RESIDUAL_KINDS) and learns nothing."""

    def __init__(self, residual: ResidualConfig | None = None, d_model: int = 0, sublayer_index: int = 0, *,
                 norm_eps: float = 0.0, rngs: nnx.Rngs | None = None):
        del residual, d_model, sublayer_index, norm_eps, rngs

    def __call__(self, x_BTnC: jax.Array, branch: Callable[[jax.Array], jax.Array],
                 source: StreamSource | None = None) -> jax.Array:
        """`source` is accepted for the interface of every kind (StreamConnection.with_source) and unused:
        one stream is kept as it is, there is nothing to recompute it from."""
        del source
        if x_BTnC.shape[2] != 1:
            raise ValueError(f"plain residual expects 1 stream, got shape {x_BTnC.shape}")
        return x_BTnC + branch(x_BTnC[:, :, 0, :])[:, :, None, :].astype(x_BTnC.dtype)

    def with_source(self, x_BTnC: jax.Array, branch: Callable[[jax.Array], jax.Array],
                    source: StreamSource | None = None) -> tuple[jax.Array, None]:
        return self(x_BTnC, branch, source), None


class SumCollapse(nnx.Module):
    """(B, T, n, C) -> (B, T, C) by summing the streams (HC paper, MaxText)."""

    def __call__(self, x_BTnC: jax.Array) -> jax.Array:
        return x_BTnC.sum(axis=2)


def plain_param_count(residual: ResidualConfig, d_model: int) -> int:
    """The plain residual has no parameters."""
    del residual, d_model
    return 0


def plain_flops(residual: ResidualConfig, d_model: int) -> float:
    """x + F(x): an elementwise add, which the FLOP convention does not count (mhc_jax.flops)."""
    del residual, d_model
    return 0.0
