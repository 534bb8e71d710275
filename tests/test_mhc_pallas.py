"""The Pallas mHC kernels (mhc_jax.residual.mhc_pallas, residual.impl=pallas) in interpret mode on CPU:
coefficients and mixing against float64 numpy equations and the XLA path (values and gradients, float32
and bfloat16 streams, paper and DeepSeek-V4), every tiling the platforms use, whole connections with the
ablation switches, the config checks, and the Mosaic compile for a TPU v4 megacore topology."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax.config import Config, ConfigError
from mhc_jax.residual import mhc_pallas as mp
from mhc_jax.residual.base import pre_mix, res_post_mix
from mhc_jax.residual.mhc import rms_projection
from mhc_jax.sinkhorn import sinkhorn_forward

from references import connection, randomize, ref_sinkhorn, ref_v4_comb

N_STREAMS, C, EPS = 4, 32, 1e-6
A = (0.7, -1.3, 2.0)  # a_pre, a_post, a_res away from the init


def inputs(dtype=jnp.float32, shape=(2, 9), seed=0):
    rng = np.random.default_rng(seed)
    n, K = N_STREAMS, N_STREAMS * N_STREAMS + 2 * N_STREAMS
    x = jnp.asarray(rng.standard_normal((*shape, n, C)), jnp.float32).astype(dtype)
    phi = jnp.asarray(rng.standard_normal((n * C, K)) / np.sqrt(n * C), jnp.float32)
    bias = jnp.asarray(0.3 * rng.standard_normal(K), jnp.float32)
    return x, phi, bias


def ref_coefficients(x, phi, bias, v4: bool, iters: int = 20):
    """mHC paper Eq. 7-9 in float64 numpy (RMSNorm of vec(x) materialised, then the projection)."""
    n = x.shape[-2]
    v = np.asarray(x, np.float64).reshape(*x.shape[:-2], -1)
    c = v / np.sqrt(np.mean(v * v, -1, keepdims=True) + EPS) @ np.asarray(phi, np.float64)
    b = np.asarray(bias, np.float64)
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))
    h_pre = sig(A[0] * c[..., :n] + b[:n]) + (1e-6 if v4 else 0.0)
    h_post = 2.0 * sig(A[1] * c[..., n:2 * n] + b[n:2 * n])
    logits = (A[2] * c[..., 2 * n:] + b[2 * n:]).reshape(*c.shape[:-1], n, n)
    h_res = ref_v4_comb(logits, iters, 1e-6) if v4 else ref_sinkhorn(logits, iters)
    return h_pre, h_post, h_res


def xla_gates(c, bias, a_pre, a_post, a_res, spec_: mp.CoefSpec):
    """Eq. 8-9 from the normalised projection c = RMSNorm(vec(x)) phi (..., n^2 + 2n) in XLA: the gates and
    the Sinkhorn loop (autodiff differentiates every iteration): what the kernels compute from c."""
    n = spec_.n
    b = bias.astype(jnp.float32)
    h_pre = jax.nn.sigmoid(a_pre * c[..., :n] + b[:n]) + (mp.V4_EPS if spec_.v4 else 0.0)
    h_post = 2.0 * jax.nn.sigmoid(a_post * c[..., n:2 * n] + b[n:2 * n])
    logits = (a_res * c[..., 2 * n:] + b[2 * n:]).reshape(*c.shape[:-1], n, n)
    if spec_.v4:
        t = sinkhorn_forward(jnp.swapaxes(logits, -1, -2), spec_.iters, spec_.eps, False, True)
        return h_pre, h_post, jnp.swapaxes(t, -1, -2)
    return h_pre, h_post, sinkhorn_forward(logits, spec_.iters, spec_.eps, False, False)


def xla_coefficients(x, phi, bias, a_pre, a_post, a_res, spec_: mp.CoefSpec):
    """The XLA computation the kernel replaces: the fused projection, then gates and Sinkhorn."""
    return xla_gates(rms_projection(x, phi, spec_.norm_eps), bias, a_pre, a_post, a_res, spec_)


def spec(v4: bool) -> mp.CoefSpec:
    return mp.CoefSpec(N_STREAMS, EPS, 20, 1e-6 if v4 else 0.0, v4)


def kernel_coefficients(x, phi, bias, v4: bool):
    return mp.mhc_coefficients(x, phi, bias, *A, norm_eps=EPS, iters=20, eps=spec(v4).eps, v4=v4)


@pytest.mark.parametrize("v4", [False, True], ids=["paper", "deepseek_v4"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_coefficients_match_float64_equations_and_xla(v4, dtype):
    x, phi, bias = inputs(dtype)
    got = jax.jit(kernel_coefficients, static_argnums=3)(x, phi, bias, v4)
    for g in got:
        assert g.dtype == jnp.float32  # coefficient math in float32 whatever the stream dtype
    chex.assert_trees_all_close([np.asarray(g, np.float64) for g in got], list(ref_coefficients(x, phi, bias, v4)),
                                atol=2e-6, rtol=0)
    chex.assert_trees_all_close(got, xla_coefficients(x, phi, bias, *A, spec(v4)), atol=1e-6, rtol=0)
    h_res = np.asarray(got[2], np.float64)
    np.testing.assert_allclose(h_res.sum(-2 if v4 else -1), 1.0, atol=1e-5)  # the last Sinkhorn step's lines


@pytest.mark.parametrize("tiling", [mp.Tiling(8, 32, 8, 16, loop=True), mp.Tiling(128, 64, 8, 16, lanes=True)],
                         ids=["gpu_loop", "tpu_lanes"])
def test_every_platform_tiling_gives_the_same_coefficients(tiling):
    """The GPU (fori_loop over chunks) and TPU (tokens on lanes) code paths, run in interpret mode."""
    x, phi, bias = inputs(jnp.bfloat16)
    scale, b = mp._scale_bias(N_STREAMS, bias, *A)
    h = mp.coefficients_call(tiling, True, "cpu", x.reshape(-1, N_STREAMS * C), phi, scale, b, spec=spec(False))
    want = xla_coefficients(x, phi, bias, *A, spec(False))
    k = N_STREAMS * N_STREAMS + 2 * N_STREAMS
    flat = jnp.concatenate([want[0], want[1], want[2].reshape(*want[2].shape[:-2], -1)], -1).reshape(-1, k)
    chex.assert_trees_all_close(h[:, :k], flat, atol=1e-6, rtol=0)


@pytest.mark.parametrize("v4", [False, True], ids=["paper", "deepseek_v4"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_coefficient_gradients_equal_the_xla_gradients(v4, dtype):
    """The custom VJP (gates and Sinkhorn recomputed from the saved projection in the backward kernel,
    every iteration differentiated; the projection's backward by formula, as bfloat16 parts on bfloat16
    streams) against autodiff of the XLA computation."""
    x, phi, bias = inputs(dtype)
    rng = np.random.default_rng(5)
    w = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 9, 4), (2, 9, 4), (2, 9, 4, 4))]

    def loss(fn):
        def f(x_, phi_, b_, a0, a1, a2):
            return sum(jnp.sum(wi * jnp.sin(o)) for wi, o in zip(w, fn(x_, phi_, b_, a0, a1, a2)))
        return jax.jit(jax.grad(f, argnums=tuple(range(6))))(x, phi, bias, *map(jnp.float32, A))

    got = loss(lambda *a: mp.mhc_coefficients(*a, norm_eps=EPS, iters=20, eps=spec(v4).eps, v4=v4))
    want = loss(lambda *a: xla_coefficients(*a, spec(v4)))
    for name, g, r in zip(("x", "phi", "bias", "a_pre", "a_post", "a_res"), got, want):
        assert g.dtype == r.dtype, name
        scale = float(jnp.max(jnp.abs(r)))
        # dx is stored in the stream dtype: one bfloat16 rounding (2^-8 relative) apart at most
        tol = 2 ** -8 if name == "x" and dtype == jnp.bfloat16 else 2e-5
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), atol=tol * scale,
                                   rtol=tol, err_msg=name)


@pytest.mark.parametrize("tiling", [mp.Tiling(8, 32, 8, 16, loop=True), mp.Tiling(128, 64, 8, 16, lanes=True)],
                         ids=["gpu_loop", "tpu_lanes"])
@pytest.mark.parametrize("v4", [False, True], ids=["paper", "deepseek_v4"])
def test_every_platform_tiling_gives_the_same_gates_backward(tiling, v4):
    """The backward kernel's dz (cotangent of z = a * c + b) on the GPU and TPU layouts, in interpret
    mode, against autodiff of the XLA gates and Sinkhorn loop (xla_gates)."""
    x, phi, bias = inputs()
    spec_ = spec(v4)
    c = rms_projection(x, phi, EPS).reshape(-1, 24)
    scale, b = mp._scale_bias(N_STREAMS, bias, *A)
    rng = np.random.default_rng(7)
    g = tuple(jnp.asarray(rng.standard_normal((c.shape[0], *s)), jnp.float32) for s in ((4,), (4,), (4, 4)))
    _, vjp = jax.vjp(lambda z: xla_gates(z, jnp.zeros(24), 1.0, 1.0, 1.0, spec_), c * scale + b)
    want = vjp(g)[0]
    K = mp.coefficient_width(N_STREAMS)
    pad = lambda a: jnp.pad(a, ((0, 0), (0, K - 24)))
    zg = jnp.concatenate([pad(c * scale + b), pad(jnp.concatenate([g[0], g[1], g[2].reshape(-1, 16)], 1))], 1)
    got = mp.gates_bwd_call(tiling, True, "cpu", zg, spec=spec_)
    chex.assert_shape(got, (c.shape[0], K))
    chex.assert_trees_all_close(got[:, :24], want, atol=1e-6 * float(jnp.max(jnp.abs(want))), rtol=0)
    chex.assert_trees_all_close(got[:, 24:], jnp.zeros_like(got[:, 24:]))


def ref_mix(x, y, h_pre, h_post, h_res, transposed):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    h_pre, h_post, h_res = (np.asarray(h, np.float64) for h in (h_pre, h_post, h_res))
    acting = np.swapaxes(h_res, -1, -2) if transposed else h_res
    return (np.einsum("...n,...nc->...c", h_pre, x),
            np.einsum("...ij,...jc->...ic", acting, x) + h_post[..., :, None] * y[..., None, :])


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_mixing_matches_float64_and_xla_values_and_gradients(transposed, dtype):
    x, phi, bias = inputs(dtype)
    h_pre, h_post, h_res = xla_coefficients(x, phi, bias, *A, spec(False))
    y = jnp.asarray(np.random.default_rng(2).standard_normal((2, 9, C)), jnp.float32).astype(dtype)
    got = (mp.pre_mix_pallas(x, h_pre), mp.res_post_mix_pallas(x, y, h_post, h_res, transposed))
    assert got[0].dtype == got[1].dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: the result's own rounding (2^-8 of ~4)
    chex.assert_trees_all_close([np.asarray(g, np.float64) for g in got],
                                list(ref_mix(x, y, h_pre, h_post, h_res, transposed)), atol=tol, rtol=0)
    chex.assert_trees_all_close(got, (pre_mix(x, h_pre), res_post_mix(x, y, h_post, h_res, transposed)),
                                atol=tol, rtol=0)
    if dtype == jnp.bfloat16:
        return
    w = jnp.asarray(np.random.default_rng(3).standard_normal(x.shape), jnp.float32)

    def grads(pre, post):
        f = lambda x_, y_, a, b, c: jnp.sum(w * post(x_, jnp.tanh(pre(x_, a)) + y_, b, c, transposed))
        return jax.jit(jax.grad(f, argnums=tuple(range(5))))(x, y, h_pre, h_post, h_res)

    chex.assert_trees_all_close(grads(mp.pre_mix_pallas, mp.res_post_mix_pallas), grads(pre_mix, res_post_mix),
                                atol=2e-5, rtol=2e-5)


# (the paper variant with selective recomputation: tests/test_sinkhorn_pallas.py)
@pytest.mark.parametrize("residual", [
    {"recompute": False, "use_res": False, "use_post": False}, {"variant": "deepseek_v4"},
    {"use_pre": False, "sinkhorn_iters": 3, "sinkhorn_eps": 1e-3},
], ids=["no_recompute_ablate_res_post", "deepseek_v4", "ablate_pre_iters3_eps"])
def test_mhc_connection_with_kernels_equals_xla_values_and_gradients(residual):
    def run(impl):
        cfg = Config().replace(model={"d_model": C, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 32},
                               residual={"kind": "mhc", "impl": impl, **residual})
        conn = randomize(connection(cfg, 0))
        graphdef, params = nnx.split(conn, nnx.Param)
        x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 4, C)).astype(np.float32))
        f = lambda p, x_: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x_, jnp.tanh)))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)
    chex.assert_trees_all_close(run("pallas"), run("xla"), atol=3e-5, rtol=3e-5)


def test_config_rejects_what_the_kernels_cannot_run():
    base = {"model": {"d_model": 1000, "n_heads": 1, "n_kv_heads": 1}}
    with pytest.raises(ConfigError, match="model.d_model=1000"):
        Config().replace(**base, residual={"kind": "mhc", "impl": "pallas"})
    Config().replace(**base, residual={"kind": "plain", "impl": "pallas"})  # no connection kernels: allowed
    with pytest.raises(ConfigError, match="sinkhorn_log_domain"):
        Config().replace(residual={"kind": "mhc", "impl": "pallas", "sinkhorn_log_domain": True})


def test_kernels_compile_for_tpu_v4_megacore_forward_and_backward():
    pytest.importorskip("libtpu", reason="TPU AOT needs libtpu (the [tpu] extra)")
    from jax.experimental import topologies
    topo = topologies.get_topology_desc("v4:2x2x1", "tpu", chip_config_name="megacore")
    sharding = jax.sharding.SingleDeviceSharding(topo.devices[0])
    n, d = N_STREAMS, 256
    x = jax.ShapeDtypeStruct((4, 256, n, d), jnp.bfloat16, sharding=sharding)
    phi = jax.ShapeDtypeStruct((n * d, n * n + 2 * n), jnp.float32, sharding=sharding)
    bias = jax.ShapeDtypeStruct((n * n + 2 * n,), jnp.float32, sharding=sharding)

    def loss(x_, phi_, b_):
        h_pre, h_post, h_res = mp.mhc_coefficients(x_, phi_, b_, *A, norm_eps=EPS, iters=20, eps=0.0, v4=False)
        out = mp.res_post_mix_pallas(x_, mp.pre_mix_pallas(x_, h_pre), h_post, h_res)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, phi, bias).compile().as_text()
    # coefficients, pre and res/post forward, pre and res/post backward: five Mosaic kernels
    assert text.count("tpu_custom_call") >= 5, "the Mosaic kernels are not in the TPU program"


def _mesh_loss(x_, phi_, b_):
    h_pre, h_post, h_res = mp.mhc_coefficients(x_, phi_, b_, *A, norm_eps=EPS, iters=20, eps=0.0, v4=False)
    out = mp.res_post_mix_pallas(x_, mp.pre_mix_pallas(x_, h_pre), h_post, h_res)
    return jnp.sum(jnp.sin(out.astype(jnp.float32)))


def test_batch_sharded_kernels_run_per_shard_and_equal_the_unsharded_call():
    """Under a mesh splitting the batch, each device's kernels take its own tokens (shard_map): same
    values and gradients as one unsharded call (8 fake CPU devices, data = 4)."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec
    x, phi, bias = inputs(shape=(4, 3))
    want = jax.jit(jax.value_and_grad(_mesh_loss, argnums=(0, 1, 2)))(x, phi, bias)
    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
        f = jax.jit(jax.value_and_grad(_mesh_loss, argnums=(0, 1, 2)))
        assert "shard_map" in str(f.trace(xs, phi, bias).jaxpr)
        got = f(xs, phi, bias)
    chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.multidevice
def test_model_loss_and_grads_with_kernels_on_sharded_meshes_equal_single_device():
    """The whole model with residual.impl=pallas (scanned blocks, selective recomputation) on (data, fsdp,
    tensor) meshes of 8 CPU devices against one device (tests/test_sharding.py's check)."""
    from test_sharding import check_sharded_loss_and_grads, make_cfg
    cfg = make_cfg("mhc").replace(model={"scan_layers": True}, residual={"impl": "pallas"})
    check_sharded_loss_and_grads(cfg, [(2, 2, 2)])


@pytest.mark.parametrize("kind", ["hc", "mhc_lite"])
def test_hc_and_mhc_lite_mix_with_the_kernels_like_xla(kind):
    def run(impl):
        cfg = Config().replace(model={"d_model": C, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 32},
                               residual={"kind": kind, "impl": impl})
        graphdef, params = nnx.split(randomize(connection(cfg, 1)), nnx.Param)
        x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, 4, C)).astype(np.float32))
        f = lambda p, x_: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x_, jnp.tanh)))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)
    chex.assert_trees_all_close(run("pallas"), run("xla"), atol=3e-5, rtol=3e-5)


def test_batch_sharded_kernels_compile_for_tpu_v4_megacore_without_gathering_the_streams():
    pytest.importorskip("libtpu", reason="TPU AOT needs libtpu (the [tpu] extra)")
    from jax.experimental import topologies
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
    topo = topologies.get_topology_desc("v4:2x2x1", "tpu", chip_config_name="megacore")
    mesh = Mesh(np.array(topo.devices), ("data",), axis_types=(AxisType.Auto,))
    n, d = N_STREAMS, 256
    x = jax.ShapeDtypeStruct((8, 256, n, d), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("data")))
    rep = NamedSharding(mesh, PartitionSpec())
    phi = jax.ShapeDtypeStruct((n * d, n * n + 2 * n), jnp.float32, sharding=rep)
    bias = jax.ShapeDtypeStruct((n * n + 2 * n,), jnp.float32, sharding=rep)
    with jax.set_mesh(mesh):
        text = jax.jit(jax.grad(_mesh_loss, argnums=(0, 1, 2))).lower(x, phi, bias).compile().as_text()
    assert text.count("tpu_custom_call") >= 5
    assert "all-gather" not in text  # each chip's kernels read only its own quarter of the streams


def test_bf16_parts_sum_exactly_to_float32_even_where_converts_would_be_simplified():
    """phi and float32 streams enter the bfloat16 matmuls as hi + mid + lo; the sum is exact (checked in
    float64), and the parts come from bit operations, not a float32 -> bfloat16 -> float32 round trip
    that XLA on GPU may remove."""
    v = jnp.asarray(np.random.default_rng(9).standard_normal(4096) * 10.0 ** np.arange(-3, 5).repeat(512),
                    jnp.float32)
    parts = jax.jit(mp.bf16_parts)(v)
    assert all(p.dtype == jnp.bfloat16 for p in parts)
    total = sum(np.asarray(p, np.float64) for p in parts)
    np.testing.assert_array_equal(total, np.asarray(v, np.float64))
    assert float(jnp.max(jnp.abs(parts[1].astype(jnp.float32)))) > 0  # the lower parts are not dropped
