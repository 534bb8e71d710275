"""Sinkhorn-Knopp (mHC paper Eq. 9) as one Pallas kernel: all t_max iterations of a block of tokens in
on-chip memory, one read of the logits and one write of H_res; the backward recomputes (custom VJP).

Layout: the (..., n, n) logits become (n^2, N) with N = tokens on the lane axis, entry (i, j) on row
i * n + j, padded to a multiple of the token block. A kernel instance holds one (n^2, block) tile and runs
the iteration of `mhc_jax.sinkhorn` (subtract the max, floor at -40, exp, then t_max column + row
normalisations with the same eps and zero-line guard; DeepSeek-V4's softmax start optional) on n^2 lane
vectors, so every line sum is n - 1 vector adds. Linear domain only.

Backward: the custom VJP stores only the float32 logits; a second kernel recomputes the iterates on-chip
and back-propagates through every one (`sinkhorn_vectors_vjp`): the gradient autodiff gives for the XLA
iteration (`mhc_jax.sinkhorn.sinkhorn_forward`), exact for the truncated loop, as the paper's kernels do.

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

from mhc_jax.sinkhorn import _LOG_FLOOR, _TINY, check_sinkhorn_args

LANES = 128  # TPU lane width: the token block is a multiple of it
MAX_BLOCK = 512  # tokens per kernel instance: 16 x 512 float32 = 32 KiB in and out, far under VMEM


def _line_sums(m: list[list[jax.Array]], columns: bool, eps: float) -> list[jax.Array]:
    """Every column (or row) sum of m + eps, with mhc_jax.sinkhorn._normalize's zero-line guard."""
    n = len(m)
    sums = []
    for line in range(n):
        entries = [m[i][line] for i in range(n)] if columns else [m[line][j] for j in range(n)]
        s = entries[0]
        for v in entries[1:]:
            s = s + v
        s = s + eps
        sums.append(jnp.where(s < _TINY, 1.0, s))
    return sums


def _line_normalize(m: list[list[jax.Array]], columns: bool, eps: float) -> list[list[jax.Array]]:
    """m[i][j] / (sum over the line + eps), the zero-line guard of mhc_jax.sinkhorn._normalize."""
    n = len(m)
    s = _line_sums(m, columns, eps)
    return [[m[i][j] / s[j if columns else i] for j in range(n)] for i in range(n)]


def _nest(flat, n: int) -> list[list[jax.Array]]:
    return [list(flat[i * n:(i + 1) * n]) for i in range(n)]


def _flatten(m: list[list[jax.Array]]) -> tuple[jax.Array, ...]:
    return tuple(v for row in m for v in row)


def _exp_start(rows: list[jax.Array]) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
    """The iteration's start (mhc_jax.sinkhorn._sinkhorn_linear): the max over a token's n^2 logits, the
    centred logits d and exp(max(d, -40)); (max, d, exp)."""
    mx = rows[0]
    for r in rows[1:]:
        mx = jnp.maximum(mx, r)
    d = [r - mx for r in rows]
    return mx, d, [jnp.exp(jnp.maximum(v, -_LOG_FLOOR)) for v in d]


def sinkhorn_vectors(rows: list[jax.Array], n: int, num_iters: int, eps: float,
                     softmax_start: bool) -> list[jax.Array]:
    """The iteration of `mhc_jax.sinkhorn` on n^2 same-shaped arrays (entry (i, j) of every token's logits
    is rows[i * n + j]), inside a kernel: float32 in, float32 out, every line sum n - 1 elementwise adds.
    Shared by this module's kernel and the fused mHC coefficient kernel (mhc_jax.residual.mhc_pallas)."""
    m = _nest(_exp_start(rows)[2], n)
    if softmax_start:
        m = _line_normalize(m, True, 0.0)
        m = [[v + eps for v in row] for row in m]
        m = _line_normalize(m, False, eps)
        num_iters -= 1

    return list(jax.lax.fori_loop(0, num_iters, functools.partial(_iteration, n=n, eps=eps), _flatten(m)))


def _iteration(_: int, flat: tuple[jax.Array, ...], *, n: int, eps: float) -> tuple[jax.Array, ...]:
    """One column + row normalisation (Eq. 9) of the flattened n x n vectors: a fori_loop body."""
    return _flatten(_line_normalize(_line_normalize(_nest(flat, n), True, eps), False, eps))


def _normalize_vjp(out: list[list[jax.Array]], s: list[jax.Array], g: list[list[jax.Array]],
                   columns: bool) -> list[list[jax.Array]]:
    """Cotangent of m through out = m / s along lines: (g - sum over the line of g * out) / s, the 1/s-only
    form of mhc_jax.sinkhorn._normalize_bwd."""
    n = len(out)
    at = (lambda line, k: (k, line)) if columns else (lambda line, k: (line, k))
    dm = [[None] * n for _ in range(n)]
    for line in range(n):
        i0, j0 = at(line, 0)
        t = g[i0][j0] * out[i0][j0]
        for k in range(1, n):
            i, j = at(line, k)
            t = t + g[i][j] * out[i][j]
        for k in range(n):
            i, j = at(line, k)
            dm[i][j] = (g[i][j] - t) / s[line]
    return dm


def _col_row_vjp(m: list[list[jax.Array]], g: list[list[jax.Array]], eps: float) -> list[list[jax.Array]]:
    """Cotangent of one iteration's input m (columns, then rows normalised) from its output's g:
    mhc_jax.sinkhorn._iterate_bwd's step on lists of vectors."""
    n = len(m)
    s_c = _line_sums(m, True, eps)
    a = [[m[i][j] / s_c[j] for j in range(n)] for i in range(n)]
    s_r = _line_sums(a, False, eps)
    out = [[a[i][j] / s_r[i] for j in range(n)] for i in range(n)]  # = _line_normalize(a, False, eps)
    return _normalize_vjp(a, s_c, _normalize_vjp(out, s_r, g, False), True)


def sinkhorn_vectors_vjp(rows: list[jax.Array], g: list[jax.Array], n: int, num_iters: int, eps: float,
                         softmax_start: bool) -> list[jax.Array]:
    """Cotangent of the logits `rows` of `sinkhorn_vectors` from the cotangent `g` of its result (same
    layout), inside a kernel: the gradient XLA's autodiff gives for mhc_jax.sinkhorn.sinkhorn_forward
    (the iterations' custom backward, the max's cotangent split among ties, the -40 floor's half at a
    tie), exact for the truncated loop. Nothing is stored between the iterations: iteration k's input is
    recomputed from the start for each k (num_iters^2 / 2 cheap vector iterations, all on-chip), and the
    backward of the start (exp, the optional softmax step) follows."""
    mx, d, e = _exp_start(rows)
    m = _nest(e, n)
    if softmax_start:
        s_c0 = _line_sums(m, True, 0.0)
        a0 = [[m[i][j] / s_c0[j] for j in range(n)] for i in range(n)]
        b0 = [[v + eps for v in row] for row in a0]
        s_r0 = _line_sums(b0, False, eps)
        m = [[b0[i][j] / s_r0[i] for j in range(n)] for i in range(n)]
        num_iters -= 1
    start = _flatten(m)

    iterate = functools.partial(_iteration, n=n, eps=eps)

    def backward(step: int, g_flat: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        k = num_iters - 1 - step  # iterations run backward; the input of iteration k is recomputed
        m_k = jax.lax.fori_loop(0, k, iterate, start)
        return _flatten(_col_row_vjp(_nest(m_k, n), _nest(g_flat, n), eps))

    gm = _nest(jax.lax.fori_loop(0, num_iters, backward, tuple(g)), n)
    if softmax_start:  # out = rownorm(colnorm(e, eps=0) + eps): the + eps passes the cotangent through
        gm = _normalize_vjp(a0, s_c0, _normalize_vjp(m, s_r0, gm, False), True)
    floor = -_LOG_FLOOR  # d/dv max(v, floor): 1 above, 1/2 at a tie (jax's balanced rule), 0 below
    gd = [gm[k // n][k % n] * e[k] * jnp.where(d[k] > floor, 1.0, jnp.where(d[k] == floor, 0.5, 0.0))
          for k in range(n * n)]
    # d = rows - max(rows): the max's cotangent, -sum(gd), is split equally among the entries at the max
    hits = [jnp.where(r == mx, 1.0, 0.0) for r in rows]
    count, total = hits[0], gd[0]
    for k in range(1, n * n):
        count, total = count + hits[k], total + gd[k]
    share = -total / count
    return [gd[k] + hits[k] * share for k in range(n * n)]


def _kernel(x_ref, o_ref, *, n: int, num_iters: int, eps: float, softmax_start: bool):
    rows = [x_ref[k:k + 1, :].astype(jnp.float32) for k in range(n * n)]  # (1, block) each
    flat = sinkhorn_vectors(rows, n, num_iters, eps, softmax_start)
    for k in range(n * n):
        o_ref[k:k + 1, :] = flat[k]


def _bwd_kernel(x_ref, g_ref, o_ref, *, n: int, num_iters: int, eps: float, softmax_start: bool):
    rows = [x_ref[k:k + 1, :].astype(jnp.float32) for k in range(n * n)]
    g = [g_ref[k:k + 1, :] for k in range(n * n)]
    flat = sinkhorn_vectors_vjp(rows, g, n, num_iters, eps, softmax_start)
    for k in range(n * n):
        o_ref[k:k + 1, :] = flat[k]


def _pallas_call(kernel, arrays: list[jax.Array], num_iters: int, eps: float, softmax_start: bool,
                 interpret: bool) -> jax.Array:
    """kernel over token blocks of (..., n, n) float32 arrays laid out as (n^2, tokens); (..., n, n) out."""
    x = arrays[0]
    *lead, n, _ = x.shape
    tokens = 1
    for d in lead:
        tokens *= d
    block = min(MAX_BLOCK, -(-tokens // LANES) * LANES)
    padded = -(-tokens // block) * block
    # padded tokens are zeros: a uniform H_res (and a zero cotangent), dropped below
    rows = [jnp.pad(jnp.moveaxis(a.reshape(tokens, n * n), 0, -1), ((0, 0), (0, padded - tokens))) for a in arrays]
    kernel = functools.partial(kernel, n=n, num_iters=num_iters, eps=eps, softmax_start=softmax_start)
    spec = pl.BlockSpec((n * n, block), lambda t: (0, t))
    kwargs = {}
    if not interpret:
        from jax.experimental.pallas import tpu as pltpu
        kwargs["compiler_params"] = pltpu.CompilerParams(dimension_semantics=("parallel",))  # megacore split
    out_KN = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(rows[0].shape, jnp.float32),
                            grid=(padded // block,), in_specs=[spec] * len(rows), out_specs=spec,
                            interpret=interpret, **kwargs)(*rows)
    return jnp.moveaxis(out_KN[:, :tokens], -1, 0).reshape(*lead, n, n)


def _on_platform(kernel, arrays: list[jax.Array], num_iters: int, eps: float, softmax_start: bool) -> jax.Array:
    # Interpret mode where the computation is lowered for CPU; the Mosaic kernel everywhere else.
    return jax.lax.platform_dependent(
        *arrays, cpu=lambda *a: _pallas_call(kernel, list(a), num_iters, eps, softmax_start, True),
        default=lambda *a: _pallas_call(kernel, list(a), num_iters, eps, softmax_start, False))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def sinkhorn_pallas(x: jax.Array, num_iters: int, eps: float, softmax_start: bool) -> jax.Array:
    """float32 (..., n, n) logits -> H_res (..., n, n), rows summing to 1 (paper orientation)."""
    return _on_platform(_kernel, [x], num_iters, eps, softmax_start)


def _fwd(x, num_iters, eps, softmax_start):
    return _on_platform(_kernel, [x], num_iters, eps, softmax_start), x


def _bwd(num_iters, eps, softmax_start, x, g):
    x, g = jax.lax.optimization_barrier((x, g))  # recompute when the cotangent arrives (see mhc_jax.sinkhorn)
    return (_on_platform(_bwd_kernel, [x, g.astype(jnp.float32)], num_iters, eps, softmax_start),)


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
