"""Sinkhorn-Knopp (mHC paper Eq. 9) as one Pallas kernel: all t_max iterations of a block of tokens in
on-chip memory, one read of the logits and one write of H_res; the backward recomputes (custom VJP).

Layout: the (..., n, n) logits become (n^2, N) with N = tokens on the lane axis, entry (i, j) on row
i * n + j, padded to a multiple of the token block. A kernel instance holds one (n^2, block) tile and runs
the iteration of `mhc_jax.sinkhorn` (subtract the max, floor at -40, exp, then t_max column + row
normalisations with the same eps and zero-line guard; DeepSeek-V4's softmax start optional) on n^2 lane
vectors, so every line sum is n - 1 vector adds. Linear domain only.

Backward: the custom VJP stores only the float32 logits and differentiates the XLA iteration
(`mhc_jax.sinkhorn.sinkhorn_forward`) at them: the exact gradient of the truncated iteration, recomputed
as the paper's kernels do.

Platforms: Mosaic TPU (compiled ahead of time for TPU topologies in the tests) and Pallas interpret mode
on CPU (chosen by `jax.lax.platform_dependent` at lowering time); not run on a GPU. `residual.impl: pallas`
uses the fused coefficient kernel of mhc_jax.residual.mhc_pallas instead, which runs this iteration
(`sinkhorn_vectors`) inside it (Triton on GPU too).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mhc_jax.sinkhorn import _LOG_FLOOR, _TINY, check_sinkhorn_args, sinkhorn_forward

LANES = 128  # TPU lane width: the token block is a multiple of it
MAX_BLOCK = 512  # tokens per kernel instance: 16 x 512 float32 = 32 KiB in and out, far under VMEM


def _line_normalize(m: list[list[jax.Array]], columns: bool, eps: float) -> list[list[jax.Array]]:
    """m[i][j] / (sum over the line + eps), the zero-line guard of mhc_jax.sinkhorn._normalize."""
    n = len(m)
    out = [[None] * n for _ in range(n)]
    for line in range(n):
        entries = [(i, line) for i in range(n)] if columns else [(line, j) for j in range(n)]
        s = m[entries[0][0]][entries[0][1]]
        for i, j in entries[1:]:
            s = s + m[i][j]
        s = s + eps
        s = jnp.where(s < _TINY, 1.0, s)
        for i, j in entries:
            out[i][j] = m[i][j] / s
    return out


def sinkhorn_vectors(rows: list[jax.Array], n: int, num_iters: int, eps: float,
                     softmax_start: bool) -> list[jax.Array]:
    """The iteration of `mhc_jax.sinkhorn` on n^2 same-shaped arrays (entry (i, j) of every token's logits
    is rows[i * n + j]), inside a kernel: float32 in, float32 out, every line sum n - 1 elementwise adds.
    Shared by this module's kernel and the fused mHC coefficient kernel (mhc_jax.residual.mhc_pallas)."""
    mx = rows[0]
    for r in rows[1:]:
        mx = jnp.maximum(mx, r)
    m = [[jnp.exp(jnp.maximum(rows[i * n + j] - mx, -_LOG_FLOOR)) for j in range(n)] for i in range(n)]
    if softmax_start:
        m = _line_normalize(m, True, 0.0)
        m = [[v + eps for v in row] for row in m]
        m = _line_normalize(m, False, eps)
        num_iters -= 1

    def body(_: int, flat: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        mm = [list(flat[i * n:(i + 1) * n]) for i in range(n)]
        mm = _line_normalize(_line_normalize(mm, True, eps), False, eps)  # columns, then rows (Eq. 9)
        return tuple(v for row in mm for v in row)

    return list(jax.lax.fori_loop(0, num_iters, body, tuple(v for row in m for v in row)))


def _kernel(x_ref, o_ref, *, n: int, num_iters: int, eps: float, softmax_start: bool):
    rows = [x_ref[k:k + 1, :].astype(jnp.float32) for k in range(n * n)]  # (1, block) each
    flat = sinkhorn_vectors(rows, n, num_iters, eps, softmax_start)
    for k in range(n * n):
        o_ref[k:k + 1, :] = flat[k]


def _pallas_forward(x: jax.Array, num_iters: int, eps: float, softmax_start: bool, interpret: bool) -> jax.Array:
    *lead, n, _ = x.shape
    tokens = 1
    for d in lead:
        tokens *= d
    block = min(MAX_BLOCK, -(-tokens // LANES) * LANES)
    padded = -(-tokens // block) * block
    x_KN = jnp.moveaxis(x.reshape(tokens, n * n), 0, -1)
    x_KN = jnp.pad(x_KN, ((0, 0), (0, padded - tokens)))  # padded tokens are zeros: a uniform H_res, dropped
    kernel = functools.partial(_kernel, n=n, num_iters=num_iters, eps=eps, softmax_start=softmax_start)
    spec = pl.BlockSpec((n * n, block), lambda t: (0, t))
    kwargs = {}
    if not interpret:
        from jax.experimental.pallas import tpu as pltpu
        kwargs["compiler_params"] = pltpu.CompilerParams(dimension_semantics=("parallel",))  # megacore split
    out_KN = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x_KN.shape, jnp.float32), grid=(padded // block,),
                            in_specs=[spec], out_specs=spec, interpret=interpret, **kwargs)(x_KN)
    return jnp.moveaxis(out_KN[:, :tokens], -1, 0).reshape(*lead, n, n)


def _forward(x: jax.Array, num_iters: int, eps: float, softmax_start: bool) -> jax.Array:
    # Interpret mode where the computation is lowered for CPU; the Mosaic kernel everywhere else.
    return jax.lax.platform_dependent(
        x, cpu=lambda y: _pallas_forward(y, num_iters, eps, softmax_start, True),
        default=lambda y: _pallas_forward(y, num_iters, eps, softmax_start, False))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def sinkhorn_pallas(x: jax.Array, num_iters: int, eps: float, softmax_start: bool) -> jax.Array:
    """float32 (..., n, n) logits -> H_res (..., n, n), rows summing to 1 (paper orientation)."""
    return _forward(x, num_iters, eps, softmax_start)


def _fwd(x, num_iters, eps, softmax_start):
    return _forward(x, num_iters, eps, softmax_start), x


def _bwd(num_iters, eps, softmax_start, x, g):
    x, g = jax.lax.optimization_barrier((x, g))  # recompute when the cotangent arrives (see mhc_jax.sinkhorn)
    _, vjp = jax.vjp(lambda y: sinkhorn_forward(y, num_iters, eps, False, softmax_start), x)
    return vjp(g)


sinkhorn_pallas.defvjp(_fwd, _bwd)


def sinkhorn_knopp_pallas(logits: jax.Array, num_iters: int = 20, eps: float = 0.0, log_domain: bool = False,
                          softmax_start: bool = False) -> jax.Array:
    """`mhc_jax.sinkhorn.sinkhorn_knopp` as one Pallas kernel for all iterations (linear domain only, always
    with the recomputing backward); the same arguments and result."""
    check_sinkhorn_args(logits, num_iters, eps)
    if log_domain:
        raise ValueError("the Pallas kernel runs the linear-domain iteration only: set log_domain=False "
                         "(residual.sinkhorn_log_domain: false) or residual.impl=xla")
    return sinkhorn_pallas(logits.astype(jnp.float32), int(num_iters), float(eps), bool(softmax_start))
