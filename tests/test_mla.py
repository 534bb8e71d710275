"""Multi-head Latent Attention (model.attention=mla): the forward pass against a float64 numpy reference written
from DeepSeek-V3's equations (Sec. 2.1.1, Eq. 1-11), implementations agreeing, cached absorbed-weight decoding
equal to full recompute, a cache of kv_lora_rank + qk_rope_head_dim values per token, scan and training."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax.config import ConfigError, load_config
from mhc_jax.model import Transformer, count_params
from mhc_jax.model.mla import MLA
from mhc_jax.train.step import loss_and_grads

from references import decode_in_steps, randomize

MLA_TINY = ["model.attention=mla", "model.d_model=32", "model.n_heads=4", "model.kv_lora_rank=16",
            "model.qk_rope_head_dim=8", "model.qk_nope_head_dim=12", "model.v_head_dim=10", "model.max_seq_len=32",
            "data.seq_len=16", "model.scan_layers=false"]  # per-block layout; the scanned case sets it back


def _mla(overrides=(), window=0, seed=0):
    cfg = load_config("tiny", MLA_TINY + ["model.dtype=float32", *overrides])
    layer = MLA(cfg.model, dtype=jnp.float32, out_std=0.02, rngs=nnx.Rngs(0), window=window)
    return cfg, randomize(layer, seed, scale=0.3)


def _np(x):
    return np.asarray(x, np.float64)


def ref_rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def ref_rope(x, pos, theta):
    """Rotates pairs (x_i, x_{i + d/2}) by pos * theta^(-2i/d) (the half-split layout) in float64."""
    d = x.shape[-1]
    ang = pos[..., None].astype(np.float64) * theta ** (-np.arange(d // 2) * 2.0 / d)  # (B, T, d/2)
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def ref_mla(layer: MLA, cfg, h, pos, seg, window=0):
    """DeepSeek-V3 Eq. 1-11 in float64 with an explicit mask loop (causal, same segment, window)."""
    m = cfg.model
    O, I = m.qk_nope_head_dim, m.qk_rope_head_dim
    p = lambda name: _np(getattr(layer, name)[...])  # noqa: E731
    if m.q_lora_rank:
        cq = ref_rms_norm(h @ p("wdq_Cq"), _np(layer.q_norm.scale[...]), m.norm_eps)  # Eq. 6
        q = np.einsum("bty,yhd->bthd", cq, p("wuq_qHD"))  # Eq. 7-8
    else:
        q = np.einsum("btc,chd->bthd", h, p("wq_CHD"))
    q_nope, q_rope = q[..., :O], ref_rope(q[..., O:], pos, m.rope_theta)
    ckv = ref_rms_norm(h @ p("wdkv_Cc"), _np(layer.kv_norm.scale[...]), m.norm_eps)  # Eq. 1
    k_nope = np.einsum("btp,pho->btho", ckv, p("wuk_cHo"))  # Eq. 2
    k_rope = ref_rope((h @ p("wkr_Cd"))[:, :, None], pos, m.rope_theta)[:, :, 0]  # Eq. 3, shared by heads
    v = np.einsum("btp,phv->bthv", ckv, p("wuv_cHv"))  # Eq. 5
    mscale = 1.0 if m.rope_scaling_factor <= 1 else 0.1 * math.log(m.rope_scaling_factor) + 1.0
    scale = mscale ** 2 / math.sqrt(O + I)
    B, T, H = q.shape[:3]
    out = np.zeros((B, T, H, m.v_head_dim))
    for b in range(B):
        for t in range(T):
            keys = [s for s in range(T) if s <= t and seg[b, s] == seg[b, t] and (not window or t - s < window)]
            for hh in range(H):
                logits = np.array([(q_nope[b, t, hh] @ k_nope[b, s, hh] + q_rope[b, t, hh] @ k_rope[b, s])
                                   * scale for s in keys])
                w = np.exp(logits - logits.max())
                w /= w.sum()
                out[b, t, hh] = w @ v[b, keys, hh]  # Eq. 10
    return np.einsum("bthv,hvc->btc", out, p("wo_HvC"))  # Eq. 11


def _inputs(cfg, B=2, T=12, packed=True, seed=0):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((B, T, cfg.model.d_model))
    seg = np.ones((B, T), np.int32)
    pos = np.tile(np.arange(T), (B, 1))
    if packed:  # row 0 holds two documents
        seg[0, 5:] = 2
        pos[0, 5:] = np.arange(T - 5)
    return h, pos.astype(np.int32), seg


@pytest.mark.parametrize("overrides,window", [
    ([], 0),
    (["model.q_lora_rank=12"], 0),
    (["model.rope_scaling_factor=40.0", "model.v_head_dim=24"], 0),
    (["model.attention_window=4", "model.attention_impl=chunked", "model.attention_block=4"], 4),
], ids=["full-rank-q", "low-rank-q", "yarn-mscale+wide-v", "window+chunked"])
def test_mla_forward_equals_float64_reference(overrides, window):
    cfg, layer = _mla(overrides, window=window)
    h, pos, seg = _inputs(cfg)
    out, cache = layer(jnp.asarray(h, jnp.float32), jnp.asarray(pos), jnp.asarray(seg))
    assert cache is None
    np.testing.assert_allclose(_np(out), ref_mla(layer, cfg, h, pos, seg, window), rtol=2e-4, atol=2e-5)


def test_chunked_and_xla_mla_agree_in_outputs_and_gradients():
    cfg, layer = _mla()
    h, pos, seg = (jnp.asarray(a) for a in _inputs(cfg, T=16))
    h = h.astype(jnp.float32)
    chunked = MLA(load_config("tiny", MLA_TINY + ["model.attention_impl=chunked", "model.attention_block=4"]).model,
                  dtype=jnp.float32, out_std=0.02, rngs=nnx.Rngs(0))
    nnx.update(chunked, nnx.state(layer))

    def loss(mod):
        return jnp.sum(jnp.sin(mod(h, pos, seg)[0]))

    chex.assert_trees_all_close(chunked(h, pos, seg)[0], layer(h, pos, seg)[0], atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(nnx.grad(loss)(chunked), nnx.grad(loss)(layer), atol=1e-4, rtol=1e-4)


def _model(overrides=()):
    cfg = load_config("tiny", MLA_TINY + list(overrides))
    return cfg, randomize(Transformer(cfg, rngs=nnx.Rngs(0)), 1, scale=0.2)


@pytest.mark.parametrize("overrides", [[], ["model.q_lora_rank=8", "residual.kind=mhc"],
                                       ["model.attention_window=5", "model.global_every=2"]],
                         ids=["plain", "lowrank-q+mhc", "window-ring"])
def test_cached_absorbed_decoding_equals_full_recompute(overrides):
    cfg, model = _model(overrides)
    t = jax.random.randint(jax.random.key(0), (2, 14), 0, cfg.model.vocab_size)
    chex.assert_trees_all_close(decode_in_steps(model, t, 8, 32), model(t), atol=1e-4, rtol=1e-4)


def test_cache_holds_only_the_latent_and_the_rope_key_per_token():
    cfg, model = _model()
    cache = model.init_cache(3, 32)
    m = cfg.model
    for layer in cache:
        assert set(layer["attn"]) == {"ckv", "krope", "pos"}
        chex.assert_shape(layer["attn"]["ckv"], (3, 32, m.kv_lora_rank))
        chex.assert_shape(layer["attn"]["krope"], (3, 32, m.qk_rope_head_dim))


def test_scanned_mla_model_equals_the_unrolled_one():
    cfg_u, unrolled = _model(["model.n_layers=3", "model.scan_layers=false"])
    scanned = Transformer(load_config("tiny", MLA_TINY + ["model.n_layers=3", "model.scan_layers=true"]),
                          rngs=nnx.Rngs(0))
    assert count_params(scanned) == count_params(unrolled)
    unrolled = Transformer(cfg_u, rngs=nnx.Rngs(0))
    t = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg_u.model.vocab_size)
    chex.assert_trees_all_close(scanned(t), unrolled(t), atol=1e-5, rtol=1e-5)


def test_tiny_mla_model_learns_a_repeated_batch():
    cfg, model = _model(["residual.kind=mhc"])
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 256, (4, 17)).astype(np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": np.ones((4, 16), np.int32),
             "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1)), "loss_mask": np.ones((4, 16), np.float32)}
    batch = jax.tree.map(jnp.asarray, batch)
    import optax
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, batch):
        loss, grads, _ = loss_and_grads(model, batch)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt, batch)) for _ in range(30)]
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses


def test_mla_and_mtp_matrices_take_weight_decay_and_their_norms_do_not():
    from mhc_jax.train.optimizer import group_table
    cfg, model = _model(["model.q_lora_rank=8", "model.mtp_depth=1"])
    groups = {"/".join(map(str, k)): g for k, g in group_table(nnx.state(model, nnx.Param)).items()}
    for name in ("wdq_Cq", "wuq_qHD", "wdkv_Cc", "wkr_Cd", "wuk_cHo", "wuv_cHv", "wo_HvC"):
        assert groups[f"blocks/0/attn/{name}"] == "decay", name
    assert groups["blocks/0/attn/kv_norm/scale"] == groups["blocks/0/attn/q_norm/scale"] == "no_decay"
    assert groups["mtp/0/w_hidden_CC"] == groups["mtp/0/block/attn/wuk_cHo"] == "decay"
    assert groups["mtp/0/hidden_norm/scale"] == "no_decay"


def test_mla_refuses_fused_kernels_and_non_rope_positions():
    with pytest.raises(ConfigError, match="attention_impl"):
        load_config("tiny", MLA_TINY + ["model.attention_impl=splash"])
    with pytest.raises(ConfigError, match="model.position"):
        load_config("tiny", MLA_TINY + ["model.position=alibi"])
    with pytest.raises(ConfigError, match="rope_scaling_factor"):
        load_config("tiny", ["model.rope_scaling_factor=4.0"])
    with pytest.raises(ConfigError, match="qk_rope_head_dim"):
        load_config("tiny", MLA_TINY + ["model.qk_rope_head_dim=7"])


def test_attention_maps_of_an_mla_model_are_the_weights_its_output_is_built_from():
    from mhc_jax.interpret import attention_maps, attention_probs
    cfg, layer = _mla(["model.q_lora_rank=12"])
    h, pos, seg = _inputs(cfg)
    x = jnp.asarray(h, jnp.float32)
    probs_BHTS = np.asarray(attention_probs(layer, x, jnp.asarray(pos), jnp.asarray(seg)), np.float64)
    ckv_BTc, _ = layer.latents(x, jnp.asarray(pos))
    v_BTHv = np.einsum("btp,phv->bthv", _np(ckv_BTc), _np(layer.wuv_cHv[...]))
    out = np.einsum("bhts,bshv,hvc->btc", probs_BHTS, v_BTHv, _np(layer.wo_HvC[...]))
    np.testing.assert_allclose(out, _np(layer(x, jnp.asarray(pos), jnp.asarray(seg))[0]), rtol=1e-4, atol=1e-5)
    assert probs_BHTS[0, :, 6, :5].max() == 0.0  # the second document never sees the first
    _, model = _model()
    maps = attention_maps(model, np.arange(10)[None] % 200)
    chex.assert_shape(maps, (cfg.model.n_layers, 1, cfg.model.n_heads, 10, 10))
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
    assert np.triu(maps[0, 0, 0], 1).max() == 0.0


@pytest.mark.multidevice
def test_sharded_mla_mtp_loss_and_grads_equal_single_device():
    """MLA's latent / head axes and the MTP modules under data, fsdp and tensor parallelism (8 CPU devices)."""
    from test_sharding import check_sharded_loss_and_grads, make_cfg

    cfg = make_cfg("mhc").replace(model={"attention": "mla", "mtp_depth": 1, "q_lora_rank": 8})
    p_sh = check_sharded_loss_and_grads(cfg, [(2, 2, 2)])
    assert p_sh["blocks"][0]["attn"]["wuk_cHo"].spec == jax.sharding.PartitionSpec(None, "tensor", None)


@pytest.mark.parametrize("kind", ["mhc_lite"])
def test_cached_generation_with_engram_equals_recomputing_every_step(kind):
    """MLA's latent cache beside the Engram conv state, under mHC-lite connections (an MTP module present but unused): sampled tokens equal
    those of a model that recomputes the whole sequence at every step."""
    from mhc_jax.data.tokenizer import load_tokenizer
    from mhc_jax.engram.ids import EngramIds
    from mhc_jax.sampling import generate

    cfg, model = _model([f"residual.kind={kind}", "engram.enabled=true", "engram.layers=[1]",
                         "engram.heads_per_ngram=2", "engram.head_dim=8", "engram.table_size=101",
                         "model.mtp_depth=1"])
    kw = dict(temperature=1.0, top_k=20, seed=2, engram_ids=EngramIds(cfg.engram, load_tokenizer("byte")))
    cached = generate(model, [256, 10, 20, 30], 10, **kw)
    assert cached == generate(model, [256, 10, 20, 30], 10, use_cache=False, **kw)
