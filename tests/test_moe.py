"""DeepSeekMoE (mhc_jax.model.moe) against float64 numpy references written from DeepSeek-V3's equations
(arXiv 2412.19437, Eq. 12-20): sigmoid routing with selection-only bias and group limits, normalised gate
weights, the whole layer's output, capacity drops, the sequence-wise balance loss, the aux-loss-free bias
update, expert parallelism on 8 fake devices equal to one device, and training / resuming with it."""

from __future__ import annotations

import math
import os
import shutil
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # conftest sets it in CI

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax import sharding
from mhc_jax.config import Config, ConfigError, MeshConfig, load_config
from mhc_jax.data import synthetic_batch
from mhc_jax.model import Transformer
from mhc_jax.model.moe import MoE, RouterBias, expert_capacity, moe_stats, route, sequence_balance_loss, update_router_bias
from mhc_jax.sharding import batch_shardings, make_mesh
from mhc_jax.train.loop import run
from mhc_jax.train.metrics import read_metrics
from mhc_jax.train.state import load_model_from_workdir
from mhc_jax.train.step import _loss_and_grads

from conftest import PROSE_FILE, REPO_ROOT


GRADS = nnx.jit(lambda model, batch: _loss_and_grads(model, batch, 1))


def moe_cfg(**model) -> Config:
    base = {"d_model": 16, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 32, "max_seq_len": 16,
            "vocab_pad_multiple": 8, "dtype": "float32", "ffn": "moe", "n_routed_experts": 8,
            "experts_per_token": 2, "moe_d_ff": 8, "n_shared_experts": 1, "scan_layers": False}
    return Config().replace(model={**base, **model}, data={"seq_len": 16, "batch_size": 8})


# --------------------------------------------------------------------------------------------------
# float64 numpy references
# --------------------------------------------------------------------------------------------------


def np_sigmoid(u):
    return 1.0 / (1.0 + np.exp(-u))


def np_route(u_mI, b_I, k, scale=1.0, n_groups=1, topk_groups=1):
    """Per token: experts chosen (as a set, with their gates) by V3 Eq. 13, 15, 16 and group limits."""
    s = np_sigmoid(np.asarray(u_mI, np.float64))
    out = []
    for t in range(s.shape[0]):
        sel = s[t] + b_I
        allowed = np.arange(s.shape[1])
        if n_groups > 1:
            per = s.shape[1] // n_groups
            scores = [np.sort(sel[g * per:(g + 1) * per])[-2:].sum() for g in range(n_groups)]
            groups = np.argsort(scores)[::-1][:topk_groups]
            allowed = np.concatenate([np.arange(g * per, (g + 1) * per) for g in groups])
        chosen = allowed[np.argsort(sel[allowed])[::-1][:k]]
        out.append({int(e): s[t, e] / s[t, chosen].sum() * scale for e in chosen})
    return out


def np_swiglu(x_C, w_gate_CO, w_up_CO, w_down_OC):
    g, u = x_C @ w_gate_CO, x_C @ w_up_CO
    return (g * np_sigmoid(g) * u) @ w_down_OC


def np_moe(moe: MoE, x_mC, capacity: int | None = None):
    """The layer's output (V3 Eq. 12) and dropped count; with `capacity`, each expert keeps its first
    `capacity` assignments in token order (then in the order of the token's k choices)."""
    f64 = lambda v: np.asarray(v[...], np.float64)
    x = np.asarray(x_mC, np.float64)
    routes = np_route(x @ f64(moe.router_CI), f64(moe.bias_I), moe.cfg.experts_per_token,
                      moe.cfg.routed_scaling_factor, moe.cfg.n_groups, moe.cfg.topk_groups)
    wg, wu, wd = f64(moe.w_gate_ICO), f64(moe.w_up_ICO), f64(moe.w_down_IOC)
    sg, su, sd = (f64(moe.shared.w_gate_CF), f64(moe.shared.w_up_CF), f64(moe.shared.w_down_FC))
    used, dropped, y = {}, 0, np.zeros_like(x)
    idx = np.asarray(route(jnp.asarray(x_mC @ moe.router_CI[...]), moe.bias_I[...], moe.cfg)[0])
    for t in range(x.shape[0]):
        y[t] = np_swiglu(x[t], sg, su, sd)
        for e in idx[t]:  # the module's order of the k choices decides priority within a token
            e = int(e)
            assert e in routes[t]  # the same experts as the reference's selection
            used[e] = used.get(e, 0) + 1
            if capacity is not None and used[e] > capacity:
                dropped += 1
                continue
            y[t] += routes[t][e] * np_swiglu(x[t], wg[e], wu[e], wd[e])
    return y, dropped


def np_balance_loss(s_BTI, idx_BTk):
    """V3 Eq. 17-20 (without alpha), per sequence then averaged."""
    B, T, I = s_BTI.shape
    k = idx_BTk.shape[-1]
    total = 0.0
    for b in range(B):
        f = np.zeros(I)
        for t in range(T):
            for e in idx_BTk[b, t]:
                f[e] += I / (k * T)
        p = (s_BTI[b] / s_BTI[b].sum(-1, keepdims=True)).mean(0)
        total += (f * p).sum()
    return total / B


def random_moe(seed=0, **model) -> MoE:
    cfg = moe_cfg(**model).model
    moe = MoE(cfg, dtype=jnp.float32, out_std=0.1, rngs=nnx.Rngs(seed))
    moe.router_CI[...] = jax.random.normal(jax.random.key(seed + 1), moe.router_CI.shape)  # spread affinities
    for w in (moe.w_gate_ICO, moe.w_up_ICO, moe.w_down_IOC):
        w[...] = w[...] * 10.0  # outputs of order one, so that mistakes show
    return moe


# --------------------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [(1, 1), (4, 2)], ids=["plain", "group_limited"])
def test_router_selects_top_k_of_affinity_plus_bias_with_weights_normalised_over_the_chosen(groups):
    cfg = moe_cfg(n_routed_experts=16, experts_per_token=4, n_groups=groups[0], topk_groups=groups[1],
                  routed_scaling_factor=2.5).model
    u = np.asarray(jax.random.normal(jax.random.key(0), (64, 16)))
    b = np.asarray(jax.random.normal(jax.random.key(1), (16,))) * 0.3
    idx, gate, s = route(jnp.asarray(u), jnp.asarray(b, jnp.float32), cfg)
    ref = np_route(u, b, 4, 2.5, *groups)
    chex.assert_trees_all_close(np.asarray(s), np_sigmoid(u.astype(np.float64)), rtol=1e-6)
    for t in range(64):
        assert set(np.asarray(idx[t]).tolist()) == set(ref[t]), t
        np.testing.assert_allclose(np.asarray(gate[t]), [ref[t][int(e)] for e in idx[t]], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gate).sum(-1), 2.5, rtol=1e-5)


def test_bias_changes_which_experts_are_chosen_but_not_their_weights():
    cfg = moe_cfg(n_routed_experts=8, experts_per_token=2).model
    u = jax.random.normal(jax.random.key(0), (32, 8))
    b = jnp.zeros(8).at[5].set(10.0)  # forces expert 5 into every token's choice
    idx0, _, _ = route(u, jnp.zeros(8), cfg)
    idx, gate, s = route(u, b, cfg)
    assert np.all(np.any(np.asarray(idx) == 5, axis=1))
    assert not np.all(np.any(np.asarray(idx0) == 5, axis=1))
    s64 = np_sigmoid(np.asarray(u, np.float64))
    for t in range(32):  # weights are s over the chosen, not s + b
        chosen = np.asarray(idx[t])
        np.testing.assert_allclose(np.asarray(gate[t]), s64[t, chosen] / s64[t, chosen].sum(), rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity_factor", [0.0, 4.0], ids=["dropless_ragged", "capacity_dense"])
def test_moe_layer_equals_the_float64_reference(capacity_factor):
    moe = random_moe(capacity_factor=capacity_factor, n_groups=2, topk_groups=1, routed_scaling_factor=1.5)
    moe.bias_I[...] = jax.random.normal(jax.random.key(7), (8,)) * 0.2
    x_BTC = jax.random.normal(jax.random.key(3), (2, 16, 16))
    y = moe(x_BTC)
    ref, dropped = np_moe(moe, np.asarray(x_BTC).reshape(-1, 16))
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 16), ref, rtol=2e-4, atol=2e-4)
    assert dropped == 0 and float(moe.dropped[...]) == 0.0
    counts = np.bincount(np.asarray(route(x_BTC.reshape(-1, 16) @ moe.router_CI[...], moe.bias_I[...],
                                          moe.cfg)[0]).ravel(), minlength=8)
    np.testing.assert_array_equal(np.asarray(moe.load_I[...]), counts)


def test_ragged_dropless_equals_the_dense_capacity_variant_when_nothing_is_dropped():
    x_BTC = jax.random.normal(jax.random.key(3), (2, 16, 16))
    # capacity ceil(4 * 32 * 2 / 8) = 32 = every token: nothing can be dropped
    ragged, dense = random_moe(capacity_factor=0.0), random_moe(capacity_factor=4.0)
    assert expert_capacity(32, dense.cfg) == 32

    def loss(moe, x):
        return jnp.sum(jnp.sin(moe(x)))

    (l_r, g_r), (l_d, g_d) = (nnx.value_and_grad(loss, argnums=(0, 1))(m, x_BTC) for m in (ragged, dense))
    chex.assert_trees_all_close(l_r, l_d, rtol=1e-5)
    chex.assert_trees_all_close(nnx.state(g_r[0], nnx.Param), nnx.state(g_d[0], nnx.Param), rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(g_r[1], g_d[1], rtol=1e-4, atol=1e-5)
    assert float(dense.dropped[...]) == 0.0


def test_capacity_variant_drops_the_overflow_in_token_order_and_counts_it():
    moe = random_moe(capacity_factor=0.5)
    moe.router_CI[...] = moe.router_CI[...].at[:, 0].add(3.0)  # skew: expert 0 overflows
    x_BTC = jax.random.normal(jax.random.key(3), (2, 16, 16)) + 0.5
    cap = expert_capacity(32, moe.cfg)
    assert cap == math.ceil(0.5 * 32 * 2 / 8)
    y = moe(x_BTC)
    ref, dropped = np_moe(moe, np.asarray(x_BTC).reshape(-1, 16), capacity=cap)
    load = np.asarray(moe.load_I[...])
    assert dropped == int(np.maximum(load - cap, 0).sum()) > 0
    assert float(moe.dropped[...]) == dropped
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 16), ref, rtol=2e-4, atol=2e-4)


def test_sequence_wise_balance_loss_equals_eq_17_to_20():
    cfg = moe_cfg(n_routed_experts=8, experts_per_token=3).model
    u = jax.random.normal(jax.random.key(0), (3, 10, 8))
    idx, _, s = route(u, jnp.zeros(8), cfg)
    got = sequence_balance_loss(s, idx)
    np.testing.assert_allclose(float(got), np_balance_loss(np.asarray(s, np.float64), np.asarray(idx)), rtol=1e-5)
    # perfectly balanced uniform routing gives exactly 1 (sum_i (N/K T)(K T/N)(1/N) = 1)
    uniform = sequence_balance_loss(jnp.full((1, 8, 8), 0.5), jnp.asarray(np.arange(8).reshape(1, 8, 1) % 8))
    np.testing.assert_allclose(float(uniform), 1.0, rtol=1e-6)


def test_balance_loss_enters_the_gradient_only_with_its_weight():
    cfg0, cfg1 = moe_cfg(), moe_cfg(aux_loss_weight=0.1)
    batch = jax.tree.map(jnp.asarray, synthetic_batch(cfg0))
    m0, m1 = Transformer(cfg0, rngs=nnx.Rngs(0)), Transformer(cfg1, rngs=nnx.Rngs(0))
    loss0, (g0, _), _, _, stats0 = GRADS(m0, batch)
    loss1, (g1, _), _, _, stats1 = GRADS(m1, batch)
    chex.assert_trees_all_close(loss0, loss1)  # the reported loss is the LM loss in both
    assert float(jnp.sum(stats1["balance_loss_L"])) > 0.5
    router0, router1 = g0["blocks"][0]["mlp"]["router_CI"][...], g1["blocks"][0]["mlp"]["router_CI"][...]
    assert float(jnp.max(jnp.abs(router0 - router1))) > 1e-6
    chex.assert_trees_all_close(g0["embed_VC"], g1["embed_VC"], rtol=0.2, atol=1e-3)  # other grads: close


# --------------------------------------------------------------------------------------------------
# Aux-loss-free balancing
# --------------------------------------------------------------------------------------------------


def test_bias_update_moves_load_towards_balance_on_a_skewed_input():
    moe = random_moe()
    moe.router_CI[...] = 0.3 * moe.router_CI[...] + jnp.zeros((16, 8)).at[:, :2].set(1.0)  # experts 0, 1 favoured
    x_BTC = jax.random.normal(jax.random.key(3), (4, 16, 16)) + 1.0
    ratios = []

    @nnx.jit
    def step(moe, x_BTC):
        moe(x_BTC)
        return moe.load_I[...], update_router_bias(moe, moe.load_I[...][None], 1e-2)

    for _ in range(300):
        bias = moe.bias_I[...]
        load, new = step(moe, x_BTC)
        ratios.append(float(load.max() / load.mean()))
        expect = bias + 1e-2 * np.sign(float(load.mean()) - np.asarray(load))  # b += gamma sign(mean - load)
        np.testing.assert_allclose(np.asarray(new[0]), expect, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(moe.bias_I[...]), expect, rtol=1e-6)
    assert ratios[0] > 2.5, ratios[0]
    assert np.mean(ratios[-50:]) < 1.6, ratios[-50:]  # sign steps of 1e-2 keep it oscillating near balance
    assert float(moe.bias_I[...][:2].max()) < 0  # the favoured experts were pushed down


def test_train_step_updates_the_bias_from_the_whole_batch_over_micro_batches():
    from mhc_jax.train.optimizer import make_optimizer
    from mhc_jax.train.step import train_step

    cfg = moe_cfg(bias_update_rate=0.01).replace(training={"grad_accum": 2})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, synthetic_batch(cfg))
    _, _, _, _, stats = GRADS(model, batch)  # loads of the whole batch at once
    optimizer = make_optimizer(cfg, model)
    metrics = train_step(model, optimizer, batch, grad_accum=2)
    np.testing.assert_array_equal(np.asarray(metrics["moe_load_LI"]), np.asarray(stats["load_LI"]))
    load = np.asarray(stats["load_LI"])
    expect = 0.01 * np.sign(load.mean(1, keepdims=True) - load)
    got = np.stack([np.asarray(v[...]) for v in jax.tree.leaves(nnx.state(model, RouterBias),
                                                                is_leaf=lambda x: isinstance(x, nnx.Variable))])
    np.testing.assert_allclose(got, expect, rtol=1e-6)
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(optimizer))[0]]
    assert any("router_CI" in p for p in opt_paths) and not any("bias_I" in p for p in opt_paths)  # no Adam state


# --------------------------------------------------------------------------------------------------
# Model integration: scan over layers, config errors
# --------------------------------------------------------------------------------------------------


def test_scanned_layers_carry_the_routing_statistics_out_of_the_scan():
    cfg = moe_cfg(n_layers=4, first_dense_layers=1, capacity_factor=0.5)
    batch = jax.tree.map(jnp.asarray, synthetic_batch(cfg))
    plain = Transformer(cfg.replace(model={"scan_layers": False}), rngs=nnx.Rngs(0))
    scanned = Transformer(cfg.replace(model={"scan_layers": True}), rngs=nnx.Rngs(0))
    out = [GRADS(m, batch) for m in (plain, scanned)]
    chex.assert_trees_all_close(out[0][0], out[1][0], rtol=1e-5)
    assert out[0][4]["load_LI"].shape == (3, 8)
    chex.assert_trees_all_close(out[0][4], out[1][4])
    assert float(jnp.sum(out[0][4]["dropped_L"])) > 0


def test_bad_moe_config_names_the_key():
    with pytest.raises(ConfigError, match="model.experts_per_token"):
        moe_cfg(experts_per_token=9)
    with pytest.raises(ConfigError, match="model.n_groups"):
        moe_cfg(n_groups=3)
    with pytest.raises(ConfigError, match="mesh.expert"):
        moe_cfg().replace(mesh={"expert": 3})


# --------------------------------------------------------------------------------------------------
# Expert parallelism: 8 fake CPU devices equal one device
# --------------------------------------------------------------------------------------------------

EP_CASES = {"dropless-expert8": (0.0, MeshConfig(data=1, expert=8)),
            "dropless-fsdp2-tensor2-expert2": (0.0, MeshConfig(data=1, fsdp=2, tensor=2, expert=2)),
            "capacity-data2-expert4": (4.0, MeshConfig(data=2, expert=4))}


@pytest.mark.multidevice
@pytest.mark.parametrize("case", list(EP_CASES))
def test_expert_parallel_loss_and_grads_equal_single_device(case):
    capacity_factor, mc = EP_CASES[case]
    cfg = moe_cfg(n_layers=1, capacity_factor=capacity_factor, n_shared_experts=2)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, synthetic_batch(cfg))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def step(p, r, b):
        loss, (grads, _), _, _, stats = _loss_and_grads(nnx.merge(graphdef, p, r), b, 1)
        return loss, grads, stats

    ref = jax.jit(step)(params, rest, batch)
    mesh = make_mesh(mc)
    p_sh = sharding.train_state_shardings_of(params, mesh, cfg)
    spec = p_sh["blocks"][0]["mlp"]["w_gate_ICO"].spec
    assert spec[0] == "expert", spec  # the routed experts are split over the expert axis
    with jax.set_mesh(mesh):
        got = jax.jit(step, out_shardings=(None, p_sh, None))(
            jax.device_put(params, p_sh), rest, jax.device_put(batch, batch_shardings(batch, mesh)))
    chex.assert_trees_all_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(got[1], ref[1], rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(got[2], ref[2])
    assert float(jnp.sum(got[2]["dropped_L"])) == 0.0


@pytest.mark.multidevice
def test_expert_parallel_capacity_drops_are_counted_over_every_device():
    cfg = moe_cfg(n_layers=1, capacity_factor=0.25)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, synthetic_batch(cfg))
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    forward = nnx.jit(lambda m, b: (m(b["inputs"]), moe_stats(m)))
    with jax.set_mesh(mesh):
        state = nnx.state(model)
        m = nnx.merge(nnx.graphdef(model), jax.device_put(state, sharding.state_shardings(state, mesh)))
        _, stats = forward(m, jax.device_put(batch, batch_shardings(batch, mesh)))
    # each of the 8 devices routes the 16 tokens of one row (capacity ceil(0.25 * 16 * 2 / 8) = 1 per expert):
    # the drops are those of the 8 rows routed one by one on one device
    assert expert_capacity(16, cfg.model) == 1
    per_row = [float(forward(model, {"inputs": batch["inputs"][r:r + 1]})[1]["dropped_L"][0]) for r in range(8)]
    assert float(stats["dropped_L"][0]) == sum(per_row) > 0, (stats["dropped_L"], per_row)


# --------------------------------------------------------------------------------------------------
# Training end to end
# --------------------------------------------------------------------------------------------------

TRAIN = ["data.batch_size=8", "training.sample_tokens=8", "training.diagnostics_every=0",
         f"data.dataset=text:{PROSE_FILE}", "model.ffn=moe"]


@pytest.mark.parametrize("extra", [[], ["residual.kind=mhc", "model.scan_layers=true", "model.capacity_factor=1.0",
                                        "training.grad_accum=2", "model.aux_loss_weight=0.01"]],
                         ids=["plain", "mhc_scan_capacity_accum"])
def test_tiny_config_trains_with_moe_and_logs_load_metrics(tmp_path, extra):
    cfg = load_config("tiny", TRAIN + ["training.steps=30", "training.eval_every=30", "training.log_every=5"] + extra)
    result = run(cfg, str(tmp_path), progress=False)
    rows = read_metrics(str(tmp_path), "train")
    curve = [r["loss"] for r in rows]
    assert np.mean(curve[-2:]) < curve[0] - 0.5, curve
    assert result.sample.startswith(cfg.training.sample_prompt)
    last = rows[-1]
    for block in (0, 1):
        assert last[f"moe_load_max_over_mean/{block}"] >= 1.0
        assert last[f"moe_bias_spread/{block}"] > 0
        assert f"moe_dropped/{block}" in last
    assert 1.0 <= last["moe_load_max_over_mean"] <= 8 / 2  # at worst every token on the same k = 2 of 8 experts
    if "model.capacity_factor=1.0" in extra:
        assert last["moe_balance_loss"] > 0


def test_router_bias_is_checkpointed_and_resume_reproduces_the_losses_bitwise(tmp_path):
    cfg = load_config("tiny", TRAIN + ["training.steps=6", "checkpoint.every=3", "training.eval_every=100",
                                       "training.sample_tokens=0", "training.log_every=1",
                                       "model.bias_update_rate=0.05"])
    run(cfg, str(tmp_path), progress=False)
    uninterrupted = [r["loss"] for r in read_metrics(str(tmp_path), "train")]
    _, model, step = load_model_from_workdir(str(tmp_path))
    biases = np.stack([np.asarray(v) for v in jax.tree.leaves(nnx.state(model, RouterBias))])
    assert step == 6 and np.abs(biases).max() > 0.05  # trained biases, not the zeros of a fresh model
    shutil.rmtree(tmp_path / "checkpoints" / "6")  # as if the run had died after step 3's checkpoint
    run(cfg, str(tmp_path), progress=False)
    rows = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path), "train")}
    assert [rows[s] for s in sorted(rows)] == uninterrupted  # a lost bias would route steps 4..6 differently


@pytest.mark.slow
def test_expert_parallel_training_on_two_processes_equals_one_process(tmp_path):
    """The multi-process harness of tests/test_multiprocess.py: 2 processes x 4 devices, experts split over
    the expert axis across the processes, the same losses and biases as this one process on 8 devices."""
    from multiprocess_harness import spawn, wait

    args = ["data.batch_size=8", "data.corpus_max_mb=1", "model.ffn=moe", "mesh.data=2", "mesh.expert=4",
            "training.steps=4", "training.log_every=1", "training.eval_every=4", "training.sample_tokens=0",
            "checkpoint.every=4", "model.bias_update_rate=0.05"]
    run(load_config("tiny", args), str(tmp_path / "reference"), progress=False)
    cmd = [sys.executable, os.path.join(REPO_ROOT, "train.py"), "--config", "tiny", "--workdir",
           str(tmp_path / "multi"), "--no-progress", *args]
    wait(spawn(cmd, str(tmp_path), "train"))
    losses = {w: [r["loss"] for r in read_metrics(str(tmp_path / w), "train")] for w in ("reference", "multi")}
    assert len(losses["multi"]) == 4
    np.testing.assert_allclose(losses["multi"], losses["reference"], rtol=0, atol=1e-6)
    biases = [np.stack([np.asarray(v) for v in jax.tree.leaves(nnx.state(
        load_model_from_workdir(str(tmp_path / w))[1], RouterBias))]) for w in ("reference", "multi")]
    np.testing.assert_array_equal(biases[0], biases[1])
    assert np.abs(biases[0]).max() > 0


@pytest.mark.parametrize("kind", ["plain", "hc", "mhc", "mhc_lite"])
def test_moe_with_every_residual_kind_and_engram_routes_every_token_and_trains_its_experts(kind):
    cfg = moe_cfg(n_layers=3, first_dense_layers=1).replace(
        residual={"kind": kind, "n_streams": 4},
        engram={"enabled": True, "layers": [1], "max_ngram": 3, "heads_per_ngram": 2, "head_dim": 4,
                "table_size": 61, "row_pad_multiple": 8})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, synthetic_batch(cfg))
    loss, (grads, _), _, _, stats = GRADS(model, batch)
    # At init the loss is close to uniform over the vocabulary.
    assert abs(float(loss) - np.log(cfg.model.vocab_size)) < 0.5, float(loss)
    # Dropless: each MoE block (blocks 1 and 2) routes every position of the batch to exactly k experts.
    B, T, k = cfg.data.batch_size, cfg.data.seq_len, cfg.model.experts_per_token
    chex.assert_shape(stats["load_LI"], (2, cfg.model.n_routed_experts))
    np.testing.assert_array_equal(np.asarray(stats["load_LI"]).sum(-1), [B * T * k] * 2)
    flat = {jax.tree_util.keystr(p): np.asarray(g)
            for p, g in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads))}
    assert all(np.isfinite(g).all() for g in flat.values())
    # The MoE blocks' router, shared-expert and routed-expert weights all get a gradient.
    moe_grads = {k: g for k, g in flat.items() if "['mlp']" in k and not k.startswith("['blocks'][0]")}
    assert moe_grads, sorted(flat)
    for name, g in moe_grads.items():
        assert np.any(g), name
