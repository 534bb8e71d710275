"""Amax gain magnitude (mHC paper Sec. 3.1) against brute-force numpy, and H_res capture from a model."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax.config import Config
from mhc_jax.diagnostics import (amax_gains, collect_h_res, composite_matrices, connections, plot_gains,
                                 plot_h_res_heatmaps)
from mhc_jax.model import Transformer
from mhc_jax.residual import expand
from mhc_jax.residual.hc import HyperConnection
from mhc_jax.residual.mhc import ManifoldHyperConnection

from references import build, randomize


def make_cfg(kind: str, n: int = 4, scan: bool = False, **residual) -> Config:
    """Unscanned unless `scan`: most tests read and set single connections' parameters."""
    return Config().replace(
        model={"d_model": 16, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 32, "max_seq_len": 32,
               "scan_layers": scan},
        residual={"kind": kind, "n_streams": n, **residual}, data={"seq_len": 16, "batch_size": 2})


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 12)), jnp.int32)


def brute_force_gains(h: np.ndarray) -> dict[str, np.ndarray]:
    """Token by token, layer by layer, straight from the definitions."""
    L, B, T = h.shape[:3]
    out = {k: np.zeros(L) for k in ("per_layer_fwd", "per_layer_bwd", "composite_fwd", "composite_bwd")}
    for layer in range(L):
        for b in range(B):
            for t in range(T):
                m = h[layer, b, t]
                comp = np.eye(m.shape[0])
                for k in range(layer, L):  # x_L = H_{L-1} ... H_layer x_layer
                    comp = h[k, b, t] @ comp
                out["per_layer_fwd"][layer] += max(np.abs(m[i, :]).sum() for i in range(m.shape[0]))
                out["per_layer_bwd"][layer] += max(np.abs(m[:, j]).sum() for j in range(m.shape[1]))
                out["composite_fwd"][layer] += max(np.abs(comp[i, :]).sum() for i in range(m.shape[0]))
                out["composite_bwd"][layer] += max(np.abs(comp[:, j]).sum() for j in range(m.shape[1]))
    return {k: v / (B * T) for k, v in out.items()}


def test_amax_gains_match_brute_force_definitions():
    h = np.random.default_rng(0).standard_normal((5, 2, 3, 4, 4))
    got, want = amax_gains(h), brute_force_gains(h)
    assert set(got) == set(want)
    for key in want:
        chex.assert_shape(got[key], (5,))
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, err_msg=key)


def test_composite_matrices_are_products_towards_the_output():
    h = np.random.default_rng(1).standard_normal((3, 2, 4, 4))
    comp = composite_matrices(h)
    np.testing.assert_allclose(comp[0], h[2] @ h[1] @ h[0], rtol=1e-12)
    np.testing.assert_allclose(comp[2], h[2], rtol=1e-12)


def test_plain_residual_gains_are_one():
    model = Transformer(make_cfg("plain"), rngs=nnx.Rngs(0))
    h = collect_h_res(model, TOKENS)
    chex.assert_shape(h, (4, 2, 12, 1, 1))
    for key, g in amax_gains(h).items():
        np.testing.assert_array_equal(g, 1.0, err_msg=key)


@pytest.mark.parametrize("variant", ["paper", "deepseek_v4"])
def test_collect_h_res_returns_the_acting_matrices_of_every_sublayer(variant):
    cfg = make_cfg("mhc", variant=variant)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    for conn in connections(model):
        randomize(conn, seed=conn.sublayer_index)
    logits_before = model(TOKENS)
    h = collect_h_res(model, TOKENS)
    chex.assert_shape(h, (4, 2, 12, 4, 4))
    # Sublayer 0 sees the expanded embedding: its captured matrix is the one mappings() gives there.
    x0 = expand(jnp.take(model.embed_VC[...], TOKENS, axis=0), 4)
    _, _, h_res0 = connections(model)[0].mappings(x0)
    acting0 = h_res0 if variant == "paper" else jnp.swapaxes(h_res0, -1, -2)
    chex.assert_trees_all_close(h[0], acting0, atol=1e-6)
    # Acting matrices have rows summing to 1 in either variant (x_{l+1} = H x_l keeps the mean).
    np.testing.assert_allclose(np.asarray(h.sum(-1), np.float64), 1.0, atol=1e-5)
    # Capturing leaves no trace: same outputs, no sown state, flags reset.
    chex.assert_trees_all_close(model(TOKENS), logits_before, atol=0)
    assert not jax_leaves(nnx.state(model, nnx.Intermediate))
    assert not any(c.capture_mappings for c in connections(model))


def jax_leaves(state) -> list:
    import jax
    return jax.tree.leaves(state)


def test_collect_h_res_orders_sublayers_attention_then_mlp():
    model = Transformer(make_cfg("hc"), rngs=nnx.Rngs(0))
    assert [c.sublayer_index for c in connections(model)] == [0, 1, 2, 3]
    assert connections(model)[1] is model.blocks[0].mlp_res
    # Distinct static H_res per sublayer show up in that order.
    for k, conn in enumerate(connections(model)):
        conn.static_alpha[...] = conn.static_alpha[...].at[:, 1:].multiply(1.0 + k)
    h = np.asarray(collect_h_res(model, TOKENS))
    for k in range(4):
        np.testing.assert_allclose(h[k], np.broadcast_to((1.0 + k) * np.eye(4), h[k].shape), atol=0)


@pytest.mark.parametrize("kind", ["plain", "hc", "mhc", "mhc_lite"])
def test_a_scanned_model_gives_the_mappings_of_the_unrolled_model(kind):
    # model.scan_layers (the default) stacks the blocks; the mappings are read per layer all the same.
    cfg = make_cfg(kind, scan=True).replace(model={"n_layers": 3})
    scanned = Transformer(cfg, rngs=nnx.Rngs(0))
    unrolled = Transformer(cfg.replace(model={"scan_layers": False}), rngs=nnx.Rngs(0))
    assert type(scanned.blocks[0]).__name__ == "BlockStack"
    if kind != "plain":  # distinct, input-dependent mappings per layer
        for conn in connections(unrolled):
            randomize(conn, seed=conn.sublayer_index)
        nnx.update(scanned, stacked_like(scanned, unrolled))
    h_s, h_u = collect_h_res(scanned, TOKENS), collect_h_res(unrolled, TOKENS)
    chex.assert_shape(h_s, (6, 2, 12) + h_u.shape[-2:])
    chex.assert_trees_all_close(h_s, h_u, atol=1e-6)
    if kind != "plain":
        assert not any(np.allclose(h_s[k], h_s[k + 1]) for k in range(5)), "six distinct layers' mappings"
        np.testing.assert_allclose(amax_gains(h_s)["composite_fwd"], amax_gains(h_u)["composite_fwd"], rtol=1e-6)


def stacked_like(scanned, unrolled):
    """The unrolled model's values in the scanned model's layout (stack each layer's variables)."""
    from mhc_jax.model.transformer import block_groups
    pure_s, pure_u = nnx.to_pure_dict(nnx.state(scanned)), nnx.to_pure_dict(nnx.state(unrolled))
    for g, idx in enumerate(block_groups(scanned.cfg)):
        if "layers" in pure_s["blocks"][g]:
            pure_s["blocks"][g]["layers"] = jax.tree.map(lambda *a: jnp.stack(a),
                                                         *[pure_u["blocks"][i] for i in idx])
        else:
            pure_s["blocks"][g] = pure_u["blocks"][idx[0]]
    state = nnx.state(scanned)
    nnx.replace_by_pure_dict(state, pure_s)
    return state


def test_capture_through_rematerialised_blocks_equals_capture_without_remat():
    plain_model = Transformer(make_cfg("mhc"), rngs=nnx.Rngs(0))
    remat_model = Transformer(make_cfg("mhc").replace(training={"remat": "full"}), rngs=nnx.Rngs(0))
    chex.assert_trees_all_close(collect_h_res(remat_model, TOKENS), collect_h_res(plain_model, TOKENS), atol=1e-6)
    assert remat_model.remat == "full"


def test_mhc_composite_forward_gain_stays_at_most_one_at_any_depth():
    # 96 sublayers of real, strongly non-uniform mHC matrices (large random params and inputs).
    conn = randomize(build(ManifoldHyperConnection, make_cfg("mhc"), 0), scale=1.0)
    x = np.random.default_rng(3).standard_normal((96, 2, 8, 4, 16)).astype(np.float32)
    _, _, h = conn.mappings(jnp.asarray(x))
    g = amax_gains(h)
    assert g["per_layer_fwd"].max() <= 1 + 1e-5
    assert g["composite_fwd"].max() <= 1 + 1e-5
    assert g["composite_bwd"].max() < 2.0
    assert g["per_layer_bwd"].max() > 1.0 + 1e-4  # truncation error lands on the column side


def test_unconstrained_hc_composite_gain_compounds_over_depth():
    # Unconstrained H_res a little above identity (rows summing to ~1.4), as HC drifts in training.
    conn = randomize(build(HyperConnection, make_cfg("hc"), 0), scale=0.1)
    conn.static_alpha[...] = conn.static_alpha[...].at[:, 1:].set(jnp.eye(4) + 0.1)
    x = np.random.default_rng(3).standard_normal((32, 1, 8, 4, 16)).astype(np.float32)
    _, _, h = conn.mappings(jnp.asarray(x))
    g = amax_gains(h)
    assert g["composite_fwd"][0] > 10 * g["per_layer_fwd"].max()


def test_mhc_gains_at_init_are_within_the_paper_bounds():
    model = Transformer(make_cfg("mhc").replace(model={"n_layers": 4}), rngs=nnx.Rngs(0))
    g = amax_gains(collect_h_res(model, TOKENS))
    np.testing.assert_allclose(g["per_layer_fwd"], 1.0, atol=1e-5)
    np.testing.assert_allclose(g["composite_fwd"], 1.0, atol=1e-5)
    assert g["per_layer_bwd"].max() < 1.6  # paper: composite at most ~1.6 for mHC
    assert g["composite_bwd"].max() < 1.6


def test_plot_helpers_write_png_files(tmp_path):
    h = np.abs(np.random.default_rng(0).standard_normal((4, 1, 2, 4, 4)))
    p1 = plot_gains({"a": amax_gains(h), "b": amax_gains(h / 2)}, str(tmp_path / "gains.png"), "t")
    p2 = plot_h_res_heatmaps(h[:, 0, 0], str(tmp_path / "heat.png"), titles=["l0", "l1", "l2", "l3"])
    for p in (p1, p2):
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_gain_input_raises():
    with pytest.raises(ValueError, match="n, n"):
        amax_gains(np.ones((3, 2, 4, 5)))
