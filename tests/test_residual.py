"""HC, mHC and mHC-lite connections against float64 numpy reimplementations of their equations."""

from __future__ import annotations

import itertools
import typing

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax.config import Config, ResidualConfig
from mhc_jax.model import Transformer, count_params, expected_param_count
from mhc_jax.residual import RESIDUAL_KINDS
from mhc_jax.residual.collapse import LearnedCollapse, collapse_param_count
from mhc_jax.residual.hc import HyperConnection, hc_param_count
from mhc_jax.residual.mhc import ManifoldHyperConnection, mhc_param_count
from mhc_jax.residual.mhc_lite import MHCLite, mhc_lite_param_count

from references import build, connection, randomize, ref_sinkhorn, ref_v4_comb

C = 16
NORM_EPS = 1e-6


def make_cfg(kind: str = "mhc", n: int = 4, **residual) -> Config:
    return Config().replace(
        model={"d_model": C, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 32, "max_seq_len": 32,
               "norm_eps": NORM_EPS, "scan_layers": False},  # per-block layout (test_scan: scanned == unrolled)
        residual={"kind": kind, "n_streams": n, **residual}, data={"seq_len": 16, "batch_size": 2})


def streams(n: int = 4, shape=(2, 3), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((*shape, n, C)).astype(np.float32)


W_BRANCH = np.random.default_rng(42).standard_normal((C, C)).astype(np.float32) / np.sqrt(C)


def branch_jax(h_BTC: jax.Array) -> jax.Array:
    return jnp.tanh(h_BTC @ jnp.asarray(W_BRANCH))


def branch_np(h: np.ndarray) -> np.ndarray:
    return np.tanh(h @ W_BRANCH.astype(np.float64))


def P(var) -> np.ndarray:
    return np.asarray(var[...], np.float64)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def ref_mhc_projections(conn: ManifoldHyperConnection, x: np.ndarray):
    """Eq. 7: RMSNorm over the flattened nC vector, one projection, slices [pre | post | res]."""
    n = x.shape[-2]
    v = x.astype(np.float64).reshape(*x.shape[:-2], -1)
    v = v / np.sqrt(np.mean(v * v, -1, keepdims=True) + NORM_EPS)
    c = v @ P(conn.phi)
    b = P(conn.bias)
    pre = P(conn.alpha_pre) * c[..., :n] + b[:n]
    post = P(conn.alpha_post) * c[..., n:2 * n] + b[n:2 * n]
    res = P(conn.alpha_res) * c[..., 2 * n:] + b[2 * n:]
    return pre, post, res


def ref_mhc_mappings(conn: ManifoldHyperConnection, x: np.ndarray, iters: int = 20):
    """Eq. 8-9: sigmoid, 2 * sigmoid, Sinkhorn of mat(res) (row-major)."""
    n = x.shape[-2]
    pre, post, res = ref_mhc_projections(conn, x)
    return sigmoid(pre), 2.0 * sigmoid(post), ref_sinkhorn(res.reshape(*res.shape[:-1], n, n), iters)


def ref_connection_output(x, h_pre, h_post, h_res, transposed=False):
    """x_{l+1} = H_res x + H_post^T F(H_pre x); transposed: new_j = sum_i H_res[i, j] x_i."""
    x = x.astype(np.float64)
    y = branch_np(np.einsum("...n,...nc->...c", h_pre, x))
    mix = np.einsum("...ji,...jc->...ic" if transposed else "...ij,...jc->...ic", h_res, x)
    return mix + h_post[..., :, None] * y[..., None, :]


def close(a, b, atol=1e-5):
    chex.assert_trees_all_close(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=atol, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- mHC


@pytest.mark.parametrize("n", [1, 2, 4])
def test_mhc_mappings_match_float64_equations_7_to_9(n):
    conn = randomize(build(ManifoldHyperConnection, make_cfg("mhc", n), 0))
    x = streams(n)
    h_pre, h_post, h_res = conn.mappings(jnp.asarray(x))
    chex.assert_shape((h_pre, h_post, h_res), [(2, 3, n), (2, 3, n), (2, 3, n, n)])
    for got, want in zip((h_pre, h_post, h_res), ref_mhc_mappings(conn, x)):
        assert got.dtype == jnp.float32
        close(got, want)


def test_mhc_output_applies_all_three_mappings_in_paper_orientation():
    conn = randomize(build(ManifoldHyperConnection, make_cfg("mhc"), 0), scale=1.0)
    x = streams()
    out = conn(jnp.asarray(x), branch_jax)
    close(out, ref_connection_output(x, *ref_mhc_mappings(conn, x)))
    # The same matrices applied transposed give a different result, so the orientation is pinned.
    assert np.abs(ref_connection_output(x, *ref_mhc_mappings(conn, x), transposed=True)
                  - np.asarray(out)).max() > 1e-2


def test_changing_h_res_changes_the_output():
    conn = randomize(build(ManifoldHyperConnection, make_cfg("mhc"), 0))
    x = jnp.asarray(streams())
    before = conn(x, branch_jax)
    b = conn.bias[...]
    conn.bias[...] = b.at[8:].add(jnp.asarray(np.random.default_rng(3).standard_normal(16), b.dtype))
    after = conn(x, branch_jax)
    assert float(jnp.max(jnp.abs(after - before))) > 1e-2


def test_h_post_carries_factor_two_and_h_pre_is_a_plain_sigmoid():
    conn = build(ManifoldHyperConnection, make_cfg("mhc"), 0)
    conn.phi[...] = jnp.zeros_like(conn.phi[...])  # projection off: only the bias b = 0 remains
    h_pre, h_post, h_res = conn.mappings(jnp.asarray(streams()))
    close(h_pre, np.full((2, 3, 4), 0.5), atol=0)
    close(h_post, np.full((2, 3, 4), 1.0), atol=0)  # 2 * sigmoid(0)
    close(h_res, np.full((2, 3, 4, 4), 0.25), atol=1e-7)


@pytest.mark.parametrize("slice_name,start,stop", [("pre", 0, 4), ("post", 4, 8), ("res", 8, 24)])
def test_fused_projection_slices_are_pre_post_res_in_order(slice_name, start, stop):
    conn = randomize(build(ManifoldHyperConnection, make_cfg("mhc"), 0))
    x = jnp.asarray(streams())
    before = conn.mappings(x)
    # Random, not a constant or a ramp: Sinkhorn is invariant to adding row and column offsets.
    bump = np.random.default_rng(5).standard_normal(stop - start).astype(np.float32)
    conn.bias[...] = conn.bias[...].at[start:stop].add(jnp.asarray(bump))
    after = conn.mappings(x)
    changed = [float(jnp.max(jnp.abs(a - b))) > 1e-4 for a, b in zip(after, before)]
    assert changed == [name == slice_name for name in ("pre", "post", "res")], changed


@pytest.mark.parametrize("alpha_init", [0.01, 0.3])
def test_mhc_init_is_what_the_config_says(alpha_init):
    n = 4
    conn = build(ManifoldHyperConnection, make_cfg("mhc", n, alpha_init=alpha_init), 0)
    for a in (conn.alpha_pre, conn.alpha_post, conn.alpha_res):
        assert a[...] == np.float32(alpha_init)
    np.testing.assert_array_equal(P(conn.bias), 0.0)
    chex.assert_shape(conn.phi[...], (n * C, n * n + 2 * n))
    # Fan-in normal (std 1/sqrt(nC), truncated at 2 std) so RMSNorm(v) phi has unit-scale entries.
    assert 0.6 / np.sqrt(n * C) < float(np.std(P(conn.phi))) < 1.2 / np.sqrt(n * C)


def test_mhc_coefficients_are_float32_for_bfloat16_streams():
    conn = randomize(build(ManifoldHyperConnection, make_cfg("mhc"), 0))
    x = jnp.asarray(streams()).astype(jnp.bfloat16)
    h_pre, h_post, h_res = conn.mappings(x)
    assert {h.dtype for h in (h_pre, h_post, h_res)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(np.asarray(h_res.sum(-1), np.float64), 1.0, atol=1e-6)
    want = ref_mhc_mappings(conn, np.asarray(x.astype(jnp.float32)))
    for got, ref in zip((h_pre, h_post, h_res), want):
        close(got, ref)
    assert conn(x, branch_jax).dtype == jnp.bfloat16


def test_log_domain_mhc_equals_standard():
    x = jnp.asarray(streams())
    std = randomize(build(ManifoldHyperConnection, make_cfg("mhc"), 0))
    log = randomize(build(ManifoldHyperConnection, make_cfg("mhc", sinkhorn_log_domain=True), 0))
    for a, b in zip(std.mappings(x), log.mappings(x)):
        close(a, b, atol=2e-6)


def test_deepseek_v4_variant_matches_its_numpy_reference():
    conn = randomize(build(ManifoldHyperConnection, make_cfg("mhc", variant="deepseek_v4"), 0))
    x = streams()
    pre, post, res = ref_mhc_projections(conn, x)
    comb = ref_v4_comb(res.reshape(2, 3, 4, 4), 20, 1e-6)
    h_pre, h_post, h_res = conn.mappings(jnp.asarray(x))
    close(h_pre, sigmoid(pre) + 1e-6)
    close(h_post, 2.0 * sigmoid(post))
    close(h_res, comb)
    np.testing.assert_allclose(np.asarray(h_res.sum(-2), np.float64), 1.0, atol=1e-5)  # V4 columns
    # V4 mixes transposed: new_j = sum_i comb[i, j] x_i.
    close(conn(jnp.asarray(x), branch_jax),
          ref_connection_output(x, sigmoid(pre) + 1e-6, 2.0 * sigmoid(post), comb, transposed=True))


# ---------------------------------------------------------------------------------------------- ablation


@pytest.mark.parametrize("kind", ["hc", "mhc", "mhc_lite"])
def test_ablation_switches_give_one_over_n_ones_identity(kind):
    n = 4
    cfg = make_cfg(kind, n, use_pre=False, use_post=False, use_res=False)
    conn = randomize(connection(cfg, 1))
    x = streams(n)
    h_pre, h_post, h_res = conn.mappings(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(h_pre), np.full((2, 3, n), 1.0 / n, np.float32))
    np.testing.assert_array_equal(np.asarray(h_post), np.ones((2, 3, n), np.float32))
    np.testing.assert_array_equal(np.asarray(h_res), np.broadcast_to(np.eye(n, dtype=np.float32), (2, 3, n, n)))
    close(conn(jnp.asarray(x), branch_jax),
          ref_connection_output(x, np.full((2, 3, n), 1.0 / n), np.ones((2, 3, n)), np.eye(n)))


def test_single_ablation_switch_leaves_the_other_mappings_alone():
    x = jnp.asarray(streams())
    full = randomize(build(ManifoldHyperConnection, make_cfg("mhc"), 0))
    no_res = randomize(build(ManifoldHyperConnection, make_cfg("mhc", use_res=False), 0))
    (a_pre, a_post, _), (b_pre, b_post, b_res) = full.mappings(x), no_res.mappings(x)
    close(a_pre, b_pre, atol=0)
    close(a_post, b_post, atol=0)
    np.testing.assert_array_equal(np.asarray(b_res), np.broadcast_to(np.eye(4), (2, 3, 4, 4)))


# ---------------------------------------------------------------------------------------------- mHC-lite


def test_mhc_lite_is_exactly_doubly_stochastic_without_iteration():
    conn = randomize(build(MHCLite, make_cfg("mhc_lite"), 0), scale=3.0)
    _, _, h_res = conn.mappings(jnp.asarray(streams(shape=(4, 8))))
    h = np.asarray(h_res, np.float64)
    np.testing.assert_allclose(h.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(h.sum(-2), 1.0, atol=1e-6)
    assert h.min() >= 0.0


def test_mhc_lite_matches_permutation_mixture_reference():
    n = 3
    conn = randomize(build(MHCLite, make_cfg("mhc_lite", n), 0))
    x = streams(n)
    pre, post, res = ref_mhc_projections(conn, x)
    perms = np.stack([np.eye(n)[list(p)] for p in itertools.permutations(range(n))])  # 3! = 6
    w = np.exp(res - res.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    h_pre, h_post, h_res = conn.mappings(jnp.asarray(x))
    close(h_pre, sigmoid(pre))
    close(h_post, 2 * sigmoid(post))
    close(h_res, np.einsum("...k,kij->...ij", w, perms))


# ---------------------------------------------------------------------------------------------- HC


def test_hc_init_is_one_hot_pre_ones_post_identity_res():
    n = 4
    for k in range(6):
        conn = build(HyperConnection, make_cfg("hc", n), k)
        h_pre, h_post, h_res = conn.mappings(jnp.asarray(streams(n)))
        np.testing.assert_array_equal(np.asarray(h_pre), np.broadcast_to(np.eye(n)[k % n], (2, 3, n)))
        np.testing.assert_array_equal(np.asarray(h_post), 1.0)
        np.testing.assert_array_equal(np.asarray(h_res), np.broadcast_to(np.eye(n), (2, 3, n, n)))


@pytest.mark.parametrize("dynamic", [True, False])
def test_hc_output_matches_float64_reference(dynamic):
    n = 4
    conn = randomize(build(HyperConnection, make_cfg("hc", n, hc_dynamic=dynamic), 2))
    x = streams(n).astype(np.float64)
    alpha = np.broadcast_to(P(conn.static_alpha), (2, 3, n, n + 1))
    beta = np.broadcast_to(P(conn.static_beta), (2, 3, n))
    if dynamic:
        h = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + NORM_EPS) * P(conn.norm.scale)
        alpha = alpha + P(conn.s_alpha) * np.tanh(h @ P(conn.w_alpha))
        beta = beta + P(conn.s_beta) * np.tanh(h @ P(conn.w_beta))
    # HC paper: H' = B^T F(H^T A_m)^T + A_r^T H
    y = branch_np(np.einsum("...jc,...j->...c", x, alpha[..., 0]))
    want = beta[..., :, None] * y[..., None, :] + np.einsum("...ji,...jc->...ic", alpha[..., 1:], x)
    close(conn(jnp.asarray(x, jnp.float32), branch_jax), want)
    h_pre, h_post, h_res = conn.mappings(jnp.asarray(x, jnp.float32))
    close(h_res, np.swapaxes(alpha[..., 1:], -1, -2))
    close(h_pre, alpha[..., 0])
    close(h_post, beta)


def test_hc_at_init_reproduces_the_pre_norm_residual_network():
    # A vanishing final-norm eps: the n summed streams are n x the plain stream, which RMSNorm removes
    # exactly only when eps is negligible next to the activations' mean square.
    over = {"norm_eps": 1e-12}
    plain_cfg = make_cfg("plain").replace(model=over)
    plain = Transformer(plain_cfg, rngs=nnx.Rngs(0))
    for n in (2, 4):
        hc = Transformer(make_cfg("hc", n).replace(model=over), rngs=nnx.Rngs(1))
        hc.embed_VC[...] = plain.embed_VC[...]
        nnx.update(hc.final_norm, nnx.state(plain.final_norm))
        for bh, bp in zip(hc.blocks, plain.blocks):
            for name in ("attn_norm", "attn", "mlp_norm", "mlp"):
                nnx.update(getattr(bh, name), nnx.state(getattr(bp, name)))
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 16)), jnp.int32)
        want = plain(tokens)
        got = hc(tokens)
        chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
        # A different init really changes the network (the test is not vacuous).
        randomize(hc.blocks[0].attn_res, scale=0.3)
        assert float(jnp.max(jnp.abs(hc(tokens) - want))) > 1e-3


# ---------------------------------------------------------------------------------------------- collapse


def test_learned_collapse_matches_reference():
    n = 4
    head = randomize(build(LearnedCollapse, make_cfg("mhc", n, collapse="learned")))
    x = streams(n)
    v = x.astype(np.float64).reshape(2, 3, -1)
    v = v / np.sqrt(np.mean(v * v, -1, keepdims=True) + NORM_EPS)
    w = sigmoid(P(head.scale) * (v @ P(head.fn)) + P(head.base)) + 1e-6
    close(head(jnp.asarray(x)), np.einsum("...n,...nc->...c", w, x.astype(np.float64)))


# ---------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("kind,extra", [
    ("hc", {}), ("hc", {"hc_dynamic": False}), ("mhc", {}), ("mhc", {"n_streams": 1}),
    ("mhc", {"variant": "deepseek_v4", "collapse": "learned"}), ("mhc_lite", {}),
    ("mhc_lite", {"n_streams": 3, "collapse": "learned"})])
def test_model_builds_runs_and_param_count_equals_expected(kind, extra):
    cfg = make_cfg(kind, **extra)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert count_params(model) == expected_param_count(cfg)
    logits = model(jnp.ones((2, 8), jnp.int32))
    chex.assert_shape(logits, (2, 8, cfg.model.padded_vocab_size))
    chex.assert_tree_all_finite(logits)


def test_param_count_formulas_match_the_modules():
    def count(m):
        return sum(int(np.size(v)) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
    for n in (1, 2, 4):
        cfg = make_cfg("mhc", n)
        assert count(build(ManifoldHyperConnection, cfg, 0)) == mhc_param_count(cfg.residual, C) \
            == n * C * (n * n + 2 * n) + n * n + 2 * n + 3
        assert count(build(MHCLite, cfg, 0)) == mhc_lite_param_count(cfg.residual, C)
        assert count(build(HyperConnection, cfg, 0)) == hc_param_count(cfg.residual, C)
        assert count(build(LearnedCollapse, cfg)) == collapse_param_count(cfg.residual, C)


def test_registry_covers_every_configurable_kind_and_its_param_count_matches_the_module():
    def count(m):
        return sum(int(np.size(v)) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert tuple(RESIDUAL_KINDS) == typing.get_args(typing.get_type_hints(ResidualConfig)["kind"])
    for name, kind in RESIDUAL_KINDS.items():
        cfg = make_cfg(name)
        conn = connection(cfg, 0)
        assert type(conn) is kind.connection
        assert count(conn) == kind.param_count(cfg.residual, C)
        assert kind.flops(cfg.residual, C) >= 0.0


def test_mhc_gradients_reach_every_parameter():
    cfg = make_cfg("mhc")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 8)), jnp.int32)
    grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(tokens) ** 2)))(model)
    conn_grads = nnx.state(grads)["blocks"][0]["attn_res"]
    for path, g in jax.tree_util.tree_leaves_with_path(conn_grads):
        assert float(jnp.max(jnp.abs(g))) > 0, path


# ---------------------------------------------------------------------------------------------- fused mHC


def ref_mhc_loss_jnp(x, phi, bias, a_pre, a_post, a_res, w_out):
    """Eq. 7-9 and the connection output written with jax.numpy from the equations (RMSNorm of vec(x)
    materialised, then the projection), for float64 gradients under jax.enable_x64."""
    n = x.shape[-2]
    v = x.reshape(*x.shape[:-2], -1)
    v = v / jnp.sqrt(jnp.mean(v * v, -1, keepdims=True) + NORM_EPS)
    c = v @ phi
    h_pre = jax.nn.sigmoid(a_pre * c[..., :n] + bias[:n])
    h_post = 2.0 * jax.nn.sigmoid(a_post * c[..., n:2 * n] + bias[n:2 * n])
    logits = (a_res * c[..., 2 * n:] + bias[2 * n:]).reshape(*c.shape[:-1], n, n)
    h_res = ref_sinkhorn(logits, 20, xp=jnp)
    y = jnp.tanh(jnp.einsum("...n,...nc->...c", h_pre, x) @ jnp.asarray(W_BRANCH, x.dtype))
    out = jnp.einsum("...ij,...jc->...ic", h_res, x) + h_post[..., :, None] * y[..., None, :]
    return jnp.sum(w_out * out)


@pytest.mark.parametrize("recompute", [True, False])
def test_fused_mhc_gradients_match_float64_reference(recompute):
    conn = randomize(connection(make_cfg("mhc", recompute=recompute), 0))
    x = streams()
    w_out = np.random.default_rng(7).standard_normal(x.shape)
    names = ("phi", "bias", "alpha_pre", "alpha_post", "alpha_res")
    with jax.enable_x64(True):
        args = [jnp.asarray(x, jnp.float64)] + [jnp.asarray(P(getattr(conn, k))) for k in names]
        want = jax.grad(ref_mhc_loss_jnp, argnums=tuple(range(6)))(*args, jnp.asarray(w_out))
        want = [np.asarray(g) for g in want]

    graphdef, params = nnx.split(conn, nnx.Param)

    def loss(p, x_):
        return jnp.sum(jnp.asarray(w_out, jnp.float32) * nnx.merge(graphdef, p)(x_, branch_jax))

    g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.asarray(x))
    got = [g_x] + [g_params[k][...] for k in names]
    for name, g, r in zip(("x",) + names, got, want):
        scale = max(float(np.max(np.abs(r))), 1e-3)
        np.testing.assert_allclose(np.asarray(g, np.float64), r, atol=2e-5 * scale, rtol=1e-4, err_msg=name)


def test_fused_projection_equals_normalise_then_project():
    from mhc_jax.residual.mhc import rms_projection
    x = streams()
    phi = np.random.default_rng(1).standard_normal((4 * C, 24)).astype(np.float32)
    v = x.astype(np.float64).reshape(2, 3, -1)
    want = v / np.sqrt(np.mean(v * v, -1, keepdims=True) + NORM_EPS) @ phi.astype(np.float64)
    close(rms_projection(jnp.asarray(x), jnp.asarray(phi), NORM_EPS), want)
    got16 = rms_projection(jnp.asarray(x).astype(jnp.bfloat16), jnp.asarray(phi), NORM_EPS)
    assert got16.dtype == jnp.float32  # coefficient math stays float32 for bfloat16 streams


@pytest.mark.parametrize("kind", ["hc", "mhc", "mhc_lite"])
def test_recompute_changes_neither_values_nor_gradients(kind):
    x = jnp.asarray(streams())
    outs = []
    for recompute in (True, False):
        conn = randomize(connection(make_cfg(kind, recompute=recompute), 1))
        graphdef, params = nnx.split(conn, nnx.Param)
        f = lambda p, x_: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x_, branch_jax)))
        outs.append(jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x))
    chex.assert_trees_all_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def block_saved_bytes_per_token(kind: str, recompute: bool, d: int = 64, seq: int = 32) -> float:
    from mhc_jax.model.memory import block_activation_bytes_per_token
    return block_activation_bytes_per_token(Config().replace(
        model={"d_model": d, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 4 * d, "max_seq_len": seq},
        residual={"kind": kind, "n_streams": 4, "recompute": recompute}, data={"seq_len": seq}))


def test_selective_recomputation_keeps_mhc_block_activations_within_1_3x_plain():
    plain = block_saved_bytes_per_token("plain", True)
    with_recompute = block_saved_bytes_per_token("mhc", True)
    without = block_saved_bytes_per_token("mhc", False)
    assert with_recompute <= 1.3 * plain, (with_recompute, plain)
    assert without > 1.5 * plain, (without, plain)  # what recomputation removes (the check is not vacuous)


@pytest.mark.parametrize("transposed", [False, True], ids=["paper", "transposed"])
def test_res_post_mix_gradients_equal_the_float64_closed_form(transposed):
    # res_post_mix has a hand-written backward (base._res_post_mix_bwd); for L = sum(w * out) with
    # out_i = sum_j A_ij x_j + h_post_i y (A = h_res, or h_res^T when transposed) the gradients are
    # dx = A^T w, dA = w x^T, dh_post_i = <w_i, y>, dy = sum_i h_post_i w_i.
    from mhc_jax.residual.base import res_post_mix
    rng = np.random.default_rng(0)
    B, T, n, C = 2, 3, 4, 5
    x, w = rng.standard_normal((2, B, T, n, C))
    y, h_post, h_res = rng.standard_normal((B, T, C)), rng.uniform(0, 2, (B, T, n)), rng.uniform(0, 1, (B, T, n, n))
    a = np.swapaxes(h_res, -1, -2) if transposed else h_res
    f = lambda *args: jnp.sum(jnp.asarray(w, jnp.float32) * res_post_mix(*args, transposed))
    got = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(*(jnp.asarray(v, jnp.float32) for v in (x, y, h_post, h_res)))
    da = np.einsum("btic,btjc->btij", w, x)
    want = (np.einsum("btij,btic->btjc", a, w), np.einsum("bti,btic->btc", h_post, w),
            np.einsum("btic,btc->bti", w, y), np.swapaxes(da, -1, -2) if transposed else da)
    chex.assert_trees_all_close(tuple(np.asarray(g, np.float64) for g in got), want, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(np.asarray(f(*(jnp.asarray(v, jnp.float32) for v in (x, y, h_post, h_res)))),
                                np.sum(w * (np.einsum("btij,btjc->btic", a, x) + h_post[..., None] * y[:, :, None])),
                                rtol=1e-5)


def test_swiglu_of_the_stacked_pair_matches_float64_values_and_gradients():
    # layers.swiglu has a hand-written backward writing both halves as one stacked gradient.
    from mhc_jax.layers import swiglu
    rng = np.random.default_rng(1)
    gu, w = rng.standard_normal((2, 3, 2, 7)), rng.standard_normal((2, 3, 7))
    g, u = gu[..., 0, :], gu[..., 1, :]
    s = 1 / (1 + np.exp(-g))
    value, grad = jax.value_and_grad(lambda a: jnp.sum(jnp.asarray(w, jnp.float32) * swiglu(a)))(
        jnp.asarray(gu, jnp.float32))
    np.testing.assert_allclose(value, np.sum(w * g * s * u), rtol=1e-5)
    want = np.stack([w * u * (s + g * s * (1 - s)), w * g * s], axis=-2)  # d/dg (g s(g)) = s + g s (1 - s)
    chex.assert_trees_all_close(np.asarray(grad, np.float64), want, atol=1e-5, rtol=1e-5)


def test_the_streams_between_a_blocks_sublayers_are_recomputed_not_kept():
    # Selective recomputation keeps a block's input streams but not the n C streams after attention: the
    # block keeps less than with the connections recomputing only their own internals, by n C floats.
    from mhc_jax.model.transformer import Block
    d, seq = 64, 32
    cfg = Config().replace(model={"d_model": d, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 4 * d,
                                  "max_seq_len": seq}, residual={"kind": "mhc", "n_streams": 4}, data={"seq_len": seq})
    block = Block(cfg, 0, rngs=nnx.Rngs(0))
    pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (1, seq))
    seg = jnp.ones((1, seq), jnp.int32)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, seq, 4, d)), jnp.float32)

    def residual_shapes(sourced: bool) -> tuple[jax.Array, typing.Callable, list[tuple[int, ...]]]:
        def f(x_):
            if sourced:
                return block(x_, pos, seg, None, None)[0]
            mid = block.attn_res(x_, lambda h: block.attn(block.attn_norm(h), pos, seg, None)[0])
            return block.mlp_res(mid, lambda h: block.mlp(block.mlp_norm(h)))
        out, vjp = jax.vjp(f, x)
        return out, vjp, [tuple(r.shape) for r in jax.tree.leaves(vjp) if hasattr(r, "shape")]

    out_s, vjp_s, kept_s = residual_shapes(True)
    out_k, vjp_k, kept_k = residual_shapes(False)
    chex.assert_trees_all_close(out_s, out_k, atol=1e-6)
    chex.assert_trees_all_close(vjp_s(out_s), vjp_k(out_k), atol=1e-5, rtol=1e-5)
    assert kept_s.count(x.shape) == 1 and kept_k.count(x.shape) == 2, (kept_s, kept_k)
