"""Multi-token prediction (model.mtp_depth, DeepSeek-V3 Sec. 2.2): the training objective and the logged MTP
loss equal a float64 numpy reference of a whole tiny model written from the paper's Eq. 21-25 (packed documents,
masked padding), and the modules are off at evaluation and generation."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax.config import load_config
from mhc_jax.model import Transformer
from mhc_jax.train.step import _loss_and_grads, loss_sum_and_count, objective_terms

from references import randomize

TINY = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=2", "model.d_ff=24",
        "model.max_seq_len=16", "data.seq_len=12", "model.dtype=float32", "model.mtp_depth=2",
        "model.mtp_loss_weight=0.5"]


def _np(v):
    return np.asarray(v[...], np.float64)


def rms(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * _np(scale)


def rope(x, pos, theta=10000.0):
    d = x.shape[-1]
    ang = pos[..., None] * theta ** (-np.arange(d // 2) * 2.0 / d)
    c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    return np.concatenate([x[..., :d // 2] * c - x[..., d // 2:] * s, x[..., d // 2:] * c + x[..., :d // 2] * s], -1)


def ref_block(blk, x, pos, seg):
    """Pre-norm block with a plain residual: x + Attn(RMSNorm x), then x + SwiGLU(RMSNorm x); causal, same document."""
    h = rms(x, blk.attn_norm.scale)
    q = rope(np.einsum("btc,chd->bthd", h, _np(blk.attn.wq_CHD)), pos)
    k = rope(np.einsum("btc,chd->bthd", h, _np(blk.attn.wk_CKD)), pos)
    v = np.einsum("btc,chd->bthd", h, _np(blk.attn.wv_CKD))
    T = x.shape[1]
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    ok = (np.arange(T)[None, :, None] >= np.arange(T)[None, None, :]) & (seg[:, :, None] == seg[:, None, :])
    s = np.where(ok[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    x = x + np.einsum("bhts,bshd,hdc->btc", p, v, _np(blk.attn.wo_HDC))
    h = rms(x, blk.mlp_norm.scale)
    g = h @ _np(blk.mlp.w_gate_CF)
    return x + (g / (1 + np.exp(-g)) * (h @ _np(blk.mlp.w_up_CF))) @ _np(blk.mlp.w_down_FC)


def nll(logits, targets):
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, targets[..., None], -1)[..., 0]


def ref_objective(model, batch, weight, depth):
    """(objective, main loss, MTP loss): Eq. 21-25 with the main model's hidden state as h^0."""
    E = _np(model.embed_VC)
    head = E.T if model.head_CV is None else _np(model.head_CV)
    tok, tgt, seg, pos = (np.asarray(batch[k]) for k in ("inputs", "targets", "segment_ids", "positions"))
    mask = np.asarray(batch["loss_mask"], np.float64)
    h = ref_block(model.blocks[0], E[tok], pos, seg)
    count = mask.sum()
    main = (nll(rms(h, model.final_norm.scale) @ head, tgt) * mask).sum()
    B, T = tok.shape
    mtp = 0.0
    for k in range(1, depth + 1):
        mod = model.mtp[k - 1]
        ahead = np.zeros_like(tok)
        ahead[:, :T - k] = tok[:, k:]  # Emb(t_{i+k}), Eq. 21
        x = rms(h, mod.hidden_norm.scale) @ _np(mod.w_hidden_CC) + rms(E[ahead], mod.embed_norm.scale) @ _np(
            mod.w_embed_CC)
        h = ref_block(mod.block, x, pos, seg)  # Eq. 22
        logits = rms(h, mod.out_norm.scale) @ head  # Eq. 23, shared head
        for b in range(B):
            for i in range(T - k):  # predicts t_{i+k+1} = targets[i + k], inside position i's document
                if seg[b, i + k] == seg[b, i]:
                    mtp += mask[b, i + k] * nll(logits[b, i][None], tgt[b, i + k][None])[0] / depth
    return (main + weight * mtp) / count, main / count, mtp / count  # Eq. 24-25: 1/T, mean over depths


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 259, (2, 13)).astype(np.int32)
    seg = np.ones((2, 12), np.int32)
    pos = np.tile(np.arange(12, dtype=np.int32), (2, 1))
    seg[0, 7:] = 2  # row 0: two packed documents
    pos[0, 7:] = np.arange(5)
    mask = np.ones((2, 12), np.float32)
    mask[1, 10:] = 0  # row 1 ends in padding
    seg[1, 10:] = 0
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg, "positions": pos, "loss_mask": mask}


@pytest.mark.parametrize("overrides", [[], ["model.tie_embeddings=false", "model.mtp_depth=1"]], ids=["tied-2", "untied-1"])
def test_mtp_objective_and_metric_equal_a_float64_reference(overrides):
    cfg = load_config("tiny", TINY + overrides)
    model = randomize(Transformer(cfg, rngs=nnx.Rngs(0)), 3, scale=0.3)
    batch = _batch()
    ref_obj, ref_main, ref_mtp = ref_objective(model, batch, cfg.model.mtp_loss_weight, cfg.model.mtp_depth)
    jbatch = jax.tree.map(jnp.asarray, batch)
    numerator, (count, _, _) = objective_terms(model, jbatch)
    np.testing.assert_allclose(float(numerator / count), ref_obj, rtol=1e-5)
    loss, _, _, mtp_loss, _ = _loss_and_grads(model, jbatch, 1)
    np.testing.assert_allclose(float(loss), ref_main, rtol=1e-5)
    np.testing.assert_allclose(float(mtp_loss), ref_mtp, rtol=1e-5)
    assert ref_mtp > 0


def test_mtp_gradients_reach_the_modules_accumulate_like_one_batch_and_survive_remat():
    cfg = load_config("tiny", TINY)
    model = randomize(Transformer(cfg, rngs=nnx.Rngs(0)), 3, scale=0.3)
    batch = jax.tree.map(jnp.asarray, _batch())
    loss1, (g1, _), _, mtp1, _ = _loss_and_grads(model, batch, 1)
    loss2, (g2, _), _, mtp2, _ = _loss_and_grads(model, batch, 2)
    g = nnx.to_pure_dict(g1)
    assert float(jnp.abs(g["mtp"][1]["w_embed_CC"]).sum()) > 0  # depth 2 learns
    np.testing.assert_allclose(float(mtp1), float(mtp2), rtol=1e-5)
    np.testing.assert_allclose(float(loss1), float(loss2), rtol=1e-5)
    model.remat = "full"
    _, (g3, _), _, _, _ = nnx.jit(_loss_and_grads, static_argnums=2)(model, batch, 1)
    chex.assert_trees_all_close(nnx.to_pure_dict(g3), g, atol=1e-6, rtol=1e-4)


def test_mtp_is_off_at_evaluation_and_generation():
    cfg = load_config("tiny", TINY)
    with_mtp = randomize(Transformer(cfg, rngs=nnx.Rngs(0)), 3, scale=0.3)
    batch = jax.tree.map(jnp.asarray, _batch())
    kw = dict(positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"])
    logits, mtp_logits = with_mtp.with_mtp(batch["inputs"], **kw)
    assert len(mtp_logits) == 2
    chex.assert_trees_all_close(with_mtp(batch["inputs"], **kw), logits, atol=1e-6)
    ref_obj, ref_main, _ = ref_objective(with_mtp, _batch(), 0.5, 2)
    s, c = loss_sum_and_count(with_mtp, batch)  # the evaluation loss: the main model's only
    np.testing.assert_allclose(float(s / c), ref_main, rtol=1e-5)
    cache = with_mtp.init_cache(2, 16)
    assert len(cache) == cfg.model.n_layers  # no cache (and no decoding work) for the MTP modules
