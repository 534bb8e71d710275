"""Hyper-Connections (Zhu et al., ICLR 2025): the unconstrained baseline mHC projects onto a manifold.

Per token, with the streams H in R^{n x C} and H~ = RMSNorm(H) per stream (over C; the HC paper uses a
LayerNorm):
    B   = s_b * tanh(H~ W_b)^T + B0          (1 x n)     -> h_post = B
    A_m = s_a * tanh(H~ W_m) + A_m0          (n x 1)     -> h_pre = A_m^T
    A_r = s_a * tanh(H~ W_r) + A_r0          (n x n)     -> h_res = A_r^T
    H'  = B^T F(H^T A_m)^T + A_r^T H
so in this library's orientation new_i = sum_j h_res[i, j] x_j with h_res = A_r^T. W_m and W_r are one
matrix W_a in R^{C x (n+1)} (column 0 is W_m), as are A_m0 and A_r0 (static_alpha, n x (n+1)).

Init reproduces a Pre-Norm residual network (HC paper): W = 0, B0 = ones, A_m0 = one-hot on stream
(k mod n) for sublayer k, A_r0 = identity, s_a = s_b = residual.alpha_init (0.01 in the HC code). With
`hc_dynamic: false` (static HC) there are no dynamic terms and no norm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhc_jax.config import ResidualConfig
from mhc_jax.layers import RMSNorm, param
from mhc_jax.residual.base import Mappings, StreamConnection, ablate, mixing_flops

_HI = jax.lax.Precision.HIGHEST


def _const(value: np.ndarray):
    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
        del key
        assert shape == value.shape, (shape, value.shape)
        return jnp.asarray(value, dtype)
    return init


class HyperConnection(StreamConnection):
    """Dynamic (or static) HC around one sublayer; `conn(x_BTnC, branch) -> x_BTnC`."""

    def __init__(self, residual: ResidualConfig, d_model: int, sublayer_index: int, *, norm_eps: float,
                 rngs: nnx.Rngs):
        r = residual
        super().__init__(r, sublayer_index)
        n, C = self.n, d_model
        self.dynamic = r.hc_dynamic
        static_alpha = np.zeros((n, n + 1), np.float32)
        static_alpha[sublayer_index % n, 0] = 1.0  # A_m0: one-hot on stream k mod n
        static_alpha[:, 1:] = np.eye(n)  # A_r0 = identity
        self.static_alpha = param(rngs, _const(static_alpha), (n, n + 1), ("streams", "mhc"))
        self.static_beta = param(rngs, nnx.initializers.ones, (n,), ("streams",))
        norm = w_alpha = w_beta = s_alpha = s_beta = None
        if self.dynamic:
            scale = nnx.initializers.constant(r.alpha_init)
            norm = RMSNorm(C, eps=norm_eps, dtype=jnp.float32, rngs=rngs)
            w_alpha = param(rngs, nnx.initializers.zeros, (C, n + 1), ("embed", "mhc"))
            w_beta = param(rngs, nnx.initializers.zeros, (C,), ("embed",))
            s_alpha = param(rngs, scale, (), ())
            s_beta = param(rngs, scale, (), ())
        self.norm = nnx.data(norm)
        self.w_alpha = nnx.data(w_alpha)
        self.w_beta = nnx.data(w_beta)
        self.s_alpha = nnx.data(s_alpha)
        self.s_beta = nnx.data(s_beta)

    def mappings(self, x_BTnC: jax.Array) -> Mappings:
        """(h_pre (..., n), h_post (..., n), h_res (..., n, n)) in float32; new_i = sum_j h_res[i, j] x_j."""
        if x_BTnC.shape[-2] != self.n:
            raise ValueError(f"HC connection expects {self.n} streams, got shape {x_BTnC.shape}")
        lead = x_BTnC.shape[:-2]
        alpha = jnp.broadcast_to(self.static_alpha[...], (*lead, self.n, self.n + 1))
        beta = jnp.broadcast_to(self.static_beta[...], (*lead, self.n))
        if self.dynamic:
            h = self.norm(x_BTnC)  # per stream, over C, float32
            alpha = alpha + self.s_alpha[...] * jnp.tanh(
                jnp.einsum("...nc,ck->...nk", h, self.w_alpha[...], precision=_HI))
            beta = beta + self.s_beta[...] * jnp.tanh(
                jnp.einsum("...nc,c->...n", h, self.w_beta[...], precision=_HI))
        h_pre = alpha[..., 0]
        h_res = jnp.swapaxes(alpha[..., 1:], -1, -2)  # A_r^T: HC mixes as A_r^T H
        return ablate(self.residual, h_pre, beta, h_res)


def hc_param_count(residual: ResidualConfig, d_model: int) -> int:
    """Parameters of one HC connection: static A (n x (n+1)) and B (n); dynamic: norm scale (C),
    W_a (C x (n+1)), W_b (C), s_a, s_b."""
    n, C = residual.n_streams, d_model
    static = n * (n + 1) + n
    return static + (C + C * (n + 1) + C + 2 if residual.hc_dynamic else 0)


def hc_flops(residual: ResidualConfig, d_model: int) -> float:
    """Forward FLOPs per token of one HC connection: the dynamic tanh projections (if on) and the mixing."""
    n, C = residual.n_streams, d_model
    return (2.0 * n * C * (n + 1) + 2.0 * n * C if residual.hc_dynamic else 0.0) + mixing_flops(n, C)
