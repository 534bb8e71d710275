"""Float64 numpy references of the mHC equations and test helpers shared by several test files."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhc_jax.residual import make_residual


def ref_sinkhorn(x: np.ndarray, iters: int, eps: float = 0.0, xp=np) -> np.ndarray:
    """Eq. 9 in float64: M0 = exp(x - max); iters x (column normalise, then row normalise).
    `xp=jax.numpy` gives the same equations as a differentiable function (float64 under enable_x64)."""
    m = xp.exp(x - x.max(axis=(-2, -1), keepdims=True))
    for _ in range(iters):
        m = m / (m.sum(-2, keepdims=True) + eps)
        m = m / (m.sum(-1, keepdims=True) + eps)
    return m


def ref_v4_comb(x: np.ndarray, iters: int, eps: float) -> np.ndarray:
    """DeepSeek-V4 `comb` in its own orientation: row softmax + eps, column step, then
    (iters - 1) x (row step, column step), every denominator + eps."""
    e = np.exp(x - x.max(-1, keepdims=True))
    m = e / e.sum(-1, keepdims=True) + eps
    m = m / (m.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(-1, keepdims=True) + eps)
        m = m / (m.sum(-2, keepdims=True) + eps)
    return m


def randomize(module: nnx.Module, seed: int = 0, scale: float = 0.5) -> nnx.Module:
    """Every parameter replaced by a random value, so references are tested away from the init."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param):
            var[...] = jnp.asarray(scale * rng.standard_normal(np.shape(var[...])), var[...].dtype)
    return module


def connection(cfg, sublayer_index: int) -> nnx.Module:
    """`make_residual` (the kind of residual.kind) around one sublayer, from a whole Config's sections."""
    return make_residual(cfg.residual, cfg.model.d_model, sublayer_index, norm_eps=cfg.model.norm_eps,
                         rngs=nnx.Rngs(0))


def build(cls: type, cfg, *sublayer_index: int) -> nnx.Module:
    """A residual connection (or the learned collapse head, which takes no sublayer index) built from the
    config sections it takes: the residual section, d_model and the norm epsilon."""
    return cls(cfg.residual, cfg.model.d_model, *sublayer_index, norm_eps=cfg.model.norm_eps, rngs=nnx.Rngs(0))


def decode_in_steps(model: nnx.Module, tokens_BT, prefill: int, cache_len: int):
    """Logits of `tokens_BT` from the KV-cache path: the first `prefill` tokens at once, then one at a time."""
    B, T = tokens_BT.shape
    cache = model.init_cache(B, cache_len)
    decode = nnx.jit(lambda m, *args: m.decode(*args))  # two programs (prefill, one token) instead of eager ops
    logits, cache = decode(model, tokens_BT[:, :prefill], jnp.broadcast_to(jnp.arange(prefill), (B, prefill)), cache)
    steps = [logits]
    for i in range(prefill, T):
        step_logits, cache = decode(model, tokens_BT[:, i:i + 1], jnp.full((B, 1), i), cache)
        steps.append(step_logits)
    return jnp.concatenate(steps, axis=1)
