"""mhc_jax.grouped_matmul (dropless MoE's grouped matmul) against a float64 numpy reference: values and both
gradients for empty groups, one group holding every row, groups starting mid-tile and rows past the groups;
its compiled memory does not grow with the group count (XLA:CPU's ragged_dot grows G-fold); TPU gets
XLA's ragged dot."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax.grouped_matmul import MAX_TILE, grouped_matmul, tile_rows


def reference(x_PK: np.ndarray, w_GKN: np.ndarray, sizes: list[int], g_PN: np.ndarray):
    """(out, dx, dw) in float64: each group's rows times its matrix; rows past sum(sizes) zero."""
    x, w, g = (a.astype(np.float64) for a in (x_PK, w_GKN, g_PN))
    out, dx, dw = np.zeros((x.shape[0], w.shape[2])), np.zeros_like(x), np.zeros_like(w)
    r = 0
    for i, n in enumerate(sizes):
        out[r:r + n] = x[r:r + n] @ w[i]
        dx[r:r + n] = g[r:r + n] @ w[i].T
        dw[i] = x[r:r + n].T @ g[r:r + n]
        r += n
    return out, dx, dw


CASES = {
    "empty-groups-mid-tile-starts": (96, [10, 0, 30, 5, 0, 20, 1, 20]),
    "one-group-holds-every-row": (50, [0, 50, 0]),
    "rows-past-the-groups-are-zero": (40, [3, 4, 5]),
    "many-tiles-and-groups": (300, [100, 0, 7, 150, 43]),
    "no-rows-in-any-group": (33, [0, 0]),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_grouped_matmul_and_its_gradients_equal_the_float64_per_group_products(case):
    P, sizes = case
    K, N, G = 8, 12, len(sizes)
    rng = np.random.default_rng(P)
    x, w, g = (rng.normal(size=s).astype(np.float32) for s in ((P, K), (G, K, N), (P, N)))
    out, vjp = jax.vjp(lambda a, b: grouped_matmul(a, b, jnp.asarray(sizes)), jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    ref_out, ref_dx, ref_dw = reference(x, w, sizes, g)
    for got, want in ((out, ref_out), (dx, ref_dx), (dw, ref_dw)):
        chex.assert_trees_all_close(np.asarray(got, np.float64), want, atol=2e-5, rtol=2e-5)


def test_grouped_matmul_keeps_bfloat16_inputs_and_accumulates_in_float32():
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=(64, 256)), rng.normal(size=(2, 256, 8))
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    out = grouped_matmul(xb, wb, jnp.asarray([40, 24]))
    chex.assert_type(out, jnp.bfloat16)
    want = reference(np.asarray(xb, np.float64), np.asarray(wb, np.float64), [40, 24], np.zeros((64, 8)))[0]
    chex.assert_trees_all_close(np.asarray(out, np.float64), want, rtol=1e-2, atol=1e-1)  # bf16 output rounding


def test_grouped_matmul_memory_is_rows_plus_weights_never_rows_times_groups():
    """XLA:CPU's ragged_dot keeps (G, rows, N) float32 products (forward 272 MiB, backward 848 MiB at G = 64
    here); ours keeps O(rows (K + N)) forward, plus weight-sized buffers (G K N) backward."""
    P, K, N = 4096, 256, 256

    def temp_bytes(fn, G: int, backward: bool) -> int:
        args = (jax.ShapeDtypeStruct((P, K), jnp.float32), jax.ShapeDtypeStruct((G, K, N), jnp.float32),
                jax.ShapeDtypeStruct((G,), jnp.int32))
        if backward:
            fn = jax.grad(lambda x, w, s, fn=fn: jnp.sum(fn(x, w, s) ** 2), argnums=(0, 1))
        return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes

    for G in (1, 16, 64):
        assert temp_bytes(grouped_matmul, G, False) <= 2 * P * (K + N) * 4, G
        assert temp_bytes(grouped_matmul, G, True) <= 4 * (P * (K + N) + G * K * N) * 4, G
    assert temp_bytes(jax.lax.ragged_dot, 64, False) >= 32 * P * N * 4  # the failure mode this module avoids


def test_tile_is_a_power_of_two_near_the_mean_group_size():
    cases = ((96, 8), (3072, 16), (49152, 64), (5, 64), (10, 1))
    assert [tile_rows(P, G) for P, G in cases] == [16, MAX_TILE, MAX_TILE, 8, 16]


def test_grouped_matmul_is_xla_ragged_dot_when_lowered_for_tpu():
    args = (jax.ShapeDtypeStruct((64, 8), jnp.float32), jax.ShapeDtypeStruct((4, 8, 8), jnp.float32),
            jax.ShapeDtypeStruct((4,), jnp.int32))
    tpu = jax.jit(grouped_matmul).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    cpu = jax.jit(grouped_matmul).lower(*args).as_text()
    assert "ragged_dot" in tpu and "while" not in tpu
    assert "ragged_dot" not in cpu and "while" in cpu


def test_grouped_matmul_names_the_bad_shapes():
    with pytest.raises(ValueError, match=r"\(7, 8\), \(4, 9, 8\)"):
        grouped_matmul(jnp.zeros((7, 8)), jnp.zeros((4, 9, 8)), jnp.zeros((4,), jnp.int32))
