"""Causal multi-head self-attention with grouped-query KV heads, packed-document masking, an optional
sliding window (`window`, given per block), RoPE / ALiBi / no positions, and a KV cache for generation
(a ring buffer of the last `window` tokens in windowed blocks).

The attention product itself has four implementations (`model.attention_impl`), all applying the one mask
rule of mhc_jax.model.masks: `xla` (dense jax.nn.dot_product_attention, O(T^2) memory), `chunked`
(mhc_jax.model.chunked_attention: blockwise online softmax, O(T x block) memory), `cudnn` (cuDNN flash
attention on NVIDIA GPUs, bf16/fp16) and `splash` (the TPU Pallas kernel, mhc_jax.model.splash_attention).
`auto` picks one per backend (`resolve_impl`) and logs the choice once.

Shapes: B batch, T new tokens, S keys (cache slots + new tokens), H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from flax import nnx

from mhc_jax.config import ModelConfig
from mhc_jax.errors import ConfigError
from mhc_jax.layers import apply_rope, param
from mhc_jax.model.alibi import alibi_bias, alibi_slopes
from mhc_jax.model.chunked_attention import chunked_attention
from mhc_jax.model.masks import visible, visible_BTS
from mhc_jax.model.splash_attention import LANES, splash_attention
from mhc_jax.sharding import constrain

log = logging.getLogger(__name__)

KVCache = dict[str, jax.Array]  # {"k": (B, S, K, D), "v": (B, S, K, D), "pos": (B, S) int32, -1 = empty slot}

# On CPU, dense attention is faster while its T^2 scores stay small (benchmarks/attention.py); from this
# length on `auto` uses the chunked kernel, whose memory is linear in T.
CPU_CHUNKED_FROM = 1024
_logged: set[tuple[str, ...]] = set()
# Masked logits, as jax.nn.dot_product_attention sets them: 0.7 x the float32 minimum (finite, so a masked
# entry's exp is exactly 0 and no inf - inf arises in the softmax).
_LARGE_NEGATIVE = float(0.7 * jnp.finfo(jnp.float32).min)


def target_platform() -> str:
    """The platform being compiled for: the current mesh's devices (the AOT report compiles for a TPU
    topology from a CPU host), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and getattr(mesh, "abstract_device", None) is not None:
        return mesh.abstract_device.platform
    return jax.default_backend()


def resolve_impl(impl: str, platform: str, *, seq_len: int, dtype: jnp.dtype, position: str, block: int,
                 head_dim: int = 64) -> str:
    """`auto` -> the best implementation for `platform` and these shapes; other choices pass through."""
    if impl != "auto":
        return impl
    blockwise = "xla" if seq_len <= block else "chunked"  # where no fused kernel applies
    if platform == "tpu":
        return "splash" if position != "alibi" and seq_len % LANES == 0 else blockwise
    if platform == "gpu":
        # cuDNN flash attention: half precision, head dims that are multiples of 8 up to 128.
        fits = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
        return "cudnn" if fits else blockwise
    return "chunked" if seq_len >= CPU_CHUNKED_FROM else "xla"


def _log_choice_once(requested: str, chosen: str, platform: str, seq_len: int) -> None:
    key = (requested, chosen, platform, str(seq_len))
    if key not in _logged:
        _logged.add(key)
        log.info("attention_impl=%s: using %s attention on %s (sequence length %d)", requested, chosen,
                 platform, seq_len)


def dense_attention(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, mask_BTS: jax.Array,
                    bias_BHTS: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(D) + bias, masked) v with the T x S scores materialised: the `xla` impl and
    decoding. jax.nn.dot_product_attention(implementation="xla")'s maths (float32 logits and softmax, probs
    in v's dtype, the same large negative for masked logits), written with the query heads grouped per kv
    head (h = k * G + g) in the einsums themselves: jax's version vmaps over the group and broadcasts the
    mask to every head, which cost 10% of an attention layer's train step on 2 CPU cores (README "mHC
    speed"). Every query must see at least one key (causal attention always sees itself)."""
    B, T, H, D = q_BTHD.shape
    K = k_BSKD.shape[2]
    half = q_BTHD.dtype in (jnp.bfloat16, jnp.float16)  # jax's choice: half inputs, float32 products
    precision = (jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q_BTHD.dtype == jnp.bfloat16 else
                 jax.lax.DotAlgorithmPreset.F16_F16_F32) if half else None
    # Without GQA (K = H) the group axis is left out: a size-1 axis in the dots' batch cost XLA:CPU a copy.
    q_, qs, ks = ((q_BTHD, "bthd", "bshd") if K == H else
                  (q_BTHD.reshape(B, T, K, H // K, D), "btkgd", "bskd"))
    heads = qs[2:-1]  # "h" or "kg"
    logits = jnp.einsum(f"{qs},{ks}->b{heads}ts", q_, k_BSKD, precision=precision,
                        preferred_element_type=jnp.float32) * jnp.float32(D ** -0.5)
    if bias_BHTS is not None:
        logits = logits + bias_BHTS.reshape(logits.shape).astype(jnp.float32)
    logits = jnp.where(mask_BTS.reshape(B, *[1] * len(heads), *mask_BTS.shape[1:]), logits, _LARGE_NEGATIVE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BSKD.dtype)
    out = jnp.einsum(f"b{heads}ts,{ks}->{qs}", probs, v_BSKD)
    return out.reshape(B, T, H, v_BSKD.shape[-1])


def attend(q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array, segment_ids_BT: jax.Array,
           positions_BT: jax.Array, *, impl: str, window: int = 0, slopes: tuple[float, ...] | None = None,
           block: int = 512) -> jax.Array:
    """Causal self-attention of packed rows by `impl` (already resolved, not `auto`); ALiBi if `slopes`."""
    if impl == "chunked":
        return chunked_attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, positions_BT, window=window,
                                 slopes=slopes, block=block)
    bias = None if slopes is None else alibi_bias(jnp.asarray(slopes), positions_BT, positions_BT)
    if impl == "xla":
        return dense_attention(q_BTHD, k_BTKD, v_BTKD, visible_BTS(segment_ids_BT, window), bias)
    if impl == "cudnn":
        platform = target_platform()
        if platform != "gpu":
            raise ConfigError(f"model.attention_impl='cudnn' needs an NVIDIA GPU, but this program runs on "
                              f"{platform}; use auto, xla or chunked")
        if q_BTHD.dtype not in (jnp.bfloat16, jnp.float16):
            raise ConfigError(f"model.attention_impl='cudnn' needs bfloat16 or float16 activations, got "
                              f"{q_BTHD.dtype}; set model.dtype=bfloat16")
        # cuDNN takes no segment ids: the same-document mask goes in as a (B, 1, T, T) bias.
        same_segment_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
        return jax.nn.dot_product_attention(
            q_BTHD, k_BTKD, v_BTKD, bias=None if bias is None else bias.astype(q_BTHD.dtype),
            mask=same_segment_BTT[:, None], is_causal=True,
            local_window_size=(window - 1, 0) if window else None, implementation="cudnn")
    if impl == "splash":
        if slopes is not None:
            raise ConfigError("model.attention_impl='splash' takes no logit bias, so not model.position=alibi")
        return splash_attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, window=window, block=block,
                                interpret=target_platform() != "tpu")
    raise ConfigError(f"model.attention_impl={impl!r} is not allowed: must be auto, xla, chunked, cudnn or splash")


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, out_std: float, rngs: nnx.Rngs, window: int = 0):
        """`window`: this block's sliding window (0 = full causal); blocks differ only in it, and the caller
        (Transformer, from masks.layer_windows) passes it explicitly."""
        C, H, K, D = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        init = nnx.initializers.normal(cfg.init_std)
        pdt = jnp.dtype(cfg.param_dtype)  # float32 master weights by default
        self.wq_CHD = param(rngs, init, (C, H, D), ("embed", "heads", "head_dim"), pdt)
        self.wk_CKD = param(rngs, init, (C, K, D), ("embed", "kv_heads", "head_dim"), pdt)
        self.wv_CKD = param(rngs, init, (C, K, D), ("embed", "kv_heads", "head_dim"), pdt)
        self.wo_HDC = param(rngs, nnx.initializers.normal(out_std), (H, D, C), ("heads", "head_dim", "embed"), pdt)
        self.rope_theta = cfg.rope_theta
        self.position = cfg.position
        self.slopes = tuple(alibi_slopes(H).tolist()) if cfg.position == "alibi" else None
        self.window = window
        self.impl = cfg.attention_impl
        self.block = cfg.attention_block
        self.dtype = dtype

    def __call__(self, x_BTC: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """Without a cache: tokens attend to earlier tokens of the same segment (packed documents never
        see each other), within the window if any. With a cache (generation): the new tokens at
        `positions_BT` attend to the cached tokens and to each other by position (causal, in-window), and
        are then written to slots position % cache length."""
        dt = self.dtype
        x = x_BTC.astype(dt)
        q_BTHD = jnp.einsum("btc,chd->bthd", x, self.wq_CHD[...].astype(dt))
        k_BTKD = jnp.einsum("btc,ckd->btkd", x, self.wk_CKD[...].astype(dt))
        v_BTKD = jnp.einsum("btc,ckd->btkd", x, self.wv_CKD[...].astype(dt))
        if self.position == "rope":
            q_BTHD = apply_rope(q_BTHD, positions_BT, self.rope_theta)
            k_BTKD = apply_rope(k_BTKD, positions_BT, self.rope_theta)
        q_BTHD = constrain(q_BTHD, ("activation_batch", "activation_length", "activation_heads",
                                    "activation_head_dim"))

        if cache is None:
            platform, T = target_platform(), q_BTHD.shape[1]
            impl = resolve_impl(self.impl, platform, seq_len=T, dtype=dt, position=self.position, block=self.block,
                                head_dim=q_BTHD.shape[-1])
            _log_choice_once(self.impl, impl, platform, T)
            out_BTHD = attend(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, positions_BT, impl=impl,
                              window=self.window, slopes=self.slopes, block=self.block)
        else:
            out_BTHD, cache = self._decode(q_BTHD, k_BTKD, v_BTKD, positions_BT, cache)
        out_BTC = jnp.einsum("bthd,hdc->btc", out_BTHD, self.wo_HDC[...].astype(dt))
        return out_BTC, cache

    def _decode(self, q_BTHD, k_BTKD, v_BTKD, positions_BT, cache):
        """Attends over [cached slots, new tokens] (so a prompt longer than a ring still sees its own
        window), then writes the last min(T, slots) new tokens into their ring slots."""
        (k_BSKD, v_BSKD), pos_BS, mask_BTS = extend_cache(cache, (("k", k_BTKD), ("v", v_BTKD)), positions_BT,
                                                          self.window, self.dtype)
        bias = None if self.slopes is None else alibi_bias(jnp.asarray(self.slopes), positions_BT, pos_BS)
        out_BTHD = dense_attention(q_BTHD, k_BSKD, v_BSKD, mask_BTS, bias)
        return out_BTHD, write_cache(cache, {"k": k_BTKD, "v": v_BTKD}, positions_BT)


def extend_cache(cache: dict[str, jax.Array], new: tuple[tuple[str, jax.Array], ...], positions_BT: jax.Array,
                 window: int, dtype: jnp.dtype) -> tuple[tuple[jax.Array, ...], jax.Array, jax.Array]:
    """Each (name, new (B, T, ...) entries) appended to the cache's slots -> (B, S, ...) in `dtype`, with the
    keys' positions pos_BS and the (B, T, S) mask of what the new tokens see (by position: causal, in-window,
    never an empty slot). Any per-token cache (GQA keys and values, MLA latents) decodes through this."""
    full = tuple(jnp.concatenate([cache[name].astype(dtype), x], axis=1) for name, x in new)
    pos_BS = jnp.concatenate([cache["pos"], positions_BT.astype(jnp.int32)], axis=1)
    mask_BTS = visible(positions_BT[:, :, None], pos_BS[:, None, :], None, None, window)
    return full, pos_BS, mask_BTS & (pos_BS[:, None, :] >= 0)


def write_cache(cache: dict[str, jax.Array], new: dict[str, jax.Array], positions_BT: jax.Array) -> dict[str, jax.Array]:
    """The cache with the last min(T, slots) new tokens' entries written to slots position % slots (a ring
    in windowed blocks; a prompt longer than the ring still attended to its own window via `extend_cache`)."""
    slots, n = cache["pos"].shape[1], min(positions_BT.shape[1], cache["pos"].shape[1])
    slot_Bn = positions_BT[:, -n:] % slots
    write = jax.vmap(lambda buf, s, x: buf.at[s].set(x.astype(buf.dtype)))
    out = {name: write(cache[name], slot_Bn, x[:, -n:]) for name, x in new.items()}
    out["pos"] = write(cache["pos"], slot_Bn, positions_BT[:, -n:].astype(jnp.int32))
    return out


def init_kv_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype, window: int = 0) -> KVCache:
    """An empty cache: `max_len` slots, or only `window` (a ring buffer) in a windowed block."""
    slots = min(window, max_len) if window else max_len
    shape = (batch, slots, cfg.n_kv_heads, cfg.resolved_head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "pos": jnp.full((batch, slots), -1, jnp.int32)}
