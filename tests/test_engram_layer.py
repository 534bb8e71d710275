"""The Engram module: shapes, gate, conv, sparse gradients, sharded and host-resident tables, decode cache,
and the full model with Engram."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # conftest sets it in CI

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax.config import Config, MeshConfig
from mhc_jax.engram.hashing import engram_primes
from mhc_jax.engram.layer import (Engram, engram_param_count, head_offsets, table_rows, table_shardings)
from mhc_jax.model import Transformer, count_params, expected_param_count
from mhc_jax.sharding import make_mesh, rules_for, state_shardings

C, T, B = 32, 12, 2


def make_cfg(kind: str = "plain", **engram) -> Config:
    base = dict(enabled=True, layers=[1], max_ngram=3, heads_per_ngram=2, head_dim=4, table_size=61,
                row_pad_multiple=8)
    base.update(engram)
    return Config().replace(
        model=dict(d_model=C, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32, dtype="float32"),
        residual=dict(kind=kind, n_streams=1 if kind == "plain" else 4),
        data=dict(seq_len=T), engram=base)


def random_ids(cfg: Config, layer: int, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Table ids as the hasher gives them: head j of the layer in [0, prime_j)."""
    primes = engram_primes(cfg.engram.layers, cfg.engram.max_ngram, cfg.engram.heads_per_ngram,
                           cfg.engram.table_size)[layer].reshape(-1)
    u = np.random.default_rng(seed).random(shape + (primes.size,))
    return (u * primes).astype(np.int32)


def randomise_conv(engram: Engram, seed: int = 1) -> None:
    engram.conv[...] = 0.3 * jax.random.normal(jax.random.key(seed), engram.conv[...].shape)


def numpy_engram(engram: Engram, x_BTnC: np.ndarray, ids_BTG: np.ndarray, seg_BT: np.ndarray | None) -> np.ndarray:
    """float64 reference written from engram.md (lookup, gate, conv with dilation, residual)."""
    p = {k: np.asarray(v, np.float64) for k, v in [
        ("table", engram.table[...]), ("wv", engram.value_proj[...]), ("conv", engram.conv[...])]}
    wk = np.stack([np.asarray(w[...], np.float64) for w in engram.key_projs])
    sc = lambda norms: np.stack([np.asarray(nm.scale[...], np.float64) for nm in norms])
    eps = engram.eps
    rms = lambda a: a / np.sqrt(np.mean(a * a, axis=-1, keepdims=True) + eps)
    Bx, Tx, n, Cx = x_BTnC.shape
    rows = ids_BTG + head_offsets_of(engram)
    e = p["table"][rows].reshape(Bx, Tx, -1)
    v = e @ p["wv"]
    k = np.einsum("btm,nmc->btnc", e, wk)
    s = np.sum(rms(x_BTnC.astype(np.float64)) * sc(engram.query_norms) * rms(k) * sc(engram.key_norms), -1)
    s = s / np.sqrt(Cx)
    gate = 1 / (1 + np.exp(-np.sign(s) * np.sqrt(np.maximum(np.abs(s), 1e-6))))
    u = gate[..., None] * v[:, :, None, :]
    z = rms(u) * sc(engram.conv_norms)
    K, dil = engram.kernel_size, engram.dilation
    conv = np.zeros_like(z)
    for b in range(Bx):
        for t in range(Tx):
            for i in range(K):
                src = t - (K - 1 - i) * dil
                if src < 0 or (seg_BT is not None and np.any(seg_BT[b, src:t + 1] != seg_BT[b, t])):
                    continue
                conv[b, t] += p["conv"][i] * z[b, src]
    return conv / (1 + np.exp(-conv)) + u


def build_engram(cfg: Config, layer: int) -> Engram:
    """The Engram layer as mhc_jax.model.transformer.Block builds it: its section plus the model's sizes."""
    m = cfg.model
    return Engram(cfg.engram, layer, d_model=m.d_model, n_streams=cfg.n_streams, n_layers=m.n_layers,
                  init_std=m.init_std, norm_eps=m.norm_eps, dtype=m.dtype, param_dtype=m.param_dtype,
                  rngs=nnx.Rngs(0))


def head_offsets_of(engram: Engram) -> np.ndarray:
    return np.asarray(engram.offsets, np.int64)


@pytest.mark.parametrize("kind", ["plain", "mhc"])
def test_output_shape_is_batch_time_streams_channels(kind: str):
    cfg = make_cfg(kind)
    engram = build_engram(cfg, 1)
    n = cfg.n_streams
    x = jax.random.normal(jax.random.key(0), (B, T, n, C))
    y, state = engram(x, jnp.asarray(random_ids(cfg, 1, (B, T))))
    chex.assert_shape(y, (B, T, n, C))
    assert state is None


@pytest.mark.parametrize("kind", ["plain", "mhc"])
def test_matches_float64_reference_with_random_conv_and_segments(kind: str):
    cfg = make_cfg(kind)
    engram = build_engram(cfg, 1)
    randomise_conv(engram)
    x = np.random.default_rng(0).normal(size=(B, T, cfg.n_streams, C)).astype(np.float32)
    ids = random_ids(cfg, 1, (B, T))
    seg = np.array([[1] * 4 + [2] * 8, [1] * 7 + [3] * 5], np.int32)
    for segments in (None, seg):
        y, _ = engram(jnp.asarray(x), jnp.asarray(ids), None if segments is None else jnp.asarray(segments))
        np.testing.assert_allclose(np.asarray(y), numpy_engram(engram, x, ids, segments), rtol=2e-4, atol=2e-5)


def test_zero_initialised_conv_leaves_gated_value_unchanged():
    cfg = make_cfg("mhc")
    engram = build_engram(cfg, 1)
    np.testing.assert_array_equal(np.asarray(engram.conv[...]), 0.0)
    x = jax.random.normal(jax.random.key(3), (B, T, 4, C))
    ids = jnp.asarray(random_ids(cfg, 1, (B, T)))
    y, _ = engram(x, ids)
    e = engram.lookup(ids)
    u = engram.gate(x, e)[..., None] * jnp.einsum("btm,mc->btc", e, engram.value_proj[...])[:, :, None, :]
    chex.assert_trees_all_close(y, u, rtol=1e-6, atol=1e-7)


def test_gate_lies_strictly_between_zero_and_one():
    cfg = make_cfg("mhc")
    engram = build_engram(cfg, 1)
    x = 50.0 * jax.random.normal(jax.random.key(4), (B, T, 4, C))
    e = 50.0 * jax.random.normal(jax.random.key(5), (B, T, cfg.engram.d_mem))
    g = engram.gate(x, e)
    chex.assert_shape(g, (B, T, 4))
    assert bool(jnp.all((g > 0) & (g < 1)))
    # Signed square root: |s| = 1e-8 is clamped to 1e-6 before the root, so the gate stays near 1/2.
    assert bool(jnp.all(jnp.abs(engram.gate(x, jnp.zeros_like(e)) - 0.5) < 1e-6))


def test_gradients_reach_only_looked_up_rows():
    cfg = make_cfg("plain")
    engram = build_engram(cfg, 1)
    randomise_conv(engram)
    x = jax.random.normal(jax.random.key(0), (B, T, 1, C))
    ids = random_ids(cfg, 1, (B, T))

    grads = nnx.grad(lambda m: jnp.sum(m(x, jnp.asarray(ids))[0] ** 2))(engram)
    g_rows = np.abs(np.asarray(grads.table[...])).sum(axis=1)
    used = np.zeros(table_rows(cfg.engram, 1), bool)
    used[(ids + head_offsets_of(engram)).reshape(-1)] = True
    assert np.all(g_rows[~used] == 0.0)
    assert np.all(g_rows[used] > 0.0)


def _sharded_vs_single(cfg: Config, mesh_cfg: MeshConfig, n_streams: int = 1) -> None:
    engram = build_engram(cfg, 1)
    randomise_conv(engram)
    x = jax.random.normal(jax.random.key(0), (8, T, n_streams, C))
    ids = jnp.asarray(random_ids(cfg, 1, (8, T)))
    seg = jnp.asarray(np.repeat([[1] * 5 + [2] * 7], 8, axis=0))

    def loss_and_out(m: Engram, x, ids, seg):
        def f(m):
            y, _ = m(x, ids, seg)
            return jnp.sum(y ** 2), y
        (loss, y), g = nnx.value_and_grad(f, has_aux=True)(m)
        return y, g

    y_ref, g_ref = nnx.jit(loss_and_out)(engram, x, ids, seg)

    mesh = make_mesh(mesh_cfg)
    graphdef, state = nnx.split(engram)
    shardings = state_shardings(state, mesh, rules_for(cfg))
    table_spec = shardings["table"].spec
    assert table_spec[0] == cfg.engram.shard_axis, table_spec  # rows really are split
    sharded = nnx.merge(graphdef, jax.device_put(state, shardings))
    assert len(sharded.table[...].sharding.device_set) == 8
    with jax.set_mesh(mesh):
        y, g = nnx.jit(loss_and_out)(sharded, x, ids, seg)
    chex.assert_trees_all_close(y, y_ref, rtol=1e-5, atol=1e-6)
    # Sharded sums reduce in another order: compare each gradient relative to its largest entry.
    for got, want in zip(jax.tree.leaves(nnx.state(g)), jax.tree.leaves(nnx.state(g_ref))):
        want = np.asarray(want)
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4 * max(np.abs(want).max(), 1e-6))


def test_row_sharded_lookup_over_tensor_axis_equals_single_device():
    _sharded_vs_single(make_cfg("plain", shard_axis="tensor"), MeshConfig(data=1, tensor=8))


def test_row_sharded_lookup_over_fsdp_axis_with_sharded_batch_equals_single_device():
    _sharded_vs_single(make_cfg("mhc", shard_axis="fsdp"), MeshConfig(data=2, fsdp=4), n_streams=4)


def test_host_placement_equals_device_placement():
    dev_cfg = make_cfg("mhc")
    host_cfg = dev_cfg.replace(engram=dict(placement="host", update="dense"))  # the offloaded dense table
    dev = build_engram(dev_cfg, 1)
    host = build_engram(host_cfg, 1)
    randomise_conv(dev)
    randomise_conv(host)
    graphdef, state = nnx.split(host)
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    shardings = table_shardings(state, state_shardings(state, mesh, rules_for(host_cfg)), host_cfg.engram)
    assert shardings["table"].memory_kind == "pinned_host"
    assert shardings["value_proj"].memory_kind in (None, "device")
    host = nnx.merge(graphdef, jax.device_put(state, shardings))
    assert host.table[...].sharding.memory_kind == "pinned_host"

    x = jax.random.normal(jax.random.key(0), (B, T, 4, C))
    ids = jnp.asarray(random_ids(dev_cfg, 1, (B, T)))

    @nnx.jit
    def run(m: Engram):
        return nnx.value_and_grad(lambda m: jnp.sum(m(x, ids)[0] ** 2))(m)

    (loss_d, g_d), (loss_h, g_h) = run(dev), run(host)
    chex.assert_trees_all_close(loss_h, loss_d, rtol=1e-6)
    assert g_h.table[...].sharding.memory_kind == "pinned_host"  # the table gradient stays on the host
    chex.assert_trees_all_close(jax.device_get(nnx.state(g_h)), jax.device_get(nnx.state(g_d)), rtol=1e-5, atol=1e-7)


def test_table_shardings_leave_device_placement_untouched():
    cfg = make_cfg("plain")
    state = nnx.state(build_engram(cfg, 1))
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    shardings = state_shardings(state, mesh, rules_for(cfg))
    assert table_shardings(state, shardings, cfg.engram) is shardings


@pytest.mark.parametrize("kind", ["plain", "mhc"])
def test_decode_with_cache_equals_full_sequence(kind: str):
    cfg = make_cfg(kind)
    engram = build_engram(cfg, 1)
    randomise_conv(engram)
    x = jax.random.normal(jax.random.key(0), (B, T, cfg.n_streams, C))
    ids = jnp.asarray(random_ids(cfg, 1, (B, T)))
    full, _ = engram(x, ids)
    state = engram.init_cache(B)
    chex.assert_shape(state["conv"], (B, (cfg.engram.kernel_size - 1) * cfg.engram.max_ngram, cfg.n_streams, C))
    pieces, start = [], 0
    for size in (1, 3, 1, 7):  # one and several new tokens per call
        y, state = engram(x[:, start:start + size], ids[:, start:start + size], None, state)
        pieces.append(y)
        start += size
    chex.assert_trees_all_close(jnp.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-6)


def test_param_count_matches_closed_form():
    for kind in ("plain", "mhc"):
        cfg = make_cfg(kind, layers=[0, 1])
        for layer in (0, 1):
            engram = build_engram(cfg, layer)
            assert count_params(engram) == engram_param_count(cfg.engram, layer, cfg.model.d_model, cfg.n_streams)
            assert table_rows(cfg.engram, layer) % 8 == 0 and table_rows(cfg.engram, layer) >= \
                engram_primes((0, 1), 3, 2, 61)[layer].sum()
    assert list(head_offsets(cfg.engram, 1)) == list(np.concatenate([[0], np.cumsum(engram_primes((0, 1), 3, 2, 61)[1])[:-1]]))


@pytest.mark.parametrize("kind", ["plain", "mhc"])
def test_transformer_with_engram_builds_runs_and_counts_params(kind: str):
    cfg = make_cfg(kind, layers=[0, 1])
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert count_params(model) == expected_param_count(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.model.vocab_size, (B, T)))
    ids = jnp.asarray(np.stack([random_ids(cfg, layer, (B, T), seed=layer) for layer in (0, 1)], axis=2))
    logits = model(tokens, engram_ids_BTEG=ids)
    chex.assert_shape(logits, (B, T, cfg.model.padded_vocab_size))
    assert bool(jnp.all(jnp.isfinite(logits)))
    # Engram changes the output once its conv is non-zero (the memory path is live).
    for block in model.blocks:
        randomise_conv(block.engram)
    other_ids = jnp.asarray(np.stack([random_ids(cfg, layer, (B, T), seed=9 + layer) for layer in (0, 1)], 2))
    assert not np.allclose(np.asarray(model(tokens, engram_ids_BTEG=ids)),
                           np.asarray(model(tokens, engram_ids_BTEG=other_ids)))


def test_transformer_decode_with_engram_equals_full_forward():
    cfg = make_cfg("plain", layers=[1])
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    randomise_conv(model.blocks[1].engram)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.model.vocab_size, (B, T)))
    ids = jnp.asarray(random_ids(cfg, 1, (B, T)))[:, :, None]
    full = model(tokens, engram_ids_BTEG=ids)
    cache = model.init_cache(B, cfg.model.max_seq_len)
    outs = []
    for t in range(T):
        pos = jnp.full((B, 1), t, jnp.int32)
        logits, cache = model.decode(tokens[:, t:t + 1], pos, cache, engram_ids_BTEG=ids[:, t:t + 1])
        outs.append(logits)
    chex.assert_trees_all_close(jnp.concatenate(outs, axis=1), full, rtol=1e-4, atol=1e-4)


def test_default_shard_axis_splits_rows_on_fsdp_and_tensor_meshes_and_replication_is_reported(caplog):
    from mhc_jax.sharding import train_state_shardings
    from mhc_jax.train.optimizer import make_optimizer

    cfg = make_cfg("plain")
    assert cfg.engram.shard_axis == "auto"
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    opt = make_optimizer(cfg, model)
    for mesh_cfg, axis in ((MeshConfig(data=2, fsdp=4), "fsdp"), (MeshConfig(data=2, tensor=4), "tensor")):
        caplog.clear()
        sh = train_state_shardings(model, opt, make_mesh(mesh_cfg), cfg)
        assert sh[0]["blocks"][1]["engram"]["table"].spec[0] == axis
        assert not [r for r in caplog.records if "replicated" in r.getMessage()]
    caplog.clear()
    tensor_cfg = cfg.replace(engram={"shard_axis": "tensor"})  # the old default, on an FSDP mesh
    train_state_shardings(model, opt, make_mesh(MeshConfig(data=2, fsdp=4)), tensor_cfg)
    rows = table_rows(cfg.engram, 1)
    (msg,) = [r.getMessage() for r in caplog.records if "replicated" in r.getMessage()]
    assert "engram.shard_axis='tensor'" in msg and f"{rows * cfg.engram.head_dim * 4 / 2**20:.1f} MiB" in msg
