"""Attention patterns (causal, sliding window, packed segments), positions (ALiBi) and implementations
(xla, chunked, splash in Pallas interpret mode, cuDNN on GPUs) against a float64 numpy reference, forward
and backward; chunked memory linear in T; windowed packed documents never leak; ring-buffer generation."""

import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax.config import ConfigError, load_config
from mhc_jax.model import Transformer
from mhc_jax.model import attention
from mhc_jax.model.alibi import alibi_slopes
from mhc_jax.model.attention import attend, resolve_impl
from mhc_jax.model.chunked_attention import block_pairs, chunked_attention
from mhc_jax.model.masks import layer_windows

# ------------------------------------------------------------------------------------------------
# float64 numpy reference: softmax(q k^T / sqrt(D) - slope * (i - j)) v over the visible keys, and its
# hand-derived gradients (dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)), dQ = dS K / sqrt(D), ...)
# ------------------------------------------------------------------------------------------------


def reference_mask(seg, window):
    """(B, T, T) bool written out element by element (independent of mhc_jax.model.masks)."""
    B, T = seg.shape
    mask = np.zeros((B, T, T), bool)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                mask[b, i, j] = j <= i and seg[b, i] == seg[b, j] and (window == 0 or i - j < window)
    return mask


def reference_attention(q, k, v, dout, seg, pos, window, slopes):
    """Output and (dq, dk, dv) in float64 for q (B, T, H, D), k / v (B, T, K, D), head h using kv head h // G."""
    q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
    B, T, H, D = q.shape
    G = H // k.shape[2]
    kh, vh = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)  # (B, T, H, D)
    s = np.einsum("bthd,bshd->bhts", q, kh) / np.sqrt(D)
    if slopes is not None:
        dist = pos[:, :, None] - pos[:, None, :]
        s = s - np.asarray(slopes)[None, :, None, None] * dist[:, None]
    mask = reference_mask(np.asarray(seg), window)[:, None]
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshd->bthd", p, vh)
    dv_h = np.einsum("bhts,bthd->bshd", p, dout)
    dp = np.einsum("bthd,bshd->bhts", dout, vh)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(D)
    dq = np.einsum("bhts,bshd->bthd", ds, kh)
    dk_h = np.einsum("bhts,bthd->bshd", ds, q)
    group = lambda x: x.reshape(B, T, -1, G, D).sum(3)  # noqa: E731  sum the gradients of a group's heads
    return out, (dq, group(dk_h), group(dv_h))


def inputs(T, H=4, K=2, D=8, B=2, packed=True, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q, dout = jax.random.normal(ks[0], (B, T, H, D)), jax.random.normal(ks[3], (B, T, H, D))
    k, v = jax.random.normal(ks[1], (B, T, K, D)), jax.random.normal(ks[2], (B, T, K, D))
    cut = T // 3 + 1  # row 0: two documents (the cut inside a block); row 1: one document
    seg = np.ones((B, T), np.int32)
    pos = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    if packed:
        seg[0, cut:] = 2
        pos[0, cut:] = np.arange(T - cut)
    return q, k, v, dout, jnp.asarray(seg), jnp.asarray(pos)


PATTERNS = {  # name: (window, alibi)
    "causal": (0, False),
    "window": (5, False),
    "alibi": (0, True),
    "alibi_window": (5, True),
}


def check_against_reference(impl, window, alibi, T, block, H=4, K=2, D=8, B=2, atol=2e-5):
    q, k, v, dout, seg, pos = inputs(T, H, K, D, B)
    slopes = tuple(alibi_slopes(H).tolist()) if alibi else None

    @jax.jit
    def run(q, k, v, dout):
        out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, seg, pos, impl=impl, window=window, slopes=slopes,
                                                  block=block), q, k, v)
        return out, vjp(dout)

    out, grads = run(q, k, v, dout)
    ref_out, ref_grads = reference_attention(q, k, v, dout, np.asarray(seg), np.asarray(pos), window, slopes)
    chex.assert_trees_all_close(np.asarray(out, np.float64), ref_out, atol=atol, rtol=1e-4)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        chex.assert_shape(g, r.shape)
        np.testing.assert_allclose(np.asarray(g, np.float64), r, atol=atol * 5, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_forward_and_backward_equal_float64_reference(impl, pattern):
    window, alibi = PATTERNS[pattern]
    # T=27 with blocks of 8: a padded last block, a window smaller than a block, a segment cut mid-block.
    check_against_reference(impl, window, alibi, T=27, block=8)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("H,K", [(4, 4), (6, 2)])
def test_dense_attention_equals_jax_dot_product_attention(H, K, dtype):
    """The xla impl's own einsums (heads grouped in the dots, for XLA:CPU's speed) keep
    jax.nn.dot_product_attention(implementation="xla")'s numerics: float32 logits and softmax, probabilities
    in the value dtype, the same masked-logit constant, with and without a logit bias and grouped kv heads.
    Outputs and gradients agree to float32 rounding, not bit for bit: a grouped (G T, D) dot and jax's per-head
    dots accumulate in an order XLA:CPU picks per dot shape and CPU (bit-equal on one 2-core machine, 3.6e-7
    apart with 6 heads over 2 kv heads on another). In bfloat16 the outputs' rounding absorbs that: at most
    1% of them may differ, by one bf16 step, while probabilities kept in float32 change 34% of them."""
    q, k, v, dout, seg, pos = inputs(16, H, K, 8, 2)
    q, k, v, dout = (x.astype(dtype) for x in (q, k, v, dout))
    mask = attention.visible_BTS(seg, 5)
    bias = jnp.asarray(np.random.default_rng(0).normal(size=(2, H, 16, 16)), jnp.float32)
    for b in (None, bias):
        ours = jax.vjp(lambda q, k, v: attention.dense_attention(q, k, v, mask, b), q, k, v)
        ref = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, bias=b, mask=mask[:, None],
                                                                   implementation="xla"), q, k, v)
        chex.assert_equal(ours[0].dtype, ref[0].dtype)
        if dtype == jnp.bfloat16:
            assert float(jnp.mean(ours[0] != ref[0])) <= 0.01, "bf16 outputs differ beyond float32 rounding"
            chex.assert_trees_all_close(ours[0].astype(jnp.float32), ref[0].astype(jnp.float32), rtol=2 ** -7,
                                        atol=0)
        else:
            chex.assert_trees_all_close(ours[0], ref[0], rtol=2e-5, atol=1e-6)
        chex.assert_trees_all_close(ours[1](dout), ref[1](dout), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("window", [0, 100])
def test_splash_forward_and_backward_equal_float64_reference(window):
    # Pallas interpret mode on CPU runs the same kernel the TPU compiles (see tests/test_aot.py); its blocks
    # are 128-lane tiles, so T=256 is two blocks (the window of 100 skips none, causal skips one).
    check_against_reference("splash", window, False, T=256, block=128, H=2, K=1, D=8, B=2)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_cudnn_forward_and_backward_equal_float64_reference(pattern):
    window, alibi = PATTERNS[pattern]
    q, k, v, dout, seg, pos = inputs(128, H=4, K=2, D=64)
    slopes = tuple(alibi_slopes(4).tolist()) if alibi else None
    bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, seg, pos, impl="cudnn", window=window, slopes=slopes),
                       bf(q), bf(k), bf(v))
    ref_out, ref_grads = reference_attention(bf(q), bf(k), bf(v), bf(dout), np.asarray(seg), np.asarray(pos),
                                             window, slopes)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref_out, atol=3e-2, rtol=3e-2)
    for g, r in zip(vjp(bf(dout)), ref_grads):
        np.testing.assert_allclose(np.asarray(g, np.float64), r, atol=6e-2, rtol=6e-2)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error raised off GPU")
def test_cudnn_off_gpu_is_a_clear_error():
    q, k, v, _, seg, pos = inputs(8)
    with pytest.raises(ConfigError, match="attention_impl='cudnn' needs an NVIDIA GPU"):
        attend(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), seg, pos, impl="cudnn")


# ------------------------------------------------------------------------------------------------
# Block skipping and memory
# ------------------------------------------------------------------------------------------------


def test_block_pairs_skip_exactly_the_fully_masked_blocks():
    n, b = 6, 4
    for window in (0, 1, 3, 4, 5, 9, 100):
        dense = reference_mask(np.ones((1, n * b), np.int32), window)[0]
        expected = {(i, j) for i in range(n) for j in range(n) if dense[i * b:(i + 1) * b, j * b:(j + 1) * b].any()}
        assert {tuple(p) for p in block_pairs(n, b, window).tolist()} == expected, window
    assert len(block_pairs(32, 512, 0)) == 32 * 33 // 2  # causal: the lower triangle of blocks
    assert len(block_pairs(32, 512, 512)) == 32 + 31  # a one-block window: the diagonal and one below


def _temp_bytes(impl, T, window=0):
    """Compiled temporary bytes of forward + backward (compile only, nothing runs)."""
    q = jax.ShapeDtypeStruct((1, T, 2, 64), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, T, 1, 64), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, T), jnp.int32)

    def loss(q, k, v, seg, pos):
        return attend(q, k, v, seg, pos, impl=impl, window=window, block=512).sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, ids, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_memory_grows_linearly_in_length_while_dense_grows_quadratically():
    chunked = {T: _temp_bytes("chunked", T) for T in (1024, 4096, 16384)}
    # Linear: x4 tokens -> at most ~x4 temporaries (both steps), and far below one T x T float32 matrix.
    assert chunked[4096] <= 4.5 * chunked[1024] and chunked[16384] <= 4.5 * chunked[4096], chunked
    assert chunked[16384] < 16384 * 16384 * 4 / 16, chunked
    dense = {T: _temp_bytes("xla", T) for T in (1024, 4096)}
    assert dense[4096] >= 8 * dense[1024], dense  # T^2 scores (x16, less the linear part)
    assert chunked[4096] * 8 < dense[4096], (chunked, dense)
    # A window keeps the same O(T x block) footprint.
    assert _temp_bytes("chunked", 16384, window=1024) <= 1.1 * chunked[16384]


# ------------------------------------------------------------------------------------------------
# Positions, patterns, choices, config
# ------------------------------------------------------------------------------------------------


def test_alibi_slopes_match_the_paper_for_any_head_count():
    # Press et al. Sec. 3: 8 heads -> 1/2, 1/4, ..., 1/256; 16 heads start at 1/sqrt(2) with ratio 1/sqrt(2).
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -i for i in range(1, 9)], rtol=1e-12)
    np.testing.assert_allclose(alibi_slopes(16), [2.0 ** (-i / 2) for i in range(1, 17)], rtol=1e-12)
    # Not a power of two (the authors' code): 4 heads' slopes, then every other slope of 8 heads.
    np.testing.assert_allclose(alibi_slopes(6), [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3])
    for n in (1, 3, 5, 12, 20, 40, 128):
        s = alibi_slopes(n)
        assert s.shape == (n,) and len(set(s.tolist())) == n and np.all((s > 0) & (s < 1)), n


def test_layer_windows_interleave_global_blocks():
    assert layer_windows(6, 4, 3) == (4, 4, 0, 4, 4, 0)
    assert layer_windows(4, 4, 0) == (4, 4, 4, 4)
    assert layer_windows(3, 0, 0) == (0, 0, 0)


def test_auto_picks_per_backend_and_logs_the_choice_once(caplog, monkeypatch):
    monkeypatch.setattr(attention, "_logged", set())  # other tests in this process may have logged it
    pick = lambda platform, T=4096, dtype=jnp.bfloat16, position="rope": resolve_impl(  # noqa: E731
        "auto", platform, seq_len=T, dtype=dtype, position=position, block=512)
    assert pick("tpu") == "splash" and pick("tpu", position="alibi") == "chunked" and pick("tpu", T=100) == "xla"
    assert pick("gpu") == "cudnn" and pick("gpu", dtype=jnp.float32) == "chunked" and pick("gpu", T=256,
                                                                                       dtype=jnp.float32) == "xla"
    assert resolve_impl("auto", "gpu", seq_len=4096, dtype=jnp.bfloat16, position="rope", block=512,
                        head_dim=256) == "chunked"  # beyond cuDNN's head sizes
    assert pick("cpu", T=256) == "xla" and pick("cpu", T=4096) == "chunked"
    assert resolve_impl("chunked", "tpu", seq_len=8, dtype=jnp.float32, position="rope", block=8) == "chunked"
    cfg = load_config(None, TINY)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    with caplog.at_level(logging.INFO, logger="mhc_jax.model.attention"):
        model(jnp.zeros((1, 16), jnp.int32))
        model(jnp.ones((1, 16), jnp.int32))
    lines = [r.getMessage() for r in caplog.records if "attention_impl=auto" in r.getMessage()]
    assert lines == ["attention_impl=auto: using xla attention on cpu (sequence length 16)"], lines


@pytest.mark.parametrize("overrides, match", [
    (["model.attention_impl=splash", "model.position=alibi", "data.seq_len=128", "model.max_seq_len=128"],
     "splash kernel takes no logit bias"),
    (["model.attention_impl=splash"], "data.seq_len=16 is not allowed: must be a multiple of 128"),
    (["model.global_every=2"], "needs model.attention_window > 0"),
    (["model.attention_window=-1"], "model.attention_window=-1"),
    (["model.position=sinusoid"], "model.position='sinusoid' is not allowed"),
    (["model.attention_impl=flash"], "model.attention_impl='flash' is not allowed"),
])
def test_bad_attention_settings_fail_at_load_with_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, TINY + overrides)


# ------------------------------------------------------------------------------------------------
# The model: packed documents under windows, ring-buffer generation
# ------------------------------------------------------------------------------------------------

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64",
        "model.max_seq_len=32", "data.seq_len=16"]
WINDOWED = ["model.attention_window=4", "model.global_every=2", "model.n_layers=3"]


@pytest.mark.parametrize("extra", [["model.attention_impl=xla"],
                                   ["model.attention_impl=chunked", "model.attention_block=4",
                                    "model.position=alibi"]])
def test_windowed_packed_documents_never_see_each_other(extra):
    cfg = load_config(None, TINY + WINDOWED + extra)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    a = jax.random.randint(jax.random.key(1), (1, 7), 0, cfg.model.vocab_size)
    b = jax.random.randint(jax.random.key(2), (1, 9), 0, cfg.model.vocab_size)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.array([[1] * 7 + [2] * 9])
    pos = jnp.array([list(range(7)) + list(range(9))])
    logits = model(packed, positions_BT=pos, segment_ids_BT=seg)
    chex.assert_trees_all_close(logits[:, :7], model(a), atol=1e-5)
    chex.assert_trees_all_close(logits[:, 7:], model(b), atol=1e-5)

    # And no gradient flows from document b's logits into document a's tokens (through any layer).
    def b_logits(emb):
        from mhc_jax.residual import expand
        x = expand(emb, model.n_streams)
        for block in model.blocks:
            x, _ = block(x, pos, seg, None, None)
        return model.final_norm(model.collapse(x))[:, 7:].sum()

    g = jax.grad(b_logits)(jnp.take(model.embed_VC[...], packed, axis=0))
    assert float(jnp.abs(g[0, :7]).max()) == 0.0 and float(jnp.abs(g[0, 7:]).max()) > 0.0


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_ring_buffer_generation_equals_full_recompute(position):
    cfg = load_config(None, TINY + WINDOWED + [f"model.position={position}"])
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    t = jax.random.randint(jax.random.key(3), (2, 20), 0, cfg.model.vocab_size)
    cache = model.init_cache(2, 32)
    # Windowed blocks keep only their last 4 tokens; the global block (index 1) keeps all 32.
    assert [c["attn"]["k"].shape[1] for c in cache] == [4, 32, 4]
    decode = nnx.jit(lambda m, tokens, positions, cache: m.decode(tokens, positions, cache))
    logits, cache = decode(model, t[:, :9], jnp.broadcast_to(jnp.arange(9), (2, 9)), cache)  # prompt > window
    steps = [logits]
    for i in range(9, 20):  # the ring wraps several times
        step_logits, cache = decode(model, t[:, i:i + 1], jnp.full((2, 1), i), cache)
        steps.append(step_logits)
    chex.assert_trees_all_close(jnp.concatenate(steps, axis=1), model(t), atol=1e-5, rtol=1e-5)


def test_window_changes_what_a_token_sees():
    # Distinguishes a windowed model from a full one: with window 4, logits at t only depend on tokens
    # t-3..t in the first block, so changing token 0 leaves the logits at 8 unchanged with 1 windowed layer.
    cfg = load_config(None, TINY + ["model.attention_window=4", "model.n_layers=1"])
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    t = jax.random.randint(jax.random.key(4), (1, 12), 0, cfg.model.vocab_size)
    t2 = t.at[0, 0].set((t[0, 0] + 1) % cfg.model.vocab_size)
    l1, l2 = model(t), model(t2)
    chex.assert_trees_all_close(l1[:, 4:], l2[:, 4:], atol=1e-6)
    assert float(jnp.abs(l1[:, :4] - l2[:, :4]).max()) > 1e-4


def test_all_windowed_model_generates_past_max_seq_len_like_full_recompute():
    from mhc_jax.generate import generate

    cfg = load_config(None, TINY + ["model.attention_window=4", "model.max_seq_len=16"])
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert [c["attn"]["k"].shape[1] for c in model.init_cache(1, 16)] == [4, 4]
    cached = generate(model, [1, 2, 3], 22, temperature=0.0)  # 25 tokens > max_seq_len 16
    assert cached == generate(model, [1, 2, 3], 22, temperature=0.0, use_cache=False)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=16"):
        generate(Transformer(load_config(None, TINY + ["model.max_seq_len=16"]), rngs=nnx.Rngs(0)), [1, 2, 3], 22)


def test_model_flops_count_the_keys_a_window_leaves():
    from mhc_jax.flops import attention_flops_per_token

    cfg = load_config(None, TINY + WINDOWED + ["data.seq_len=12"])  # windows (4, 0, 4)
    keys = sum(reference_mask(np.ones((1, 12), np.int32), w)[0].sum() for w in layer_windows(3, 4, 2)) / 12
    H, D = cfg.model.n_heads, cfg.model.resolved_head_dim
    assert attention_flops_per_token(cfg) == pytest.approx(4 * H * D * keys)


@pytest.mark.multidevice
@pytest.mark.parametrize("impl, T", [("chunked", 16), ("splash", 128)])
def test_sharded_loss_and_grads_equal_single_device(impl, T):
    from mhc_jax import sharding
    from mhc_jax.config import MeshConfig
    from mhc_jax.train.step import loss_and_grads

    cfg = load_config(None, TINY + WINDOWED + [
        f"model.attention_impl={impl}", "model.attention_block=4" if impl == "chunked" else "model.attention_block=128",
        "model.n_heads=8", "model.n_kv_heads=4", "model.d_model=64", "model.n_layers=2", f"data.seq_len={T}",
        f"model.max_seq_len={T}", "data.batch_size=4", "model.dtype=float32"])
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(5), (4, T + 1), 0, cfg.model.vocab_size)
    seg = jnp.asarray(np.repeat([[1] * (T // 3) + [2] * (T - T // 3)], 4, axis=0), jnp.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
             "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (4, T)),
             "loss_mask": jnp.ones((4, T), jnp.float32)}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def run(p, r, b):
        loss, grads, _ = loss_and_grads(nnx.merge(graphdef, p, r), b)
        return loss, grads

    ref_loss, ref_grads = jax.jit(run)(params, rest, batch)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    p_sh = sharding.train_state_shardings_of(params, mesh, cfg)
    b_sh = sharding.batch_shardings(batch, mesh)
    with jax.set_mesh(mesh):
        loss, grads = jax.jit(run, out_shardings=(None, p_sh))(
            jax.device_put(params, p_sh), rest, jax.device_put(batch, b_sh))
    chex.assert_trees_all_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("position", ["none", "rope"])
def test_position_none_makes_one_layer_blind_to_prefix_order(position):
    # With no positions, a single causal layer's output at the last token is a function of the set of
    # earlier tokens: permuting them changes nothing. RoPE (the control) does see the order.
    cfg = load_config(None, TINY + ["model.n_layers=1", f"model.position={position}"])
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    t = jax.random.randint(jax.random.key(6), (1, 10), 0, cfg.model.vocab_size)
    shuffled = jnp.concatenate([t[:, :9][:, ::-1], t[:, 9:]], axis=1)
    same = np.allclose(model(t)[:, -1], model(shuffled)[:, -1], atol=1e-5)
    assert same == (position == "none")
