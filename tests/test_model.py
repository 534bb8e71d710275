"""The decoder backbone: shapes, dtypes, causality, packed-document isolation, parameter count, KV cache."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax.config import load_config
from mhc_jax.model import Transformer, count_params, expected_param_count

from references import decode_in_steps

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64",
        "model.max_seq_len=32", "data.seq_len=16"]


def make(overrides=(), seed=0):
    cfg = load_config(None, TINY + list(overrides))
    return cfg, Transformer(cfg, rngs=nnx.Rngs(seed))


def tokens(cfg, B=2, T=16, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, cfg.model.vocab_size)


CONFIGS = [
    [],
    ["model.tie_embeddings=false", "model.vocab_pad_multiple=64"],
    ["model.n_kv_heads=1", "model.head_dim=16"],
    ["model.dtype=bfloat16"],
]


@pytest.mark.parametrize("overrides", CONFIGS)
def test_logits_have_batch_time_padded_vocab_shape_and_float32(overrides):
    cfg, model = make(overrides)
    logits = model(tokens(cfg))
    chex.assert_shape(logits, (2, 16, cfg.model.padded_vocab_size))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)
    if cfg.model.padded_vocab_size > cfg.model.vocab_size:
        assert float(logits[..., cfg.model.vocab_size:].max()) <= -1e8  # padded rows never predicted


class JitAgreement(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_forward_agree(self):
        cfg, model = make()
        graphdef, state = nnx.split(model)
        t = tokens(cfg)

        @self.variant
        def forward(state, t):
            return nnx.merge(graphdef, state)(t)

        reference = model(t)
        chex.assert_trees_all_close(forward(state, t), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [[], ["model.n_kv_heads=1"]])
def test_logit_at_t_has_zero_gradient_wrt_later_embeddings(overrides):
    cfg, model = make(overrides)
    t = tokens(cfg, B=1)
    emb = jnp.take(model.embed_VC[...], t, axis=0)

    def logit_at(emb_BTC, pos):
        return _forward_from_embeddings(model, emb_BTC)[0, pos].sum()

    for pos in (0, 7, 15):
        g = jax.grad(logit_at)(emb, pos)[0]  # (T, C)
        per_position = np.abs(np.asarray(g)).sum(-1)
        assert np.all(per_position[pos + 1:] == 0.0), f"position {pos} sees the future"
        assert per_position[: pos + 1].max() > 0.0


def _forward_from_embeddings(model, emb_BTC):
    """The model's forward pass starting from given token embeddings (for gradient checks)."""
    return model(jnp.zeros(emb_BTC.shape[:2], jnp.int32), embeds_BTC=emb_BTC)


def test_packed_document_logits_equal_the_document_alone():
    cfg, model = make()
    a, b = tokens(cfg, B=1, T=6, seed=1), tokens(cfg, B=1, T=10, seed=2)
    packed = jnp.concatenate([a, b], axis=1)
    segments = jnp.array([[1] * 6 + [2] * 10])
    positions = jnp.array([list(range(6)) + list(range(10))])
    logits_packed = model(packed, positions_BT=positions, segment_ids_BT=segments)
    chex.assert_trees_all_close(logits_packed[:, :6], model(a), atol=1e-5)
    chex.assert_trees_all_close(logits_packed[:, 6:], model(b), atol=1e-5)


@pytest.mark.parametrize("overrides", CONFIGS + [["model.n_layers=3", "model.d_ff=96"]])
def test_parameter_count_equals_closed_form(overrides):
    cfg, model = make(overrides)
    assert count_params(model) == expected_param_count(cfg)
    m = cfg.model
    # Hand count for the first config: embedding + per-block (attention + SwiGLU + 2 norms) + final norm.
    if not overrides:
        per_block = 32 * 4 * 8 + 2 * 32 * 2 * 8 + 4 * 8 * 32 + 3 * 32 * 64 + 2 * 32
        assert count_params(model) == m.vocab_size * 32 + 2 * per_block + 32


def test_every_parameter_carries_logical_axis_names():
    cfg, model = make(["model.tie_embeddings=false"])
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("axes")
        assert axes is not None and len(axes) == var[...].ndim, f"{path} lacks logical axes"


def test_cached_decoding_equals_full_recompute():
    cfg, model = make()
    t = tokens(cfg, B=2, T=12)
    chex.assert_trees_all_close(decode_in_steps(model, t, 8, 32), model(t), atol=1e-5, rtol=1e-5)


def test_remat_gives_the_same_loss_and_gradients():
    cfg, model = make()
    cfg_r, model_r = make(["training.remat=full"])
    t = tokens(cfg)
    g = nnx.grad(lambda m: m(t).mean())(model)
    g_r = nnx.grad(lambda m: m(t).mean())(model_r)
    chex.assert_trees_all_close(g, g_r, atol=1e-6, rtol=1e-5)
