"""What every n-stream connection (HC, mHC, mHC-lite) shares: the mapping types, the ablation switches,
the mixing x_{l+1} = H_res x + H_post^T F(H_pre x) in float32, and the `StreamConnection` base class.

Mixing orientation: `mappings` returns (h_pre (..., n), h_post (..., n), h_res (..., n, n)); a connection
built with `transposed=False` mixes as new_i = sum_j h_res[i, j] x_j, with `transposed=True` (DeepSeek-V4's
`comb`) as new_j = sum_i h_res[i, j] x_i. `acting_h_res` gives the matrix A with new = A @ x either way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def res_post_mix(x_BTnC: jax.Array, y_BTC: jax.Array, h_post: jax.Array, h_res: jax.Array,
                 transposed: bool = False) -> jax.Array:
    """H_res x + H_post^T y in one contraction over the n streams plus the sublayer output:
    new_i = sum_j h_res[i, j] x_j + h_post_i y (transposed: sum_j h_res[j, i] x_j + h_post_i y).
    Float32 accumulation, result in the stream dtype."""
    return _res_post_mix_fwd(x_BTnC, y_BTC, h_post, h_res, transposed)[0]


def _acting_operand(h_res: jax.Array, transposed: bool) -> jax.Array:
    """`acting_h_res` as a dot operand. A transposed operand is materialised behind a barrier: folded into
    the dot's dimension numbers it sends XLA:CPU's per-token batched dot from YNNPACK to a generic
    fallback, measured 2.7x slower on 2 CPU cores (the barrier costs n^2 floats per token)."""
    return jax.lax.optimization_barrier(acting_h_res(h_res, True)) if transposed else h_res


def _res_post_mix_fwd(x_BTnC, y_BTC, h_post, h_res, transposed):
    a = _acting_operand(h_res, transposed)
    res_BTnC = jnp.einsum("...ij,...jc->...ic", a, x_BTnC, precision=_HI, preferred_element_type=jnp.float32)
    out = (res_BTnC + h_post[..., :, None] * y_BTC.astype(jnp.float32)[..., None, :]).astype(x_BTnC.dtype)
    return out, (x_BTnC, y_BTC, h_post, h_res)


def _res_post_mix_bwd(transposed, res, g_BTnC):
    # Written out (rather than autodiff of the einsum) so that dx = A^T g runs as the forward's kind of dot:
    # autodiff hands XLA the transposed operand, the slow path of `_acting_operand`.
    x_BTnC, y_BTC, h_post, h_res = res
    g = g_BTnC.astype(jnp.float32)
    dx = jnp.einsum("...ij,...jc->...ic", _acting_operand(h_res, not transposed), g, precision=_HI,
                    preferred_element_type=jnp.float32)
    da = jnp.einsum("...ic,...jc->...ij", g, x_BTnC, precision=_HI, preferred_element_type=jnp.float32)
    dh_post = jnp.einsum("...ic,...c->...i", g, y_BTC, precision=_HI, preferred_element_type=jnp.float32)
    dy = jnp.einsum("...i,...ic->...c", h_post, g, precision=_HI, preferred_element_type=jnp.float32)
    return (dx.astype(x_BTnC.dtype), dy.astype(y_BTC.dtype), dh_post.astype(h_post.dtype),
            acting_h_res(da, transposed).astype(h_res.dtype))  # the transpose is its own inverse


res_post_mix.defvjp(_res_post_mix_fwd, _res_post_mix_bwd)


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
# inputs in the backward pass, so between forward and backward a block keeps only its input streams, the
# per-token coefficients (n^2 + 2n floats), the sublayer inputs and outputs, never the float32
# intermediates nor the streams between its two sublayers (StreamConnection.with_source).
RECOMPUTE_POLICY = jax.checkpoint_policies.nothing_saveable
# The coefficient function (mappings and H_pre x) keeps the outputs of its one pass over the streams (mHC:
# the projection and the mean square, named in mhc.rms_projection; n^2 + 2n + 1 floats per token against
# the n C stream values): recomputing them re-read every stream value, 3% of the train step on 2 CPU cores.
COEFFICIENT_POLICY = jax.checkpoint_policies.save_only_these_names("mhc_projection", "mhc_mean_square")


def acting_h_res(h_res: jax.Array, transposed: bool) -> jax.Array:
    """The matrix A with new = A @ x (paper orientation), from a connection's native h_res."""
    return jnp.swapaxes(h_res, -1, -2) if transposed else h_res


class StreamSource(NamedTuple):
    """What a connection's output streams are recomputed from: res_post_mix(x, y, h_post, h_res)."""

    x_BTnC: jax.Array
    y_BTC: jax.Array
    h_post: jax.Array
    h_res: jax.Array


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

    def __call__(self, x_BTnC: jax.Array, branch: Branch, source: StreamSource | None = None) -> jax.Array:
        return self.with_source(x_BTnC, branch, source)[0]

    def with_source(self, x_BTnC: jax.Array, branch: Branch,
                    source: StreamSource | None = None) -> tuple[jax.Array, StreamSource | None]:
        """(x_{l+1}, what x_{l+1} is recomputed from). With residual.recompute, `source` (the previous
        connection's, of the same kind) stands in for x_BTnC inside every rematerialised piece, so x_BTnC
        itself is never kept for the backward pass: it is recomputed there from the source (paper Sec. 4.3:
        a block keeps its input streams, not the streams between its sublayers). Without recompute the
        source is ignored and None is returned."""
        if not self.residual.recompute:
            h_pre, h_post, h_res = self.mappings(x_BTnC)
            self._capture(h_res)
            return apply_mappings(x_BTnC, branch, h_pre, h_post, h_res, transposed=self.transposed,
                                  impl=self.residual.impl), None
        pre, res_post = mixing(self.residual.impl)
        transposed = self.transposed

        def streams(src: StreamSource | jax.Array) -> jax.Array:
            return res_post(*src, transposed) if isinstance(src, StreamSource) else src

        src = x_BTnC if source is None else source
        # A pure function of the connection's state (not nnx.remat of the bound method), so the connection
        # also runs inside plain JAX transforms of a model built outside them (e.g. interpret's jax.grad).
        graphdef, state = nnx.split(self)

        def mappings_and_input(st: Any, s: StreamSource | jax.Array) -> tuple[jax.Array, ...]:
            x = streams(s)
            h_pre, h_post, h_res = nnx.merge(graphdef, st).mappings(x)
            return pre(x, h_pre), h_post, h_res

        h_in_BTC, h_post, h_res = jax.checkpoint(mappings_and_input, policy=COEFFICIENT_POLICY)(state, src)
        self._capture(h_res)
        y_BTC = branch(h_in_BTC)
        post = jax.checkpoint(lambda s, *a: res_post(streams(s), *a, transposed), policy=RECOMPUTE_POLICY)
        return post(src, y_BTC, h_post, h_res), StreamSource(x_BTnC, y_BTC, h_post, h_res)

    def _capture(self, h_res: jax.Array) -> None:
        if self.capture_mappings:
            self.sow(nnx.Intermediate, "h_res", acting_h_res(h_res, self.transposed))


def mixing_flops(n: int, d_model: int) -> float:
    """Forward FLOPs per token of H_pre x (n C MACs), H_res x (n^2 C) and H_post^T y (n C) for one sublayer."""
    C = d_model
    return 2.0 * n * C + 2.0 * n * n * C + 2.0 * n * C
