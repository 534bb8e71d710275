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


@pytest.mark.parametrize("overrides", [[], ENGRAM, ["training.remat=full", "residual.kind=hc"]],
                         ids=["plain", "mhc+engram", "hc+remat"])
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


def test_cached_generation_of_a_scanned_model_equals_the_unrolled_model():
    cfg_u, cfg_s = _cfg(False, *ENGRAM), _cfg(True, *ENGRAM)
    from mhc_jax.data.tokenizer import load_tokenizer
    from mhc_jax.engram.ids import EngramIds
    ids = EngramIds(cfg_u.engram, load_tokenizer("byte"))
    kw = dict(temperature=1.0, top_k=20, seed=1, engram_ids=ids)
    out_s = generate(Transformer(cfg_s, rngs=nnx.Rngs(3)), [256, 10, 20, 30], 8, **kw)
    assert out_s == generate(Transformer(cfg_u, rngs=nnx.Rngs(3)), [256, 10, 20, 30], 8, **kw)


def test_resuming_a_workdir_of_the_other_layout_fails_naming_scan_layers(tmp_path):
    from mhc_jax.train.loop import resume_changes
    for saved, now in ((False, True), (True, False)):  # the config stored in the checkpoint vs. this run's
        with pytest.raises(ConfigError) as err:
            resume_changes(to_dict(_cfg(saved)), _cfg(now), f"workdir {str(tmp_path)!r}")
        message = str(err.value)
        saved_name, now_name = ("unscanned", "scanned") if not saved else ("scanned", "unscanned")
        assert f"checkpoint in the {saved_name} (" in message and f"builds the {now_name} (" in message
        assert f"resume with model.scan_layers={str(saved).lower()}" in message
