"""The decoder-only language model: embedding -> expand to n streams -> blocks -> collapse -> norm -> head.

Each block hands its two sublayers (norm + attention, norm + MLP) as branches to residual-connection
modules (plain / HC / mHC / mHC-lite, see mhc_jax.residual), and, at the blocks listed in
`engram.layers`, adds the Engram memory to every stream before attention.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mhc_jax.config import Config
from mhc_jax.engram.layer import Engram, engram_param_count
from mhc_jax.model.attention import Attention, KVCache, init_kv_cache
from mhc_jax.model.masks import layer_windows
from mhc_jax.model.mlp import MLP
from mhc_jax.layers import RMSNorm, compute_dtype, param
from mhc_jax.residual import expand, make_collapse, make_residual, residual_param_count
from mhc_jax.sharding import constrain

STREAM_AXES = ("activation_batch", "activation_length", "activation_streams", "activation_embed")  # x_BTnC
LayerCache = dict[str, Any]  # {"attn": KVCache, "engram": engram conv state (if the block has Engram)}

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    def __init__(self, cfg: Config, index: int, *, rngs: nnx.Rngs, window: int = 0):
        """`window`: this block's attention window (0 = full causal), from masks.layer_windows: the one
        attention setting that differs between blocks, passed in so runs of equal blocks can be grouped."""
        m = cfg.model
        dtype = compute_dtype(m.dtype)
        # GPT-2 style: output projections scaled by 1/sqrt(2 * n_layers) so the residual variance
        # does not grow with depth.
        out_std = m.init_std / math.sqrt(2 * m.n_layers)
        self.index = index
        self.attn_norm = RMSNorm(m.d_model, eps=m.norm_eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(m, dtype=dtype, out_std=out_std, rngs=rngs, window=window)
        self.mlp_norm = RMSNorm(m.d_model, eps=m.norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(m, dtype=dtype, out_std=out_std, rngs=rngs)
        self.attn_res = make_residual(cfg, 2 * index, rngs=rngs)
        self.mlp_res = make_residual(cfg, 2 * index + 1, rngs=rngs)
        engram = None
        if cfg.engram.enabled and index in cfg.engram.layers:
            engram = Engram(cfg, layer_id=index, rngs=rngs)
        self.engram = nnx.data(engram)

    def __call__(self, x_BTnC: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array,
                 engram_ids_BTG: jax.Array | None, cache: LayerCache | None,
                 engram_rows_UW: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
        new_cache: LayerCache | None = None if cache is None else dict(cache)
        if self.engram is not None:
            if engram_ids_BTG is None:
                raise ValueError(f"block {self.index} has Engram but no engram_ids were given; the data "
                                 "pipeline (or generate) must hash the input tokens")
            y_BTnC, engram_state = self.engram(x_BTnC, engram_ids_BTG, segment_ids_BT,
                                               None if cache is None else cache["engram"], engram_rows_UW)
            x_BTnC = x_BTnC + y_BTnC.astype(x_BTnC.dtype)
            if new_cache is not None:
                new_cache["engram"] = engram_state

        def attention_branch(h_BTC: jax.Array) -> jax.Array:
            out_BTC, kv = self.attn(self.attn_norm(h_BTC), positions_BT, segment_ids_BT,
                                    None if cache is None else cache["attn"])
            if new_cache is not None:
                new_cache["attn"] = kv
            return out_BTC

        x_BTnC = self.attn_res(x_BTnC, attention_branch)
        x_BTnC = constrain(x_BTnC, STREAM_AXES)
        x_BTnC = self.mlp_res(x_BTnC, lambda h_BTC: self.mlp(self.mlp_norm(h_BTC)))
        x_BTnC = constrain(x_BTnC, STREAM_AXES)
        return x_BTnC, new_cache


class Transformer(nnx.Module):
    """Decoder-only LM. `model(tokens_BT, ...)` -> logits (B, T, padded_vocab) in float32, with the padded
    vocabulary rows masked to a large negative value."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        m = cfg.model
        self.cfg = cfg
        self.dtype = compute_dtype(m.dtype)
        self.n_streams = cfg.n_streams
        V = m.padded_vocab_size
        self.embed_VC = param(rngs, nnx.initializers.normal(m.init_std), (V, m.d_model), ("vocab", "embed"),
                             jnp.dtype(m.param_dtype))
        windows = layer_windows(m.n_layers, m.attention_window, m.global_every)
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs, window=windows[i]) for i in range(m.n_layers)])
        self.collapse = make_collapse(cfg, rngs=rngs)
        self.final_norm = RMSNorm(m.d_model, eps=m.norm_eps, dtype=self.dtype, rngs=rngs)
        self.head_CV = nnx.data(None if m.tie_embeddings else param(
            rngs, nnx.initializers.normal(m.init_std), (m.d_model, V), ("embed", "vocab"), jnp.dtype(m.param_dtype)))
        self.remat = cfg.training.remat

    def __call__(self, tokens_BT: jax.Array, *, positions_BT: jax.Array | None = None,
                 segment_ids_BT: jax.Array | None = None,
                 engram_ids_BTEG: jax.Array | None = None, engram_rows_EUW: jax.Array | None = None,
                 embeds_BTC: jax.Array | None = None) -> jax.Array:
        """engram_ids_BTEG: table ids per Engram layer (config order) and hash head (the batch layout, mhc_jax.data);
        with engram.update=sparse, slots into engram_rows_EUW (the batch's unique rows per layer).
        embeds_BTC: input embeddings used instead of the rows of `tokens_BT` (integrated gradients)."""
        logits, _ = self._run(tokens_BT, positions_BT, segment_ids_BT, engram_ids_BTEG, None, engram_rows_EUW,
                              embeds_BTC)
        return logits

    def decode(self, tokens_BT: jax.Array, positions_BT: jax.Array, cache: list[LayerCache],
               engram_ids_BTEG: jax.Array | None = None,
               engram_rows_EUW: jax.Array | None = None) -> tuple[jax.Array, list[LayerCache]]:
        """Runs new tokens at `positions_BT` against the cache; returns their logits and the new cache."""
        return self._run(tokens_BT, positions_BT, jnp.ones_like(tokens_BT), engram_ids_BTEG, cache, engram_rows_EUW)

    def init_cache(self, batch: int, max_len: int) -> list[LayerCache]:
        caches = []
        for block in self.blocks:
            c: LayerCache = {"attn": init_kv_cache(self.cfg.model, batch, max_len, self.dtype, block.attn.window)}
            if block.engram is not None:
                c["engram"] = block.engram.init_cache(batch)
            caches.append(c)
        return caches

    def _run(self, tokens_BT, positions_BT, segment_ids_BT, engram_ids_BTEG, cache, engram_rows_EUW=None,
             embeds_BTC=None):
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        x_BTC = (jnp.take(self.embed_VC[...], tokens_BT, axis=0) if embeds_BTC is None else embeds_BTC).astype(self.dtype)
        x_BTnC = constrain(expand(x_BTC, self.n_streams), STREAM_AXES)
        engram_layers = self.cfg.engram.layers
        new_cache = None if cache is None else []
        for i, block in enumerate(self.blocks):
            ids = rows = None
            if block.engram is not None and engram_ids_BTEG is not None:
                ids = engram_ids_BTEG[:, :, engram_layers.index(i)]
                rows = None if engram_rows_EUW is None else engram_rows_EUW[engram_layers.index(i)]
            layer_cache = None if cache is None else cache[i]
            if self.remat != "none" and cache is None:
                x_BTnC, _ = nnx.remat(lambda blk, *a: blk(*a), policy=REMAT_POLICIES[self.remat])(
                    block, x_BTnC, positions_BT, segment_ids_BT, ids, None, rows)
            else:
                x_BTnC, layer_cache = block(x_BTnC, positions_BT, segment_ids_BT, ids, layer_cache, rows)
            if new_cache is not None:
                new_cache.append(layer_cache)
        h_BTC = self.final_norm(self.collapse(x_BTnC))
        head_CV = self.embed_VC[...].T if self.head_CV is None else self.head_CV[...]
        logits_BTV = jnp.einsum("btc,cv->btv", h_BTC, head_CV.astype(self.dtype)).astype(jnp.float32)
        m = self.cfg.model
        if m.padded_vocab_size != m.vocab_size:
            logits_BTV = jnp.where(jnp.arange(m.padded_vocab_size) < m.vocab_size, logits_BTV, -1e9)
        return constrain(logits_BTV, ("activation_batch", "activation_length", "activation_vocab")), new_cache


def count_params(model: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def expected_param_count(cfg: Config) -> int:
    """Closed-form parameter count of `Transformer(cfg)`."""
    m = cfg.model
    C, H, K, D, F, V = m.d_model, m.n_heads, m.n_kv_heads, m.resolved_head_dim, m.d_ff, m.padded_vocab_size
    attention = C * H * D + 2 * C * K * D + H * D * C
    mlp = 3 * C * F
    norms = 2 * C
    total = V * C + m.n_layers * (attention + mlp + norms) + C + (0 if m.tie_embeddings else C * V)
    total += residual_param_count(cfg)
    if cfg.engram.enabled:
        total += sum(engram_param_count(cfg, layer) for layer in cfg.engram.layers)
    return total
