"""Sinkhorn-Knopp projection of (..., n, n) logits onto (approximately) doubly stochastic matrices.

mHC paper Eq. 9: M0 = exp(H~) (the max is subtracted first; it cancels in the normalisations), then t_max
times: normalise the columns, then the rows. Rows therefore sum to 1 after every full iteration and the
truncation error sits on the columns (the backward / column-sum side of the residual stream).

Always computed in float32 and returned in float32 whatever the input dtype: in bfloat16 the row-sum
error grows by ~300x (mhc.md, "Precision").

The backward pass is exact for the truncated iteration (the same gradient as differentiating the unrolled
loop) but stores only the input between forward and backward: `jax.custom_vjp` recomputes the iterates in
the backward pass, as the paper's kernels do on-chip. An implicit-function backward would be exact only
at convergence, and a backward from the final output alone is an approximation (mhc.md).

Layout (speed): the iteration runs on (n, n, ...) with the token axes last, and a line sum is the sum of
the n slices along a leading axis (elementwise adds), so XLA fuses each normalisation with its sums
into loop fusions over contiguous token vectors: 3 small fusions per iteration instead of reductions over
an axis of 4 strided floats. Measured on 2 CPU cores for (768, 4, 4) logits: the forward ~20x faster.

Why a loop and not a Python-unrolled iteration (measured, jax 0.10 XLA:CPU, (768, 4, 4) logits, one-process
A/B): unrolled, XLA fuses across iterations and recomputes each fused producer once per slice of the next
line sum, so the work grows with depth: the unrolled forward compiled to 42 fusions and ran 6x slower than the
loop (1.5 ms vs 0.25 ms), its backward (88 fusions) over 100x slower; optimization barriers do not stop it
(XLA:CPU removes them before fusion). In the loop every iteration's input is materialised, so each fusion
does a bounded amount of work. The backward's cotangent line sums are reductions for the same reason.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


# Smallest normal float32. With eps = 0 a line whose entries all underflowed in exp() would give 0/0;
# dividing such a line by 1 keeps it 0 and changes no other value.
_TINY = float(jnp.finfo(jnp.float32).tiny)
# Linear domain only: centred logits are floored at -40 so every start entry is >= exp(-40) ~ 4e-18 and the
# squares of line sums stay representable in float32 (~1e-35 > 1.2e-38). Without it, saturated logits
# (a range of ~100, reached by high-LR training) underflow to zero lines and give NaN gradients. The floor
# changes a result only when a whole row or column lies 40 below the maximum (a saturated, almost
# permutation H_res); the log domain needs no floor.
_LOG_FLOOR = 40.0


def _line_sum(m: jax.Array, axis: int) -> jax.Array:
    """Sum over a short leading `axis` as n - 1 elementwise adds of slices (fusible, unlike a reduce)."""
    s = jax.lax.index_in_dim(m, 0, axis, keepdims=True)
    for i in range(1, m.shape[axis]):
        s = s + jax.lax.index_in_dim(m, i, axis, keepdims=True)
    return s


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _normalize(m: jax.Array, axis: int, eps: float) -> jax.Array:
    """m / (sum of m along `axis` + eps) for the (n, n, ...) layout (axis 0: columns, 1: rows)."""
    return _normalize_fwd(m, axis, eps)[0]


def _normalize_fwd(m, axis, eps):
    s = _line_sum(m, axis) + eps
    s = jnp.where(s < _TINY, 1.0, s)
    out = m / s
    return out, (out, s)


def _normalize_bwd(axis, eps, res, g):
    # d(m_i / s)/dm_k = (delta_ik - out_i) / s. Written with 1/s only: autodiff's -m/s^2 overflows
    # float32 once a line sums below ~1e-19 and then gives 0 * inf = NaN.
    out, s = res
    return ((g - _line_sum(g * out, axis)) / s,)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def _log_normalize(l: jax.Array, axis: int, log_eps: float | None) -> jax.Array:
    lse = jax.nn.logsumexp(l, axis=axis, keepdims=True)
    if log_eps is not None:  # log(sum + eps), the log-domain twin of _normalize's eps
        lse = jnp.logaddexp(lse, log_eps)
    return l - lse


def _sinkhorn_linear(x: jax.Array, num_iters: int, eps: float, softmax_start: bool) -> jax.Array:
    m = jnp.moveaxis(x, (-2, -1), (0, 1))  # (n, n, ...): entry (i, j) of every matrix is one token vector
    m = jnp.exp(jnp.maximum(m - jnp.max(m, axis=(0, 1), keepdims=True), -_LOG_FLOOR))
    if softmax_start:
        # DeepSeek-V4 (paper orientation): the first column step is a plain softmax, then + eps.
        m = _normalize(m, 0, 0.0) + eps
        m = _normalize(m, 1, eps)
        num_iters -= 1

    return jnp.moveaxis(_iterate(m, num_iters, eps), (0, 1), (-2, -1))


def _col_row(m: jax.Array, eps: float) -> jax.Array:
    return _normalize(_normalize(m, 0, eps), 1, eps)  # columns, then rows (Eq. 9)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _iterate(m: jax.Array, num_iters: int, eps: float) -> jax.Array:
    """num_iters column + row normalisations of the (n, n, ...) matrices m, in one fori_loop."""
    return jax.lax.fori_loop(0, num_iters, lambda _, m_: _col_row(m_, eps), m)


def _iterate_fwd(m, num_iters, eps):
    # Keeps one array per iteration (its input) instead of autodiff's four (two outputs, two line sums).
    out, history = jax.lax.scan(lambda m_, _: (_col_row(m_, eps), m_), m, None, length=num_iters)
    return out, history


def _iterate_bwd(num_iters, eps, history, g):
    def step(g_, m_prev):
        # One iteration's backward from its input: recompute a = colnorm(m), b = rownorm(a), then
        # d(m / s) = (g - sum(g * out)) / s along each line (the 1/s-only form of _normalize_bwd).
        # The two cotangent line sums are reductions (jnp.sum), not _line_sum's slice adds: summed by
        # slices, g_a would be fused into the column sum's consumer and recomputed (with its own row
        # sum) for every slice; a reduction materialises each sum once. Measured on 2 CPU cores for
        # (768, 4, 4) logits, forward + backward: 3.5 ms -> 1.2 ms (README, mHC Cost).
        s_c = _line_sum(m_prev, 0) + eps
        s_c = jnp.where(s_c < _TINY, 1.0, s_c)
        a = m_prev / s_c
        s_r = _line_sum(a, 1) + eps
        s_r = jnp.where(s_r < _TINY, 1.0, s_r)
        g_a = (g_ - jnp.sum(g_ * (a / s_r), axis=1, keepdims=True)) / s_r
        return (g_a - jnp.sum(g_a * a, axis=0, keepdims=True)) / s_c, None

    g_m, _ = jax.lax.scan(step, g, history, reverse=True)
    return (g_m,)


_iterate.defvjp(_iterate_fwd, _iterate_bwd)


def _sinkhorn_log(x: jax.Array, num_iters: int, eps: float, softmax_start: bool) -> jax.Array:
    log_eps = math.log(eps) if eps > 0 else None
    l = x - jnp.max(x, axis=(-2, -1), keepdims=True)
    if softmax_start:
        l = _log_normalize(l, -2, None)
        if log_eps is not None:
            l = jnp.logaddexp(l, log_eps)
        l = _log_normalize(l, -1, log_eps)
        num_iters -= 1

    def body(_: int, l: jax.Array) -> jax.Array:
        return _log_normalize(_log_normalize(l, -2, log_eps), -1, log_eps)

    return jnp.exp(jax.lax.fori_loop(0, num_iters, body, l))


def sinkhorn_forward(x: jax.Array, num_iters: int, eps: float, log_domain: bool,
                     softmax_start: bool) -> jax.Array:
    """The float32 iteration itself (no custom VJP): what every backward differentiates."""
    fn = _sinkhorn_log if log_domain else _sinkhorn_linear
    return fn(x, num_iters, eps, softmax_start)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _sinkhorn_recompute(x: jax.Array, num_iters: int, eps: float, log_domain: bool,
                        softmax_start: bool) -> jax.Array:
    return sinkhorn_forward(x, num_iters, eps, log_domain, softmax_start)


def _fwd(x, num_iters, eps, log_domain, softmax_start):
    # The only residual is the float32 input: (..., n, n) instead of ~2 * num_iters iterates.
    return sinkhorn_forward(x, num_iters, eps, log_domain, softmax_start), x


def _bwd(num_iters, eps, log_domain, softmax_start, x, g):
    # Recompute the iterates and back-propagate through every one of them: exact for the truncated loop.
    # The barrier ties the recomputation to the arriving cotangent, so XLA cannot hoist every layer's
    # recomputation to the start of the backward pass (which would hold all iterates at once again).
    x, g = jax.lax.optimization_barrier((x, g))
    _, vjp = jax.vjp(lambda y: sinkhorn_forward(y, num_iters, eps, log_domain, softmax_start), x)
    return vjp(g)


_sinkhorn_recompute.defvjp(_fwd, _bwd)


def check_sinkhorn_args(logits: jax.Array, num_iters: int, eps: float) -> None:
    """ValueError naming the bad value for logits that are not (..., n, n), num_iters < 1 or eps < 0."""
    if logits.ndim < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"Sinkhorn-Knopp needs (..., n, n) logits, got shape {logits.shape}")
    if num_iters < 1:
        raise ValueError(f"num_iters={num_iters} is not allowed: must be >= 1")
    if eps < 0:
        raise ValueError(f"eps={eps} is not allowed: must be >= 0")


def sinkhorn_knopp(logits: jax.Array, num_iters: int = 20, eps: float = 0.0, log_domain: bool = False,
                   softmax_start: bool = False, recompute_backward: bool = True) -> jax.Array:
    """Projects the last two axes of `logits` (..., n, n) towards the doubly stochastic matrices.

    num_iters: t_max column+row normalisations (mHC paper: 20). eps: added to every denominator
    (DeepSeek-V4: 1e-6; 0 is the paper). log_domain: the same iteration on log values with logsumexp
    (equal to the standard one in exact arithmetic). softmax_start: DeepSeek-V4's start, in this function's
    (paper) orientation: the first column normalisation is a softmax followed by + eps. recompute_backward:
    the custom VJP that stores only the input (False differentiates the loop directly, for comparison).
    (mhc_jax.sinkhorn_pallas.sinkhorn_knopp_pallas is the same iteration as one Pallas kernel.)
    Returns float32 (..., n, n) whose rows sum to 1 (up to eps) after the final row step.
    """
    check_sinkhorn_args(logits, num_iters, eps)
    x = logits.astype(jnp.float32)
    args = (int(num_iters), float(eps), bool(log_domain), bool(softmax_start))
    if recompute_backward:
        return _sinkhorn_recompute(x, *args)
    return sinkhorn_forward(x, *args)


def sinkhorn_flops(n: int, iters: int) -> float:
    """exp of the n x n logits, then per iteration a column and a row normalisation (n^2 sums + n^2
    divisions each): mHC paper Eq. 9."""
    return n * n + 4.0 * n * n * iters
