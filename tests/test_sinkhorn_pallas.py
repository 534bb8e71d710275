"""The Pallas Sinkhorn kernel (mhc_jax.sinkhorn_pallas): interpret mode on CPU against the XLA path and the
float64 reference (values and gradients), inside an mHC connection, and compiled for a TPU topology."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax.config import Config
from mhc_jax.sinkhorn import sinkhorn_forward, sinkhorn_knopp
from mhc_jax.sinkhorn_pallas import sinkhorn_knopp_pallas, sinkhorn_vectors_vjp

from references import connection, randomize, ref_sinkhorn, ref_v4_comb


def _logits(shape, scale=2.0, seed=0) -> np.ndarray:
    return scale * np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("shape", [(3, 5, 4, 4), (700, 4, 4), (6, 2, 2)])
def test_pallas_values_match_float64_reference_and_xla(shape):
    x = _logits(shape)
    got = sinkhorn_knopp_pallas(jnp.asarray(x), 20)
    assert got.dtype == jnp.float32 and got.shape == shape
    chex.assert_trees_all_close(np.asarray(got, np.float64), ref_sinkhorn(x.astype(np.float64), 20),
                                atol=1e-6, rtol=0)
    chex.assert_trees_all_close(got, sinkhorn_knopp(jnp.asarray(x), 20), atol=1e-6, rtol=0)


def test_pallas_deepseek_v4_start_and_eps_match_reference():
    x = _logits((4, 6, 4, 4))
    comb = jnp.swapaxes(sinkhorn_knopp_pallas(jnp.swapaxes(jnp.asarray(x), -1, -2), 20, 1e-6,
                                              softmax_start=True), -1, -2)
    chex.assert_trees_all_close(np.asarray(comb, np.float64), ref_v4_comb(x.astype(np.float64), 20, 1e-6),
                                atol=1e-6, rtol=0)


def test_pallas_gradient_equals_xla_gradient():
    x = jnp.asarray(_logits((2, 7, 4, 4), scale=1.5))
    w = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape).astype(np.float32))
    grads = [jax.jit(jax.grad(lambda y, fn=fn: jnp.sum(w * fn(y, 20))))(x)
             for fn in (sinkhorn_knopp_pallas, sinkhorn_knopp)]
    scale = float(jnp.max(jnp.abs(grads[1])))
    chex.assert_trees_all_close(grads[0], grads[1], atol=1e-5 * scale, rtol=1e-5)


def test_saturated_logits_stay_finite_in_the_kernel():
    x = jnp.asarray(_logits((64, 4, 4), scale=60.0))
    out = sinkhorn_knopp_pallas(x, 20)
    chex.assert_tree_all_finite(out)
    np.testing.assert_allclose(np.asarray(out.sum(-1), np.float64), 1.0, atol=1e-6)


def test_mhc_connection_with_pallas_equals_xla_values_and_gradients():
    def run(impl):
        cfg = Config().replace(model={"d_model": 16, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 32},
                               residual={"kind": "mhc", "impl": impl})
        conn = randomize(connection(cfg, 0))
        graphdef, params = nnx.split(conn, nnx.Param)
        x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 4, 16)).astype(np.float32))
        f = lambda p, x_: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x_, jnp.tanh)))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)
    chex.assert_trees_all_close(run("pallas"), run("xla"), atol=2e-5, rtol=2e-5)


def test_pallas_rejects_log_domain():
    with pytest.raises(ValueError, match="linear-domain"):
        sinkhorn_knopp_pallas(jnp.zeros((4, 4)), 20, log_domain=True)
    with pytest.raises(ValueError, match="logits"):
        sinkhorn_knopp_pallas(jnp.zeros((4, 3)), 20)


def test_pallas_kernel_compiles_for_tpu_v4_megacore():
    pytest.importorskip("libtpu", reason="TPU AOT needs libtpu (the [tpu] extra)")
    from jax.experimental import topologies
    topo = topologies.get_topology_desc("v4:2x2x1", "tpu", chip_config_name="megacore")
    assert len(topo.devices) == 4  # megacore: one device per chip
    sharding = jax.sharding.SingleDeviceSharding(topo.devices[0])
    x = jax.ShapeDtypeStruct((8, 256, 4, 4), jnp.float32, sharding=sharding)
    w = jnp.ones((4, 4), jnp.float32)
    f = jax.jit(jax.value_and_grad(lambda y: jnp.sum(w * sinkhorn_knopp_pallas(y, 20))))
    compiled = f.lower(x).compile()
    text = compiled.as_text()
    assert "tpu_custom_call" in text or "mosaic" in text.lower(), "the Mosaic kernel is not in the TPU program"


@pytest.mark.parametrize("softmax_start,eps", [(False, 0.0), (False, 1e-6), (True, 1e-6)],
                         ids=["paper", "eps", "deepseek_v4_start"])
def test_vector_backward_equals_autodiff_of_the_xla_iteration(softmax_start, eps):
    """sinkhorn_vectors_vjp (the kernels' on-chip backward, iterates recomputed) against jax.vjp of the XLA
    iteration, with a tie at the maximum (its cotangent split) and saturated logits (the -40 floor)."""
    n = 4
    x = _logits((40, n, n), scale=3.0, seed=2)
    x[0, 1, 2] = x[0].max()  # two entries at the max
    x[1] *= 40.0  # entries below the floor
    x = jnp.asarray(x)
    g = jnp.asarray(_logits((40, n, n), scale=1.0, seed=3))
    _, vjp = jax.vjp(lambda y: sinkhorn_forward(y, 20, eps, False, softmax_start), x)
    want = vjp(g)[0]
    vecs = lambda a: [a[:, k // n, k % n] for k in range(n * n)]
    got = jax.jit(lambda r, g_: sinkhorn_vectors_vjp(r, g_, n, 20, eps, softmax_start))(vecs(x), vecs(g))
    got = jnp.stack(got, -1).reshape(x.shape)
    chex.assert_tree_all_finite(got)
    chex.assert_trees_all_close(got, want, atol=1e-6 * float(jnp.max(jnp.abs(want))), rtol=0)
