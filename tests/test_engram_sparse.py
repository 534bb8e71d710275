"""Sparse host-resident Engram tables (engram.update=sparse): the row path equals dense Adam exactly when
every row is touched, follows lazy Adam otherwise, and equals device placement in forward, gradients and
generation; the compiled step does not grow with the table."""

from __future__ import annotations

import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax import aot
from mhc_jax.config import Config, load_config
from mhc_jax.data.tokenizer import ByteTokenizer
from mhc_jax.engram.host_tables import HostTables, host_tables_from_model
from mhc_jax.engram.ids import EngramIds
from mhc_jax.engram.layer import layer_primes
from mhc_jax.errors import DataError
from mhc_jax.model.transformer import Transformer
from mhc_jax.sampling import generate
from mhc_jax.train.checkpoint import Checkpointer
from mhc_jax.train.loop import run
from mhc_jax.train.metrics import read_metrics
from mhc_jax.train.optimizer import engram_adam, lr_schedule, make_optimizer
from mhc_jax.train.sparse_rows import dense_hit_stats, load_tables
from mhc_jax.train.step import _loss_and_grads, loss_and_grads, train_step

B, T = 4, 16


def make_cfg(update: str = "sparse", **engram) -> Config:
    """Two Engram layers, one head per order: small prime tables that a batch can cover completely."""
    e = dict(enabled=True, layers=[0, 1], max_ngram=3, heads_per_ngram=1, head_dim=4, table_size=23,
             row_pad_multiple=1, placement="host" if update == "sparse" else "device", update=update)
    e.update(engram)
    return Config().replace(
        model=dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64, dtype="float32"),
        residual=dict(kind="plain"), data=dict(seq_len=T, batch_size=B), engram=e,
        optimizer=dict(warmup_steps=2, lr=1e-2), training=dict(steps=10))


def covering_ids(cfg: Config, seed: int, cover: bool = True) -> np.ndarray:
    """(B, T, L, k) hashed-style ids; with `cover`, every row of every head appears at least once."""
    rng = np.random.default_rng(seed)
    out = np.zeros((B, T, len(cfg.engram.layers), 2), np.int32)
    for l, layer in enumerate(cfg.engram.layers):
        for j, p in enumerate(layer_primes(cfg.engram, layer).reshape(-1)):
            if cover:
                col = np.concatenate([rng.permutation(p), rng.integers(0, p, B * T - p)])
            else:
                col = rng.integers(0, p // 3, B * T)  # a third of the rows
            out[:, :, l, j] = rng.permutation(col).reshape(B, T)
    return out


def random_batch(cfg: Config, seed: int, cover: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + seed)
    toks = rng.integers(0, cfg.model.vocab_size, (B, T + 1)).astype(np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": np.ones((B, T), np.int32),
            "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)), "loss_mask": np.ones((B, T), np.float32),
            "engram_ids": covering_ids(cfg, seed, cover)}


def dense_and_sparse(clip_norm: float = 1e9) -> tuple:
    dense_cfg = make_cfg("dense").replace(optimizer=dict(clip_norm=clip_norm))
    sparse_cfg = make_cfg("sparse").replace(optimizer=dict(clip_norm=clip_norm))
    dense = Transformer(dense_cfg, rngs=nnx.Rngs(0))
    sparse = Transformer(sparse_cfg, rngs=nnx.Rngs(0))
    tables = host_tables_from_model(sparse_cfg.engram, dense, engram_adam(sparse_cfg))
    return dense_cfg, dense, sparse_cfg, sparse, tables


def sparse_step(model, optimizer, tables: HostTables, batch: dict, bucket: int):
    feed = tables.feed(batch["engram_ids"], bucket)
    metrics = train_step(model, optimizer, {**jax.tree.map(jnp.asarray, batch), "engram_ids": feed.slots_BTEG,
                                            "engram_rows": feed.rows_EUW})
    grads = metrics.pop("engram_row_grads")
    tables.apply(feed, grads, finite=bool(np.isfinite(metrics["grad_norm"])))
    return feed, np.asarray(grads), metrics


def dense_tables(model) -> list[np.ndarray]:
    return [np.asarray(b.engram.table[...]) for b in model.blocks if b.engram is not None]


def test_sparse_model_holds_no_table_and_keeps_every_other_parameter():
    _, dense, _, sparse, _ = dense_and_sparse()
    assert all(b.engram.table is None for b in sparse.blocks)
    d = {k: v for k, v in nnx.to_flat_state(nnx.state(dense, nnx.Param)) if k[-1] != "table"}
    s = dict(nnx.to_flat_state(nnx.state(sparse, nnx.Param)))
    assert set(d) == set(s)
    for k in d:  # same random keys for every other parameter
        np.testing.assert_array_equal(np.asarray(d[k][...]), np.asarray(s[k][...]))


def test_forward_and_gradients_equal_device_placement():
    _, dense, cfg, sparse, tables = dense_and_sparse()
    for block in list(dense.blocks) + list(sparse.blocks):  # a live conv so every path matters
        block.engram.conv[...] = 0.3 * jax.random.normal(jax.random.key(1), block.engram.conv[...].shape)
    batch = random_batch(cfg, 0, cover=False)
    feed = tables.feed(batch["engram_ids"], cfg.engram_row_bucket)
    dense_logits = dense(jnp.asarray(batch["inputs"]), engram_ids_BTEG=jnp.asarray(batch["engram_ids"]))
    sparse_logits = sparse(jnp.asarray(batch["inputs"]), engram_ids_BTEG=jnp.asarray(feed.slots_BTEG),
                           engram_rows_EUW=jnp.asarray(feed.rows_EUW))
    np.testing.assert_array_equal(np.asarray(sparse_logits), np.asarray(dense_logits))

    sbatch = {**jax.tree.map(jnp.asarray, batch), "engram_ids": feed.slots_BTEG, "engram_rows": feed.rows_EUW}
    loss_s, (g_s, rows_g), _ = _loss_and_grads(sparse, sbatch, 1)[:3]
    loss_d, g_d, _ = loss_and_grads(dense, jax.tree.map(jnp.asarray, batch))
    np.testing.assert_array_equal(np.asarray(loss_s), np.asarray(loss_d))
    for l, block in enumerate(b for b in dense.blocks if b.engram is not None):
        g_table = np.asarray(g_d["blocks"][block.index]["engram"]["table"][...])
        u = feed.unique[l]
        np.testing.assert_array_equal(np.asarray(rows_g[l, :u.size]), g_table[u])
        assert np.all(np.asarray(rows_g[l, u.size:]) == 0)  # the padded bucket gets no gradient
        untouched = np.ones(len(g_table), bool)
        untouched[u] = False
        assert np.all(g_table[untouched] == 0)
    flat_d = {k: v for k, v in nnx.to_flat_state(g_d) if k[-1] != "table"}
    for k, v in nnx.to_flat_state(g_s):
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(flat_d[k][...]))


def test_sparse_equals_dense_adam_bitwise_when_every_row_is_touched_each_step():
    """No clipping: the same gradients and the same fixed-form Adam (mhc_jax.train.optimizer), compiled into
    the whole dense step or run alone on the host rows, give bitwise the same tables, moments, parameters
    and losses, step after step."""
    dense_cfg, dense, cfg, sparse, tables = dense_and_sparse(clip_norm=0.0)
    opt_d, opt_s = make_optimizer(dense_cfg, dense), make_optimizer(cfg, sparse)
    for step in range(4):
        batch = random_batch(cfg, step, cover=True)
        feed, _, m_s = sparse_step(sparse, opt_s, tables, batch, cfg.engram_row_bucket)
        assert all(u.size == n for u, n in zip(feed.unique, tables.n_rows))  # every row touched
        m_d = train_step(dense, opt_d, jax.tree.map(jnp.asarray, batch))
        chex.assert_trees_all_equal(np.asarray(m_s["loss"]), np.asarray(m_d["loss"]))
        for got, want in zip(tables.tables, dense_tables(dense)):
            np.testing.assert_array_equal(got, want)
    assert tables.count == 4
    moments = {(int(k[-3]), name): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(opt_d))
               for name in ("mu", "nu") if k[-1] == "table" and name in k}  # (..., name, blocks, i, engram, table)
    engram_blocks = [b.index for b in dense.blocks if b.engram is not None]
    for l, block in enumerate(engram_blocks):
        np.testing.assert_array_equal(tables.mu[l], moments[block, "mu"])
        np.testing.assert_array_equal(tables.nu[l], moments[block, "nu"])
    flat_d = {k: v for k, v in nnx.to_flat_state(nnx.state(dense, nnx.Param)) if k[-1] != "table"}
    for k, v in nnx.to_flat_state(nnx.state(sparse, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(flat_d[k][...]))


def test_sparse_matches_dense_adam_with_clipping():
    """With clipping, the one global norm sums the same squares in another order: equal to float rounding."""
    dense_cfg, dense, cfg, sparse, tables = dense_and_sparse(clip_norm=1.0)
    opt_d, opt_s = make_optimizer(dense_cfg, dense), make_optimizer(cfg, sparse)
    for step in range(3):
        batch = random_batch(cfg, step, cover=True)
        _, _, m_s = sparse_step(sparse, opt_s, tables, batch, cfg.engram_row_bucket)
        m_d = train_step(dense, opt_d, jax.tree.map(jnp.asarray, batch))
        np.testing.assert_allclose(float(m_s["grad_norm"]), float(m_d["grad_norm"]), rtol=1e-6)
    for got, want in zip(tables.tables, dense_tables(dense)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=3e-6)
    flat_d = {k: v for k, v in nnx.to_flat_state(nnx.state(dense, nnx.Param)) if k[-1] != "table"}
    for k, v in nnx.to_flat_state(nnx.state(sparse, nnx.Param)):
        np.testing.assert_allclose(np.asarray(v[...]), np.asarray(flat_d[k][...]), rtol=1e-5, atol=1e-6)


def test_rows_not_touched_follow_lazy_adam():
    """A float64 reference of lazy Adam: global step count, rows and moments move only when looked up."""
    _, _, cfg, sparse, tables = dense_and_sparse()
    opt = make_optimizer(cfg, sparse)
    oc, schedule = cfg.optimizer, lr_schedule(cfg.optimizer, cfg.training.steps)
    ref = [t.astype(np.float64) for t in tables.tables]
    mu = [np.zeros_like(r) for r in ref]
    nu = [np.zeros_like(r) for r in ref]
    touched_once = [np.zeros(len(r), bool) for r in ref]
    for step in range(4):
        before, before_mu = [t.copy() for t in tables.tables], [m.copy() for m in tables.mu]
        feed, grads, _ = sparse_step(sparse, opt, tables, random_batch(cfg, step, cover=False), cfg.engram_row_bucket)
        lr = float(schedule(step)) * cfg.engram.lr_multiplier
        for l, u in enumerate(feed.unique):
            g = grads[l, :u.size].astype(np.float64)
            mu[l][u] = oc.b1 * mu[l][u] + (1 - oc.b1) * g
            nu[l][u] = oc.b2 * nu[l][u] + (1 - oc.b2) * g * g
            m_hat, v_hat = mu[l][u] / (1 - oc.b1 ** (step + 1)), nu[l][u] / (1 - oc.b2 ** (step + 1))
            ref[l][u] -= lr * m_hat / (np.sqrt(v_hat) + oc.eps)
            untouched = np.setdiff1d(np.arange(len(ref[l])), u)
            np.testing.assert_array_equal(tables.tables[l][untouched], before[l][untouched])
            np.testing.assert_array_equal(tables.mu[l][untouched], before_mu[l][untouched])
            touched_once[l][u] = True
    for l in range(len(ref)):
        assert 0 < touched_once[l].mean() < 1  # some rows never looked up: lazy and dense differ there
        np.testing.assert_allclose(tables.tables[l], ref[l], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(tables.mu[l], mu[l], rtol=1e-5, atol=1e-7)


def test_bucket_too_small_for_a_batch_fails_naming_the_setting():
    _, _, cfg, _, tables = dense_and_sparse()
    with pytest.raises(DataError, match="engram.row_bucket=5"):
        tables.feed(random_batch(cfg, 0)["engram_ids"], 5)


def test_generation_equals_device_placement():
    _, dense, cfg, sparse, tables = dense_and_sparse()
    for block in list(dense.blocks) + list(sparse.blocks):
        block.engram.conv[...] = 0.3 * jax.random.normal(jax.random.key(2), block.engram.conv[...].shape)
    ids = EngramIds(cfg.engram, ByteTokenizer())
    prompt = [256] + list(b"def f(x):")
    lengths = []

    def recording(tokens_BT):
        lengths.append(tokens_BT.shape[1])
        return ids(tokens_BT)

    want = generate(dense, prompt, 12, engram_ids=recording)
    # O(1) per token: after the prompt, each step hashes only the last max_ngram tokens, not the history
    assert lengths[0] == len(prompt) and set(lengths[1:]) == {cfg.engram.max_ngram}
    assert generate(sparse, prompt, 12, engram_ids=ids, engram_tables=tables) == want
    assert generate(sparse, prompt, 12, engram_ids=ids, engram_tables=tables, use_cache=False) == want


def _losses(workdir: str) -> list[float]:
    rows = {r["step"]: r["loss"] for r in read_metrics(workdir, "train")}
    return [rows[s] for s in sorted(rows)]


REQUESTS = [("def f(x):", " return x"), ("import os", "\nimport sys"), ("class A", "(object):"), ("x = 1", " + 2")]


def test_scoring_a_sparse_model_equals_device_placement_from_its_tables_and_its_export(tmp_path):
    """mhc_jax.scoring (the lm-eval / multiple-choice engine) feeds a sparse model its rows from the host
    tables: the same log-likelihoods and generations as the dense model holding the same tables, also when
    the model and tables come back from an export."""
    from mhc_jax.export import export_model
    from mhc_jax.scoring import Scorer, load_scorer

    _, dense, cfg, sparse, tables = dense_and_sparse()
    for block in list(dense.blocks) + list(sparse.blocks):
        block.engram.conv[...] = 0.3 * jax.random.normal(jax.random.key(3), block.engram.conv[...].shape)
    want = Scorer(dense, ByteTokenizer(), batch_size=4).loglikelihood(REQUESTS)
    with pytest.raises(ValueError, match="engram_tables"):
        Scorer(sparse, ByteTokenizer())
    scorer = Scorer(sparse, ByteTokenizer(), batch_size=4, engram_tables=tables)
    got = scorer.loglikelihood(REQUESTS)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-6, atol=1e-5)
    assert [g[1] for g in got] == [w[1] for w in want]
    gen = [("def ", {"max_gen_toks": 8})]
    assert scorer.generate_until(gen) == Scorer(dense, ByteTokenizer()).generate_until(gen)
    exported = load_scorer(export_dir=export_model(cfg, sparse, str(tmp_path / "export"), engram_tables=tables))
    assert exported.engram_tables is not None
    np.testing.assert_allclose([g[0] for g in exported.loglikelihood(REQUESTS)], [g[0] for g in got], rtol=0, atol=1e-5)


def test_trainer_with_sparse_tables_resumes_bitwise_and_prefetch_changes_nothing(tmp_path, prose_path):
    """Rows prefetched while the previous step runs (and refreshed after its update) give the same run as
    gathering after the update; the host tables and row moments resume bitwise from an Orbax checkpoint."""


    cfg = load_config("tiny", [
        "data.batch_size=8", "training.steps=6", "checkpoint.every=3", "training.eval_every=6",
        "training.diagnostics_every=6", "training.sample_tokens=4", f"data.dataset=text:{prose_path}",
        "engram.enabled=true", "engram.layers=[1]", "engram.heads_per_ngram=2", "engram.head_dim=8",
        "engram.table_size=97", "engram.placement=host"])
    assert cfg.engram.sparse
    on, off = str(tmp_path / "on"), str(tmp_path / "off")
    result = run(cfg, on, progress=False)
    run(cfg.replace(engram={"rows_prefetch": False}, training={"sample_tokens": 0}), off, progress=False)
    assert _losses(on) == _losses(off) and len(_losses(on)) == 6
    assert result.sample.startswith(cfg.training.sample_prompt)  # generation reads the host tables
    diag = [r for r in read_metrics(on, "diagnostics") if "engram1_gate_mean" in r][-1]
    assert 0 < diag["engram1_gate_mean"] < 1 and 0 < diag["engram1_unique_rows_frac"] <= 1
    assert 0 < diag["engram1_table_touched_frac"] <= 1

    ckpt = Checkpointer(os.path.join(on, "checkpoints"), cfg.checkpoint)
    final = load_tables(ckpt, cfg, 6)
    ckpt.close()
    assert final.count == 6
    # Scoring from the checkpoint (model + host tables) equals scoring from its export.
    from mhc_jax.export import export_workdir
    from mhc_jax.scoring import load_scorer
    from_ckpt = load_scorer(workdir=on).loglikelihood(REQUESTS)
    from_export = load_scorer(export_dir=export_workdir(on, str(tmp_path / "export"))).loglikelihood(REQUESTS)
    assert np.isfinite([x[0] for x in from_ckpt]).all()
    np.testing.assert_allclose([x[0] for x in from_ckpt], [x[0] for x in from_export], rtol=0, atol=1e-5)
    shutil.rmtree(os.path.join(on, "checkpoints", "6"))  # resume from step 3: tables, moments, data
    run(cfg.replace(training={"sample_tokens": 0}), on, progress=False)
    assert _losses(on) == _losses(off)
    ckpt = Checkpointer(os.path.join(on, "checkpoints"), cfg.checkpoint)
    again = load_tables(ckpt, cfg, 6)
    ckpt.close()
    for a, b in zip(final.state_dict()["layer_1"].values(), again.state_dict()["layer_1"].values()):
        np.testing.assert_array_equal(a, b)


def test_compiled_step_memory_does_not_depend_on_the_table_size():
    """The sparse step's arguments and temporaries hold the batch's rows, never a table: 100x more rows
    compile to the same bytes (dense tables grow them)."""

    def compiled_bytes(update: str, table_size: int) -> int:
        cfg = make_cfg(update, table_size=table_size, heads_per_ngram=2)
        compiled, _, _ = aot.compile_train_step(cfg, jax.devices()[:1])
        mem = compiled.memory_analysis()
        return mem.argument_size_in_bytes + mem.temp_size_in_bytes

    small, large = compiled_bytes("sparse", 1_000), compiled_bytes("sparse", 100_000)
    assert small == large
    assert compiled_bytes("dense", 100_000) > large + 3 * 4 * 100_000 * 4  # table + moments, >= 4 heads x 100k rows


def test_hit_rates_count_distinct_rows_over_ids_for_dense_and_sparse_tables():

    _, _, cfg, _, tables = dense_and_sparse()
    ids = covering_ids(cfg, 0, cover=False)
    feed = tables.feed(ids, cfg.engram_row_bucket)
    sparse = tables.hit_stats(feed, B * T * ids.shape[-1])
    dense = dense_hit_stats(cfg, {"engram_ids": ids})
    for l, layer in enumerate(cfg.engram.layers):
        want = sum(np.unique(ids[:, :, l, j]).size for j in range(ids.shape[-1])) / (B * T * ids.shape[-1])
        assert sparse[f"engram{layer}_unique_rows_frac"] == dense[f"engram{layer}_unique_rows_frac"] == want
        assert sparse[f"engram{layer}_table_touched_frac"] == 0.0  # nothing applied yet
