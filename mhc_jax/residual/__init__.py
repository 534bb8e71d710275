"""Residual connections around each sublayer, chosen by `residual.kind` from one registry.

Every connection is an nnx.Module called as `conn(x_BTnC, branch) -> x_BTnC`, where x holds the n residual
streams (n = 1 for `plain`) and `branch` is the sublayer (norm + attention, or norm + MLP) mapping
(batch, time, channels) to (batch, time, channels). The model only ever sees this interface, so swapping
plain for HC or mHC is a config change. `RESIDUAL_KINDS` maps each kind to its class and closed-form
costs; the model, the parameter count, the FLOP count (mhc_jax.flops) and the benchmarks all read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from mhc_jax.config import ResidualConfig
from mhc_jax.residual.base import Branch, StreamConnection  # noqa: F401 (re-exported)
from mhc_jax.residual.collapse import LearnedCollapse, collapse_param_count
from mhc_jax.residual.hc import HyperConnection, hc_flops, hc_param_count
from mhc_jax.residual.mhc import ManifoldHyperConnection, mhc_flops, mhc_param_count
from mhc_jax.residual.mhc_lite import MHCLite, mhc_lite_flops, mhc_lite_param_count
from mhc_jax.residual.plain import PlainResidual, SumCollapse, plain_flops, plain_param_count


@dataclass(frozen=True)
class ResidualKind:
    """One `residual.kind`. `connection(residual, d_model, sublayer_index, norm_eps=..., rngs=...)` builds
    the connection around one sublayer; `param_count(residual, d_model)` and `flops(residual, d_model)`
    (forward FLOPs per token, mhc_jax.flops conventions) are the closed-form costs of one connection."""

    connection: type[nnx.Module]
    param_count: Callable[[ResidualConfig, int], int]
    flops: Callable[[ResidualConfig, int], float]


RESIDUAL_KINDS: dict[str, ResidualKind] = {
    "plain": ResidualKind(PlainResidual, plain_param_count, plain_flops),
    "hc": ResidualKind(HyperConnection, hc_param_count, hc_flops),
    "mhc": ResidualKind(ManifoldHyperConnection, mhc_param_count, mhc_flops),
    "mhc_lite": ResidualKind(MHCLite, mhc_lite_param_count, mhc_lite_flops),
}


def residual_kind(name: str) -> ResidualKind:
    if name not in RESIDUAL_KINDS:
        raise ValueError(f"residual.kind={name!r} is not allowed: must be one of {', '.join(RESIDUAL_KINDS)}")
    return RESIDUAL_KINDS[name]


def make_residual(r: ResidualConfig, d_model: int, sublayer_index: int, *, norm_eps: float,
                  rngs: nnx.Rngs) -> nnx.Module:
    """The connection around sublayer `sublayer_index` (attention of block b is 2b, its MLP 2b + 1)."""
    return residual_kind(r.kind).connection(r, d_model, sublayer_index, norm_eps=norm_eps, rngs=rngs)


def expand(x_BTC: jax.Array, n_streams: int) -> jax.Array:
    """Copies the embedding into every stream: (B, T, C) -> (B, T, n, C)."""
    return jnp.broadcast_to(x_BTC[:, :, None, :], (*x_BTC.shape[:2], n_streams, x_BTC.shape[-1]))


def learned_collapse(r: ResidualConfig) -> bool:
    """Whether the streams end in DeepSeek-V4's learned head (else a sum; one stream is always a sum)."""
    return r.collapse == "learned" and r.kind != "plain" and r.n_streams > 1  # plain: one stream


def make_collapse(r: ResidualConfig, d_model: int, *, norm_eps: float, rngs: nnx.Rngs) -> nnx.Module:
    """(B, T, n, C) -> (B, T, C) before the final norm: a sum of the streams, or DeepSeek-V4's learned head."""
    if not learned_collapse(r):
        return SumCollapse()
    return LearnedCollapse(r, d_model, norm_eps=norm_eps, rngs=rngs)


def residual_param_count(r: ResidualConfig, d_model: int, n_layers: int) -> int:
    """Closed-form parameter count of all connections plus the collapse head (for tests and FLOPs)."""
    per = residual_kind(r.kind).param_count(r, d_model)
    head = collapse_param_count(r, d_model) if learned_collapse(r) else 0
    return 2 * n_layers * per + head
