"""Causal multi-head self-attention with grouped-query KV heads, RoPE, packed-document masking and an
optional KV cache for generation. The attention itself is `jax.nn.dot_product_attention`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mhc_jax.config import ModelConfig
from mhc_jax.layers import apply_rope, param
from mhc_jax.sharding import constrain

KVCache = dict[str, jax.Array]  # {"k": (B, S, K, D), "v": (B, S, K, D)}


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, out_std: float, rngs: nnx.Rngs):
        C, H, K, D = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        init = nnx.initializers.normal(cfg.init_std)
        pdt = jnp.dtype(cfg.param_dtype)  # float32 master weights by default
        self.wq_CHD = param(rngs, init, (C, H, D), ("embed", "heads", "head_dim"), pdt)
        self.wk_CKD = param(rngs, init, (C, K, D), ("embed", "kv_heads", "head_dim"), pdt)
        self.wv_CKD = param(rngs, init, (C, K, D), ("embed", "kv_heads", "head_dim"), pdt)
        self.wo_HDC = param(rngs, nnx.initializers.normal(out_std), (H, D, C), ("heads", "head_dim", "embed"), pdt)
        self.rope_theta = cfg.rope_theta
        self.impl = cfg.attention_impl
        self.dtype = dtype

    def __call__(self, x_BTC: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """Without a cache: tokens attend to earlier tokens of the same segment (packed documents never
        see each other). With a cache (generation): the new tokens are written at slots
        `positions_BT[0, 0]...` and attend to every filled slot at or before their own position."""
        dt = self.dtype
        x = x_BTC.astype(dt)
        q_BTHD = jnp.einsum("btc,chd->bthd", x, self.wq_CHD[...].astype(dt))
        k_BTKD = jnp.einsum("btc,ckd->btkd", x, self.wk_CKD[...].astype(dt))
        v_BTKD = jnp.einsum("btc,ckd->btkd", x, self.wv_CKD[...].astype(dt))
        q_BTHD = apply_rope(q_BTHD, positions_BT, self.rope_theta)
        k_BTKD = apply_rope(k_BTKD, positions_BT, self.rope_theta)
        q_BTHD = constrain(q_BTHD, ("activation_batch", "activation_length", "activation_heads",
                                    "activation_head_dim"))

        if cache is None:
            same_segment_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
            out_BTHD = jax.nn.dot_product_attention(
                q_BTHD, k_BTKD, v_BTKD, mask=same_segment_BTS[:, None], is_causal=True,
                implementation=None if self.impl == "xla" else self.impl)
        else:
            start = positions_BT[0, 0]
            k_all = jax.lax.dynamic_update_slice(cache["k"], k_BTKD.astype(cache["k"].dtype), (0, start, 0, 0))
            v_all = jax.lax.dynamic_update_slice(cache["v"], v_BTKD.astype(cache["v"].dtype), (0, start, 0, 0))
            cache = {"k": k_all, "v": v_all}
            slots_S = jnp.arange(k_all.shape[1])
            visible_BTS = slots_S[None, None, :] <= positions_BT[:, :, None]
            out_BTHD = jax.nn.dot_product_attention(q_BTHD, k_all.astype(dt), v_all.astype(dt),
                                                    mask=visible_BTS[:, None])
        out_BTC = jnp.einsum("bthd,hdc->btc", out_BTHD, self.wo_HDC[...].astype(dt))
        return out_BTC, cache


def init_kv_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype) -> KVCache:
    shape = (batch, max_len, cfg.n_kv_heads, cfg.resolved_head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
