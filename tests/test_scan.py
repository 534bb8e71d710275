"""model.scan_layers: runs of identical blocks as one lax.scan over stacked parameters must compute exactly
what the unrolled loop of blocks computes (outputs, gradients, cached generation), with Engram blocks kept
out of the stacks, and a workdir written with the other layout is refused with a clear message."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax.config import ConfigError, load_config, save_config, to_dict
from mhc_jax.generate import generate
from mhc_jax.model.transformer import Block, BlockStack, Transformer, block_groups, count_params
from mhc_jax.train.optimizer import group_table
from mhc_jax.train.step import loss_and_grads

ENGRAM = ["residual.kind=mhc", "engram.enabled=true", "engram.layers=[1]", "engram.heads_per_ngram=2",
          "engram.head_dim=8", "engram.table_size=101"]
ALTERNATING = ["model.attention_window=8", "model.global_every=2"]  # local / global windows in turn (seq_len 32)


def _cfg(scan: bool, *overrides):
    return load_config("tiny", ["model.n_layers=4", f"model.scan_layers={str(scan).lower()}", *overrides])


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    B, T = 2, cfg.data.seq_len
    toks = rng.integers(0, 256, (B, T + 1)).astype(np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": np.ones((B, T), np.int32),
             "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)), "loss_mask": np.ones((B, T), np.float32)}
    if cfg.engram.enabled:
        from mhc_jax.data.tokenizer import load_tokenizer
        from mhc_jax.engram.ids import EngramIds
        batch["engram_ids"] = EngramIds(cfg.engram, load_tokenizer("byte"))(batch["inputs"], batch["segment_ids"])
    return batch


def _unstack(scanned_tree, unrolled_model):
    """The scanned model's per-parameter tree laid out like the unrolled model's `blocks` list."""
    out = []
    for group in scanned_tree:
        if "layers" in group:
            n = jax.tree.leaves(group["layers"])[0].shape[0]
            out.extend(jax.tree.map(lambda a, j=j: a[j], group["layers"]) for j in range(n))
        else:
            out.append(group)
    return out


def test_block_groups_keep_engram_blocks_out_of_the_stacks():
    cfg = load_config("configs/paper/engram_27b.yaml")
    groups = block_groups(cfg)
    assert groups == [(0,), (1,), tuple(range(2, 15)), (15,), tuple(range(16, 30))]
    assert block_groups(load_config("tiny", ["model.n_layers=5"])) == [tuple(range(5))]


@pytest.mark.parametrize("n_layers,global_every,groups,period", [
    (4, 2, [(0, 1, 2, 3)], 2),  # L G L G: one scan over 2 periods of (local, global)
    (5, 2, [(0, 1, 2, 3), (4,)], 2),  # a tail shorter than a period stays out
    (8, 3, [tuple(range(6)), (6, 7)], 3),  # L L G L L G | L L: the tail is a run of equal blocks
    (8, 6, [tuple(range(5)), (5,), (6, 7)], 1),  # L L L L L G L L repeats no period: runs of equal windows
])
def test_periodic_window_patterns_scan_as_one_group(n_layers, global_every, groups, period):
    cfg = load_config("tiny", [f"model.n_layers={n_layers}", "model.attention_window=8",
                               f"model.global_every={global_every}"])
    assert block_groups(cfg) == groups
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    stack = model.blocks[0]
    assert isinstance(stack, BlockStack) and stack.period == period
    # Checkpoints hold the stacked layout: one array per parameter with a leading axis over the group's layers.
    assert stack.layers.attn.wq_CHD[...].shape[0] == len(groups[0])
    windows = [b.attn.window for b in model.layers()]
    assert windows == [0 if (i + 1) % global_every == 0 else 8 for i in range(n_layers)]


@pytest.mark.parametrize("overrides", [[], ENGRAM, ["training.remat=full", "residual.kind=hc"], ALTERNATING,
                                       [*ALTERNATING, "training.remat=save_matmuls", "residual.kind=mhc"],
                                       ["residual.kind=mhc", "model.scan_unroll=2"]],
                         ids=["plain", "mhc+engram", "hc+remat", "alternating", "alternating+mhc+remat",
                              "mhc+scan_unroll"])
def test_scanned_model_equals_the_unrolled_loop_in_outputs_and_gradients(overrides):
    unrolled = Transformer(_cfg(False, *overrides), rngs=nnx.Rngs(0))
    scanned = Transformer(_cfg(True, *overrides), rngs=nnx.Rngs(0))
    assert any(isinstance(b, BlockStack) for b in scanned.blocks)
    assert all(isinstance(b, Block) for b in unrolled.blocks)
    assert count_params(scanned) == count_params(unrolled)
    # Same initialisation, layer by layer (the stack is built from Block(cfg, i) in order).
    pure_s, pure_u = nnx.to_pure_dict(nnx.state(scanned)), nnx.to_pure_dict(nnx.state(unrolled))
    chex.assert_trees_all_equal(_unstack([pure_s["blocks"][i] for i in sorted(pure_s["blocks"])], unrolled),
                                [pure_u["blocks"][i] for i in sorted(pure_u["blocks"])])

    batch = jax.tree.map(jnp.asarray, _batch(unrolled.cfg))
    kw = dict(positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"],
              engram_ids_BTEG=batch.get("engram_ids"))
    chex.assert_trees_all_close(scanned(batch["inputs"], **kw), unrolled(batch["inputs"], **kw), atol=1e-5, rtol=1e-5)
    loss_s, grads_s, _ = nnx.jit(loss_and_grads)(scanned, batch)
    loss_u, grads_u, _ = nnx.jit(loss_and_grads)(unrolled, batch)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    gs, gu = nnx.to_pure_dict(grads_s), nnx.to_pure_dict(grads_u)
    chex.assert_trees_all_close(_unstack([gs["blocks"][i] for i in sorted(gs["blocks"])], unrolled),
                                [gu["blocks"][i] for i in sorted(gu["blocks"])], atol=1e-6, rtol=1e-4)
    chex.assert_trees_all_close(gs["embed_VC"], gu["embed_VC"], atol=1e-6, rtol=1e-4)


def test_stacked_parameters_keep_their_weight_decay_group_and_shard_like_one_layer():
    scanned = Transformer(_cfg(True), rngs=nnx.Rngs(0))
    unrolled = Transformer(_cfg(False), rngs=nnx.Rngs(0))
    gs, gu = group_table(nnx.state(scanned, nnx.Param)), group_table(nnx.state(unrolled, nnx.Param))
    for path, group in gu.items():
        if path[0] == "blocks":
            assert gs[("blocks", "0", "layers", *path[2:])] == group, path
    wq = scanned.blocks[0].layers.attn.wq_CHD
    assert wq.get_metadata()["axes"][0] == "layers" and wq[...].shape[0] == 4


@pytest.mark.parametrize("overrides", [ENGRAM, ALTERNATING], ids=["mhc+engram", "alternating"])
def test_cached_generation_of_a_scanned_model_equals_the_unrolled_model(overrides):
    cfg_u, cfg_s = _cfg(False, *overrides), _cfg(True, *overrides)
    ids = None
    if cfg_u.engram.enabled:
        from mhc_jax.data.tokenizer import load_tokenizer
        from mhc_jax.engram.ids import EngramIds
        ids = EngramIds(cfg_u.engram, load_tokenizer("byte"))
    kw = dict(temperature=1.0, top_k=20, seed=1, engram_ids=ids)
    # 4 + 12 tokens: past the 8-slot ring of the windowed layers
    out_s = generate(Transformer(cfg_s, rngs=nnx.Rngs(3)), [256, 10, 20, 30], 12, **kw)
    assert out_s == generate(Transformer(cfg_u, rngs=nnx.Rngs(3)), [256, 10, 20, 30], 12, **kw)


def _dots(cfg) -> int:
    """Matrix products in the lowered (not yet optimised) training forward: one per product of each block
    body the program holds."""
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.zeros((2, cfg.data.seq_len), jnp.int32)
    return nnx.jit(lambda m, t: m(t)).lower(model, tokens).as_text().count("dot_general")


def test_alternating_windows_compile_to_a_program_whose_size_does_not_grow_with_depth():
    scanned = [_dots(_cfg(True, *ALTERNATING, f"model.n_layers={n}")) for n in (4, 8)]
    unrolled = [_dots(_cfg(False, *ALTERNATING, f"model.n_layers={n}")) for n in (4, 8)]
    assert scanned[0] == scanned[1], scanned  # one scan body of 2 blocks, whatever the depth
    assert unrolled[1] > unrolled[0] > scanned[0], (unrolled, scanned)


def test_moe_statistics_of_a_periodic_scan_come_out_in_block_order():
    cfg = _cfg(False, *ALTERNATING, "model.ffn=moe", "model.n_routed_experts=8", "model.experts_per_token=2",
               "model.moe_d_ff=16", "model.first_dense_layers=0")
    batch = jax.tree.map(jnp.asarray, _batch(cfg))
    from mhc_jax.train.step import _loss_and_grads
    grads = nnx.jit(lambda model, b: _loss_and_grads(model, b, 1))
    scanned = Transformer(cfg.replace(model={"scan_layers": True}), rngs=nnx.Rngs(0))
    assert isinstance(scanned.blocks[0], BlockStack) and scanned.blocks[0].period == 2
    out_u, out_s = grads(Transformer(cfg, rngs=nnx.Rngs(0)), batch), grads(scanned, batch)
    assert out_u[4]["load_LI"].shape == (4, 8)
    assert not np.allclose(out_u[4]["load_LI"][0], out_u[4]["load_LI"][1])  # layers route differently
    chex.assert_trees_all_close(out_s[4], out_u[4], rtol=1e-5)


def test_resuming_a_workdir_of_the_other_layout_fails_naming_scan_layers(tmp_path):
    from mhc_jax.train.loop import resume_changes
    for saved, now in ((False, True), (True, False)):  # the config stored in the checkpoint vs. this run's
        with pytest.raises(ConfigError) as err:
            resume_changes(to_dict(_cfg(saved)), _cfg(now), f"workdir {str(tmp_path)!r}")
        message = str(err.value)
        saved_name, now_name = ("unscanned", "scanned") if not saved else ("scanned", "unscanned")
        assert f"checkpoint in the {saved_name} (" in message and f"builds the {now_name} (" in message
        assert f"resume with model.scan_layers={str(saved).lower()}" in message
