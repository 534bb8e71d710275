"""Sinkhorn-Knopp (mHC paper Eq. 9) against float64 numpy references written from the equations."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mhc_jax.sinkhorn import sinkhorn_knopp

from references import ref_sinkhorn, ref_v4_comb


def unrolled_sinkhorn(x: jax.Array, iters: int) -> jax.Array:
    """The same iteration as a Python loop, differentiated by plain autodiff (the gradient to match)."""
    m = jnp.exp(x - jnp.max(x, axis=(-2, -1), keepdims=True))
    for _ in range(iters):
        m = m / m.sum(-2, keepdims=True)
        m = m / m.sum(-1, keepdims=True)
    return m


def _logits(shape=(3, 5, 4, 4), scale=2.0, seed=0) -> np.ndarray:
    return scale * np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("iters", [1, 5, 20])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_matches_float64_reference(iters, n):
    x = _logits((6, n, n))
    out = sinkhorn_knopp(jnp.asarray(x), iters)
    assert out.dtype == jnp.float32
    chex.assert_trees_all_close(np.asarray(out, np.float64), ref_sinkhorn(x.astype(np.float64), iters),
                                atol=1e-6, rtol=0)


def test_matches_reference_with_eps():
    x = _logits()
    out = sinkhorn_knopp(jnp.asarray(x), 20, eps=1e-3)
    chex.assert_trees_all_close(np.asarray(out, np.float64), ref_sinkhorn(x.astype(np.float64), 20, 1e-3),
                                atol=1e-6, rtol=0)


def test_rows_sum_to_one_after_each_iteration():
    x = jnp.asarray(_logits(scale=4.0))
    for t in range(1, 21):
        rows = np.asarray(sinkhorn_knopp(x, t).sum(-1), np.float64)
        np.testing.assert_allclose(rows, 1.0, atol=1e-6, err_msg=f"after iteration {t}")


def test_columns_approach_one_as_iterations_grow():
    x = jnp.asarray(_logits(scale=3.0))
    errors = [float(jnp.max(jnp.abs(sinkhorn_knopp(x, t).sum(-2) - 1.0))) for t in (1, 3, 10, 30, 200)]
    assert all(a > b for a, b in zip(errors[:-2], errors[1:-1])), errors
    assert errors[0] > 1e-2  # one iteration is far from doubly stochastic at this scale
    assert errors[-1] < 1e-5, errors


def test_saturated_logits_give_finite_values_and_gradients():
    # Logit ranges of ~200, as high-LR training reached: exp() underflows whole lines, which must give
    # neither 0/0 forward nor NaN gradients. Rows still sum to 1.
    x = jnp.asarray(_logits(scale=60.0))
    for log_domain in (False, True):
        out = sinkhorn_knopp(x, 20, log_domain=log_domain)
        chex.assert_tree_all_finite(out)
        for rb in (True, False):
            grad = jax.grad(lambda y: jnp.sum(jnp.sin(sinkhorn_knopp(y, 20, log_domain=log_domain,
                                                                     recompute_backward=rb))))(x)
            chex.assert_tree_all_finite(grad)
        np.testing.assert_allclose(np.asarray(out.sum(-1), np.float64), 1.0, atol=1e-6)


def test_bf16_input_gives_float32_results_of_same_accuracy():
    x = jnp.asarray(_logits()).astype(jnp.bfloat16)
    out = sinkhorn_knopp(x, 20)
    assert out.dtype == jnp.float32
    ref = ref_sinkhorn(np.asarray(x.astype(jnp.float32), np.float64), 20)
    chex.assert_trees_all_close(np.asarray(out, np.float64), ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(out.sum(-1), np.float64), 1.0, atol=1e-6)
    grad = jax.grad(lambda y: sinkhorn_knopp(y, 20)[..., 0, 1].sum())(x)
    assert grad.dtype == jnp.bfloat16


@pytest.mark.parametrize("iters", [1, 7, 20])
def test_custom_vjp_equals_unrolled_autodiff(iters):
    x = jnp.asarray(_logits(scale=1.5))
    w = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape).astype(np.float32))
    g_custom = jax.grad(lambda y: jnp.sum(w * sinkhorn_knopp(y, iters)))(x)
    g_unrolled = jax.grad(lambda y: jnp.sum(w * unrolled_sinkhorn(y, iters)))(x)
    scale = float(jnp.max(jnp.abs(g_unrolled)))
    chex.assert_trees_all_close(g_custom, g_unrolled, atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize("log_domain,softmax_start,eps", [(False, True, 1e-6), (True, False, 0.0),
                                                          (True, True, 1e-6)])
def test_custom_vjp_equals_direct_autodiff_for_variants(log_domain, softmax_start, eps):
    x = jnp.asarray(_logits(scale=1.5))
    w = jnp.asarray(np.random.default_rng(2).standard_normal(x.shape).astype(np.float32))
    grads = [jax.grad(lambda y: jnp.sum(w * sinkhorn_knopp(y, 20, eps, log_domain, softmax_start,
                                                           recompute_backward=rb)))(x) for rb in (True, False)]
    scale = float(jnp.max(jnp.abs(grads[1])))
    chex.assert_trees_all_close(grads[0], grads[1], atol=1e-5 * scale, rtol=1e-5)


def test_check_grads_passes():
    x = jnp.asarray(_logits((2, 4, 4), scale=1.0))
    check_grads(lambda y: sinkhorn_knopp(y, 20), (x,), order=2, modes=("rev",))


@pytest.mark.parametrize("eps,softmax_start", [(0.0, False), (1e-6, False), (1e-6, True)])
def test_log_domain_equals_standard(eps, softmax_start):
    x = jnp.asarray(_logits(scale=3.0))
    std = sinkhorn_knopp(x, 20, eps, log_domain=False, softmax_start=softmax_start)
    log = sinkhorn_knopp(x, 20, eps, log_domain=True, softmax_start=softmax_start)
    chex.assert_trees_all_close(log, std, atol=2e-6, rtol=0)


def test_softmax_start_transposed_is_deepseek_v4_comb():
    x = _logits()
    comb = jnp.swapaxes(sinkhorn_knopp(jnp.swapaxes(jnp.asarray(x), -1, -2), 20, 1e-6, softmax_start=True),
                        -1, -2)
    chex.assert_trees_all_close(np.asarray(comb, np.float64), ref_v4_comb(x.astype(np.float64), 20, 1e-6),
                                atol=1e-6, rtol=0)


def _residual_bytes(recompute_backward: bool, x: jax.Array) -> int:
    """Bytes that reverse mode keeps from forward to backward: the outputs of a jitted jax.vjp closure."""
    f = lambda y: sinkhorn_knopp(y, 20, recompute_backward=recompute_backward)
    compiled = jax.jit(lambda y: jax.vjp(f, y)[1]).lower(x).compile()
    return compiled.memory_analysis().output_size_in_bytes


def test_memory_analysis_shows_custom_vjp_stores_only_the_input():
    x = jnp.zeros((256, 4, 4), jnp.float32)
    custom, unrolled = _residual_bytes(True, x), _residual_bytes(False, x)
    assert custom == x.nbytes, (custom, x.nbytes)
    assert unrolled >= 20 * x.nbytes, (unrolled, x.nbytes)  # at least one saved iterate per iteration


@pytest.mark.parametrize("bad", [dict(shape=(4, 3)), dict(shape=(4,)), dict(num_iters=0), dict(eps=-1.0)])
def test_bad_arguments_raise(bad):
    x = jnp.zeros(bad.get("shape", (4, 4)))
    with pytest.raises(ValueError):
        sinkhorn_knopp(x, bad.get("num_iters", 20), bad.get("eps", 0.0))
