"""What every n-stream connection (HC, mHC, mHC-lite) shares: the mapping types, the ablation switches,
the mixing x_{l+1} = H_res x + H_post^T F(H_pre x) in float32, and the `StreamConnection` base class.

Mixing orientation: `mappings` returns (h_pre (..., n), h_post (..., n), h_res (..., n, n)); a connection
built with `transposed=False` mixes as new_i = sum_j h_res[i, j] x_j, with `transposed=True` (DeepSeek-V4's
`comb`) as new_j = sum_i h_res[i, j] x_i. `acting_h_res` gives the matrix A with new = A @ x either way.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mhc_jax.config import ResidualConfig
from mhc_jax.residual.mhc_pallas import pre_mix_pallas, res_post_mix_pallas

Branch = Callable[[jax.Array], jax.Array]
Mappings = tuple[jax.Array, jax.Array, jax.Array]

_HI = jax.lax.Precision.HIGHEST  # keep f32 coefficient matmuls out of TF32 / bf16 passes on accelerators


def ablate(r: ResidualConfig, h_pre: jax.Array, h_post: jax.Array, h_res: jax.Array) -> Mappings:
    """mHC paper Table 1: a disabled mapping becomes H_pre = 1/n, H_post = 1, H_res = identity."""
    n = h_pre.shape[-1]
    if not r.use_pre:
        h_pre = jnp.full_like(h_pre, 1.0 / n)
    if not r.use_post:
        h_post = jnp.ones_like(h_post)
    if not r.use_res:
        h_res = jnp.broadcast_to(jnp.eye(n, dtype=h_res.dtype), h_res.shape)
    return h_pre, h_post, h_res


def pre_mix(x_BTnC: jax.Array, h_pre: jax.Array) -> jax.Array:
    """The sublayer input H_pre x (..., C), mixed in float32 and returned in the stream dtype."""
    h_in_BTC = jnp.einsum("...n,...nc->...c", h_pre, x_BTnC, precision=_HI, preferred_element_type=jnp.float32)
    return h_in_BTC.astype(x_BTnC.dtype)


def res_post_mix(x_BTnC: jax.Array, y_BTC: jax.Array, h_post: jax.Array, h_res: jax.Array,
                 transposed: bool = False) -> jax.Array:
    """H_res x + H_post^T y in one contraction over the n streams plus the sublayer output:
    new_i = sum_j h_res[i, j] x_j + h_post_i y (transposed: sum_j h_res[j, i] x_j + h_post_i y).
    Float32 accumulation, result in the stream dtype."""
    mix = "...ji,...jc->...ic" if transposed else "...ij,...jc->...ic"
    res_BTnC = jnp.einsum(mix, h_res, x_BTnC, precision=_HI, preferred_element_type=jnp.float32)
    return (res_BTnC + h_post[..., :, None] * y_BTC.astype(jnp.float32)[..., None, :]).astype(x_BTnC.dtype)


_XLA_MIXING = (pre_mix, res_post_mix)  # residual.impl=xla; impl=pallas swaps in the kernels
_PALLAS_MIXING = (pre_mix_pallas, res_post_mix_pallas)


def mixing(impl: str) -> tuple[Callable, Callable]:
    """(pre_mix, res_post_mix) of `residual.impl`: XLA einsums or the Pallas kernels (same signatures)."""
    return _PALLAS_MIXING if impl == "pallas" else _XLA_MIXING


def apply_mappings(x_BTnC: jax.Array, branch: Branch, h_pre: jax.Array, h_post: jax.Array,
                   h_res: jax.Array, *, transposed: bool = False, impl: str = "xla") -> jax.Array:
    """x_{l+1} = H_res x + H_post^T F(H_pre x); with `transposed`, new_j = sum_i h_res[i, j] x_i.
    Mixing runs in float32 (the coefficients stay float32); the result has the stream dtype."""
    pre, res_post = mixing(impl)
    return res_post(x_BTnC, branch(pre(x_BTnC, h_pre)), h_post, h_res, transposed)


# Selective recomputation (mHC paper Sec. 4.3): each piece of the connection is rematerialised from its
# inputs in the backward pass, so between forward and backward a connection keeps only its input streams,
# the per-token coefficients (n^2 + 2n floats) and the sublayer output, never the float32 intermediates.
RECOMPUTE_POLICY = jax.checkpoint_policies.nothing_saveable


def acting_h_res(h_res: jax.Array, transposed: bool) -> jax.Array:
    """The matrix A with new = A @ x (paper orientation), from a connection's native h_res."""
    return jnp.swapaxes(h_res, -1, -2) if transposed else h_res


class StreamConnection(nnx.Module):
    """What HC, mHC and mHC-lite share: per-token `mappings(x)`, then x_{l+1} = H_res x + H_post^T F(H_pre x);
    with `capture_mappings` (set by diagnostics.collect_h_res) the acting H_res is sown."""

    def __init__(self, residual: ResidualConfig, sublayer_index: int, transposed: bool = False):
        self.residual = residual
        self.n = residual.n_streams
        self.sublayer_index = sublayer_index
        self.transposed = transposed
        self.capture_mappings = False

    def mappings(self, x_BTnC: jax.Array) -> Mappings:
        raise NotImplementedError

    def __call__(self, x_BTnC: jax.Array, branch: Branch) -> jax.Array:
        if not self.residual.recompute:
            h_pre, h_post, h_res = self.mappings(x_BTnC)
            self._capture(h_res)
            return apply_mappings(x_BTnC, branch, h_pre, h_post, h_res, transposed=self.transposed,
                                  impl=self.residual.impl)
        # A pure function of the connection's state (not nnx.remat of the bound method), so the connection
        # also runs inside plain JAX transforms of a model built outside them (e.g. interpret's jax.grad).
        graphdef, state = nnx.split(self)
        mappings = jax.checkpoint(lambda st, x: nnx.merge(graphdef, st).mappings(x), policy=RECOMPUTE_POLICY)
        h_pre, h_post, h_res = mappings(state, x_BTnC)
        self._capture(h_res)
        pre, res_post = mixing(self.residual.impl)
        y_BTC = branch(jax.checkpoint(pre, policy=RECOMPUTE_POLICY)(x_BTnC, h_pre))
        post = jax.checkpoint(res_post, policy=RECOMPUTE_POLICY, static_argnums=(4,))
        return post(x_BTnC, y_BTC, h_post, h_res, self.transposed)

    def _capture(self, h_res: jax.Array) -> None:
        if self.capture_mappings:
            self.sow(nnx.Intermediate, "h_res", acting_h_res(h_res, self.transposed))


def mixing_flops(n: int, d_model: int) -> float:
    """Forward FLOPs per token of H_pre x (n C MACs), H_res x (n^2 C) and H_post^T y (n C) for one sublayer."""
    C = d_model
    return 2.0 * n * C + 2.0 * n * n * C + 2.0 * n * C
