"""Residual connections around each sublayer, chosen by `residual.kind`.

Every connection is an nnx.Module called as `conn(x_BTnC, branch) -> x_BTnC`, where x holds the n residual
streams (n = 1 for `plain`) and `branch` is the sublayer (norm + attention, or norm + MLP) mapping
(batch, time, channels) to (batch, time, channels). The model only ever sees this interface, so swapping
plain for HC or mHC is a config change.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mhc_jax.config import Config
from mhc_jax.residual.plain import PlainResidual, SumCollapse

Branch = Callable[[jax.Array], jax.Array]


def make_residual(cfg: Config, sublayer_index: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """The connection around sublayer `sublayer_index` (attention of block b is 2b, its MLP 2b + 1)."""
    kind = cfg.residual.kind
    if kind == "plain":
        return PlainResidual()
    if kind == "hc":
        from mhc_jax.residual.hc import HyperConnection
        return HyperConnection(cfg, sublayer_index, rngs=rngs)
    if kind == "mhc":
        from mhc_jax.residual.mhc import ManifoldHyperConnection
        return ManifoldHyperConnection(cfg, sublayer_index, rngs=rngs)
    if kind == "mhc_lite":
        from mhc_jax.residual.mhc_lite import MHCLite
        return MHCLite(cfg, sublayer_index, rngs=rngs)
    raise ValueError(f"residual.kind={kind!r} is not allowed: must be one of plain, hc, mhc, mhc_lite")


def expand(x_BTC: jax.Array, n_streams: int) -> jax.Array:
    """Copies the embedding into every stream: (B, T, C) -> (B, T, n, C)."""
    return jnp.broadcast_to(x_BTC[:, :, None, :], (*x_BTC.shape[:2], n_streams, x_BTC.shape[-1]))


def make_collapse(cfg: Config, *, rngs: nnx.Rngs) -> nnx.Module:
    """(B, T, n, C) -> (B, T, C) before the final norm: a sum of the streams, or DeepSeek-V4's learned head."""
    if cfg.residual.collapse == "sum" or cfg.n_streams == 1:
        return SumCollapse()
    from mhc_jax.residual.collapse import LearnedCollapse
    return LearnedCollapse(cfg, rngs=rngs)


def residual_param_count(cfg: Config) -> int:
    """Closed-form parameter count of all connections plus the collapse head (for tests and FLOPs)."""
    kind, n, C = cfg.residual.kind, cfg.n_streams, cfg.model.d_model
    n_sub = 2 * cfg.model.n_layers
    if kind == "plain":
        per = 0
    elif kind == "hc":
        from mhc_jax.residual.hc import hc_param_count
        per = hc_param_count(cfg)
    elif kind == "mhc":
        from mhc_jax.residual.mhc import mhc_param_count
        per = mhc_param_count(cfg)
    else:
        from mhc_jax.residual.mhc_lite import mhc_lite_param_count
        per = mhc_lite_param_count(cfg)
    head = 0
    if cfg.residual.collapse == "learned" and n > 1:
        from mhc_jax.residual.collapse import collapse_param_count
        head = collapse_param_count(cfg)
    del C
    return n_sub * per + head
