"""Multi-head Latent Attention (DeepSeek-V3, arXiv 2412.19437, Sec. 2.1.1), selected by `model.attention=mla`.

    query:  c_Q = RMSNorm(W_DQ h) (rank q_lora_rank; q_lora_rank = 0: q = W_Q h), q = W_UQ c_Q, split per head
            into q_nope (qk_nope_head_dim) and q_rope (qk_rope_head_dim, RoPE applied)            (Eq. 6-8)
    keys:   c_KV = RMSNorm(W_DKV h) (rank kv_lora_rank), k_nope = W_UK c_KV per head,
            k_rope = RoPE(W_KR h), one key of qk_rope_head_dim shared by all heads              (Eq. 1-4)
    values: v = W_UV c_KV per head (v_head_dim)                                                  (Eq. 5)
    output: softmax([q_nope; q_rope] . [k_nope; k_rope] * scale) v, then W_O (heads x v_head_dim -> d_model)
    scale:  1 / sqrt(qk_nope_head_dim + qk_rope_head_dim), times mscale^2 when rope_scaling_factor > 1.

Of YaRN (Peng et al. 2023, arXiv 2309.00071) only the attention temperature is implemented: DeepSeek-V3 multiplies
the softmax scale by mscale^2 with mscale = 0.1 ln(factor) + 1 (its mscale_all_dim = 1). The RoPE frequency
interpolation of YaRN (the NTK-by-parts ramp) is not: frequencies stay theta^(-2i/d).

Training and scoring (no cache) materialise per-head keys and values and run the shared `attend` (xla or
chunked; masks as in mhc_jax.model.masks: causal, same document, optional window). Its kernels take one head dim
for queries, keys and values, so q, k and v are zero-padded to D = max(qk_nope + qk_rope, v_head_dim) and q is
pre-scaled so that attend's 1/sqrt(D) gives MLA's scale; zero dims add nothing to q . k or to the output.

Generation caches per token only the normalised latent c_KV (c = kv_lora_rank values) and the rotated k_rope
(d = qk_rope_head_dim values), not heads x dims, and decodes by weight absorption: W_UK is absorbed into the
query (q_nope W_UK^T scores against c_KV directly), attention averages latents, and W_UV is applied after.

Shapes: B batch, T new tokens, S keys, C d_model, H heads, q query latent, c KV latent, o non-rotary and d
rotary query/key dims per head, v value dims per head, D query/key head dim o + d (in `_attend_full`: padded to
max(o + d, v)).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mhc_jax.config import ModelConfig
from mhc_jax.errors import ConfigError
from mhc_jax.layers import RMSNorm, apply_rope, param
from mhc_jax.model.attention import _log_choice_once, attend, extend_cache, resolve_impl, target_platform, write_cache
from mhc_jax.model.masks import visible_BTS
from mhc_jax.sharding import constrain

MLACache = dict[str, jax.Array]  # {"ckv": (B, S, c), "krope": (B, S, d), "pos": (B, S) int32, -1 = empty slot}


def yarn_mscale(factor: float) -> float:
    """YaRN's attention temperature factor (DeepSeek-V3 `yarn_get_mscale`): 0.1 ln(factor) + 1, 1 when off."""
    return 1.0 if factor <= 1.0 else 0.1 * math.log(factor) + 1.0


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """1 / sqrt(qk_nope + qk_rope) x mscale^2 (DeepSeek-V3 softmax_scale)."""
    return yarn_mscale(cfg.rope_scaling_factor) ** 2 / math.sqrt(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, out_std: float, rngs: nnx.Rngs, window: int = 0):
        """`window`: this block's sliding window (0 = full causal), as for `Attention`."""
        C, H, c, q = cfg.d_model, cfg.n_heads, cfg.kv_lora_rank, cfg.q_lora_rank
        o, d, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        init = nnx.initializers.normal(cfg.init_std)
        pdt = jnp.dtype(cfg.param_dtype)
        # Low-rank query (q_lora_rank > 0): W_DQ, its RMSNorm and W_UQ; else one full-rank W_Q.
        lowrank = bool(q)
        self.wdq_Cq = nnx.data(param(rngs, init, (C, q), ("embed", "q_lora"), pdt) if lowrank else None)
        self.q_norm = nnx.data(RMSNorm(q, eps=cfg.norm_eps, dtype=dtype, rngs=rngs) if lowrank else None)
        self.wuq_qHD = nnx.data(param(rngs, init, (q, H, o + d), ("q_lora", "heads", "head_dim"), pdt)
                                if lowrank else None)
        self.wq_CHD = nnx.data(None if lowrank else param(rngs, init, (C, H, o + d), ("embed", "heads", "head_dim"),
                                                          pdt))
        self.wdkv_Cc = param(rngs, init, (C, c), ("embed", "kv_lora"), pdt)
        self.kv_norm = RMSNorm(c, eps=cfg.norm_eps, dtype=dtype, rngs=rngs)
        self.wkr_Cd = param(rngs, init, (C, d), ("embed", "head_dim"), pdt)
        self.wuk_cHo = param(rngs, init, (c, H, o), ("kv_lora", "heads", "head_dim"), pdt)
        self.wuv_cHv = param(rngs, init, (c, H, v), ("kv_lora", "heads", "head_dim"), pdt)
        self.wo_HvC = param(rngs, nnx.initializers.normal(out_std), (H, v, C), ("heads", "head_dim", "embed"), pdt)
        self.nope_dim, self.rope_dim, self.v_dim = o, d, v
        self.scale = mla_softmax_scale(cfg)
        self.rope_theta = cfg.rope_theta
        self.window = window
        self.impl = cfg.attention_impl
        self.block = cfg.attention_block
        self.dtype = dtype

    def _query(self, x_BTC: jax.Array, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(q_nope_BTHo, q_rope_BTHd), RoPE applied to the rope part."""
        dt = self.dtype
        if self.wq_CHD is not None:
            q_BTHD = jnp.einsum("btc,chd->bthd", x_BTC, self.wq_CHD[...].astype(dt))
        else:
            cq_BTq = self.q_norm(x_BTC @ self.wdq_Cq[...].astype(dt))  # c_Q, Eq. 6
            q_BTHD = jnp.einsum("bty,yhd->bthd", cq_BTq, self.wuq_qHD[...].astype(dt))
        q_BTHD = constrain(q_BTHD, ("activation_batch", "activation_length", "activation_heads",
                                    "activation_head_dim"))
        q_nope_BTHo, q_rope_BTHd = q_BTHD[..., :self.nope_dim], q_BTHD[..., self.nope_dim:]
        return q_nope_BTHo, apply_rope(q_rope_BTHd, positions_BT, self.rope_theta)

    def latents(self, x_BTC: jax.Array, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
        """What the cache holds per token: (c_KV_BTP after its RMSNorm, k_rope_BTd after RoPE)."""
        dt = self.dtype
        ckv_BTc = self.kv_norm(x_BTC @ self.wdkv_Cc[...].astype(dt))
        krope_BT1d = apply_rope((x_BTC @ self.wkr_Cd[...].astype(dt))[:, :, None], positions_BT, self.rope_theta)
        return ckv_BTc, krope_BT1d[:, :, 0]

    def __call__(self, x_BTC: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array,
                 cache: MLACache | None = None) -> tuple[jax.Array, MLACache | None]:
        """Same contract as `Attention.__call__` (packed rows without a cache; positions against the cache with one)."""
        dt = self.dtype
        x = x_BTC.astype(dt)
        q_nope_BTHo, q_rope_BTHd = self._query(x, positions_BT)
        ckv_BTc, krope_BTd = self.latents(x, positions_BT)
        if cache is None:
            out_BTHv = self._attend_full(q_nope_BTHo, q_rope_BTHd, ckv_BTc, krope_BTd, positions_BT, segment_ids_BT)
        else:
            out_BTHv, cache = self._decode(q_nope_BTHo, q_rope_BTHd, ckv_BTc, krope_BTd, positions_BT, cache)
        return jnp.einsum("bthv,hvc->btc", out_BTHv.astype(dt), self.wo_HvC[...].astype(dt)), cache

    def _attend_full(self, q_nope_BTHo, q_rope_BTHd, ckv_BTc, krope_BTd, positions_BT, segment_ids_BT):
        """Per-head keys and values from the latent, then the shared `attend` on zero-padded head dims."""
        dt = self.dtype
        H, T = q_nope_BTHo.shape[2], q_nope_BTHo.shape[1]
        k_nope_BTHo = jnp.einsum("btp,pho->btho", ckv_BTc, self.wuk_cHo[...].astype(dt))
        v_BTHv = jnp.einsum("btp,phv->bthv", ckv_BTc, self.wuv_cHv[...].astype(dt))
        krope_BTHd = jnp.broadcast_to(krope_BTd[:, :, None], (*krope_BTd.shape[:2], H, self.rope_dim))
        q_BTHD = jnp.concatenate([q_nope_BTHo, q_rope_BTHd], axis=-1)
        k_BTHD = jnp.concatenate([k_nope_BTHo, krope_BTHd], axis=-1)
        D = max(q_BTHD.shape[-1], self.v_dim)
        # attend scales by 1/sqrt(D): pre-scale q so the product is MLA's scale (mscale^2 / sqrt(o + d)).
        q_BTHD = (q_BTHD * (self.scale * math.sqrt(D))).astype(dt)
        pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, D - a.shape[-1])))  # noqa: E731
        platform = target_platform()
        impl = resolve_impl(self.impl, platform, seq_len=T, dtype=dt, position="rope", block=self.block, head_dim=D)
        if impl in ("cudnn", "splash"):  # `auto` on GPU / TPU: the fused kernels take no MLA head dims (yet)
            impl = "xla" if T <= self.block else "chunked"
        _log_choice_once(self.impl, impl, platform, T)
        if impl not in ("xla", "chunked"):
            raise ConfigError(f"model.attention_impl={self.impl!r} is not supported with model.attention=mla; "
                              "use auto, xla or chunked")
        out_BTHD = attend(pad(q_BTHD), pad(k_BTHD), pad(v_BTHv), segment_ids_BT, positions_BT, impl=impl,
                          window=self.window, block=self.block)
        return out_BTHD[..., :self.v_dim]

    def _decode(self, q_nope_BTHo, q_rope_BTHd, ckv_BTc, krope_BTd, positions_BT, cache):
        """Absorbed-weight attention over [cached latents, new latents] (as `Attention._decode`: a prompt
        longer than a ring still sees its own window), then the last min(T, slots) new tokens written to
        their slots (position % slots)."""
        dt = self.dtype
        (ckv_BSc, krope_BSd), _, mask_BTS = extend_cache(cache, (("ckv", ckv_BTc), ("krope", krope_BTd)),
                                                         positions_BT, self.window, dt)
        probs_BHTS = self._absorbed_probs(q_nope_BTHo, q_rope_BTHd, ckv_BSc, krope_BSd, mask_BTS)
        olat_BTHc = jnp.einsum("bhts,bsp->bthp", probs_BHTS.astype(dt), ckv_BSc)
        out_BTHv = jnp.einsum("bthp,phv->bthv", olat_BTHc, self.wuv_cHv[...].astype(dt))  # W_UV after attending
        return out_BTHv, write_cache(cache, {"ckv": ckv_BTc, "krope": krope_BTd}, positions_BT)

    def _absorbed_probs(self, q_nope_BTHo, q_rope_BTHd, ckv_BSc, krope_BSd, mask_BTS) -> jax.Array:
        """float32 (B, H, T, S) attention weights scored against the latents, W_UK absorbed into the query:
        q_nope . (W_UK c_KV) = (q_nope W_UK^T) . c_KV."""
        f32 = jnp.float32
        qlat_BTHc = jnp.einsum("btho,pho->bthp", q_nope_BTHo, self.wuk_cHo[...].astype(self.dtype))
        scores_BHTS = (jnp.einsum("bthp,bsp->bhts", qlat_BTHc, ckv_BSc, preferred_element_type=f32)
                       + jnp.einsum("bthi,bsi->bhts", q_rope_BTHd, krope_BSd, preferred_element_type=f32))
        return jax.nn.softmax(jnp.where(mask_BTS[:, None], scores_BHTS * self.scale, -jnp.inf), axis=-1)

    def attention_probs(self, x_BTC: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array) -> jax.Array:
        """(B, H, T, T) float32 attention weights of a packed row (mhc_jax.interpret's attention maps)."""
        x = x_BTC.astype(self.dtype)
        q_nope_BTHo, q_rope_BTHd = self._query(x, positions_BT)
        ckv_BTc, krope_BTd = self.latents(x, positions_BT)
        return self._absorbed_probs(q_nope_BTHo, q_rope_BTHd, ckv_BTc, krope_BTd, visible_BTS(segment_ids_BT, self.window))


def init_mla_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype, window: int = 0) -> MLACache:
    """An empty latent cache: kv_lora_rank + qk_rope_head_dim values per slot (a ring of `window` slots if windowed)."""
    slots = min(window, max_len) if window else max_len
    return {"ckv": jnp.zeros((batch, slots, cfg.kv_lora_rank), dtype),
            "krope": jnp.zeros((batch, slots, cfg.qk_rope_head_dim), dtype),
            "pos": jnp.full((batch, slots), -1, jnp.int32)}
