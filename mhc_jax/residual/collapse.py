"""DeepSeek-V4's learned collapse head: (B, T, n, C) -> (B, T, C) before the final norm.

    w = sigmoid(scale * (RMSNorm(vec(x)) fn) + base) + eps,   out = sum_i w_i x_i

with vec(x) in R^{nC}, fn in R^{nC x n}, eps = 1e-6 (V4), all coefficient math in float32. Init: fan-in
normal fn, scale = residual.alpha_init, base = 0, so w ~ 1/2 per stream at init (the final RMSNorm makes
the overall scale irrelevant). The alternative (`collapse: sum`) is mhc_jax.residual.plain.SumCollapse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mhc_jax.config import ResidualConfig
from mhc_jax.layers import param, rms_norm
from mhc_jax.residual.mhc import V4_EPS


class LearnedCollapse(nnx.Module):
    def __init__(self, residual: ResidualConfig, d_model: int, *, norm_eps: float, rngs: nnx.Rngs):
        n, C = residual.n_streams, d_model
        self.n = n
        self.norm_eps = norm_eps
        self.fn = param(rngs, nnx.initializers.lecun_normal(), (n * C, n), ("embed", "streams"))
        self.scale = param(rngs, nnx.initializers.constant(residual.alpha_init), (), ())
        self.base = param(rngs, nnx.initializers.zeros, (n,), ("streams",))

    def weights(self, x_BTnC: jax.Array) -> jax.Array:
        """The per-token stream weights w (..., n), float32."""
        v = rms_norm(x_BTnC.reshape(*x_BTnC.shape[:-2], -1), self.norm_eps)
        logits = jnp.einsum("...d,dn->...n", v, self.fn[...].astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
        return jax.nn.sigmoid(self.scale[...] * logits + self.base[...]) + V4_EPS

    def __call__(self, x_BTnC: jax.Array) -> jax.Array:
        if x_BTnC.shape[-2] != self.n:
            raise ValueError(f"learned collapse expects {self.n} streams, got shape {x_BTnC.shape}")
        w = self.weights(x_BTnC)
        out = jnp.einsum("...n,...nc->...c", w, x_BTnC.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        return out.astype(x_BTnC.dtype)


def collapse_param_count(residual: ResidualConfig, d_model: int) -> int:
    """fn (nC x n), scale, base (n)."""
    n, C = residual.n_streams, d_model
    return n * C * n + 1 + n


def collapse_flops(residual: ResidualConfig, d_model: int) -> float:
    """Forward FLOPs per token: the weight projection (nC x n) and the weighted sum of the streams."""
    n, C = residual.n_streams, d_model
    return 2.0 * n * C * n + 2.0 * n * C
