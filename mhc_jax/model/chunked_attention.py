"""Blockwise attention in pure JAX (FlashAttention-2's online softmax, arXiv 2307.08691, Alg. 1 and 2).

Queries and keys are cut into blocks of `block` tokens. Only the (query block, key block) pairs that hold at
least one visible (causal, in-window) entry are ever computed: the list of pairs is built at trace time, and
one `lax.scan` walks it, keeping a running max and normaliser per query row. Fully masked blocks (above the
diagonal, or older than the window) cost nothing, so a windowed layer costs O(T x window) and a causal one
half of the dense product. Memory is O(T x block): the forward keeps only the output and the per-row
log-sum-exp, and the custom backward recomputes each block's probabilities (FlashAttention-2 Alg. 2).

Shapes: B batch, T tokens (padded to Tp), H query heads = K kv heads x G heads per group, D head dim,
N pairs of blocks, b block length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mhc_jax.model.masks import visible


def block_pairs(n_blocks: int, block: int, window: int) -> np.ndarray:
    """(N, 2) int32 (query block, key block) pairs with at least one visible entry, query block major."""
    pairs = []
    for i in range(n_blocks):
        for j in range(i + 1):  # key blocks after the query block are fully in the future
            nearest = i * block - ((j + 1) * block - 1)  # smallest query - key distance in the pair
            if window and nearest >= window:
                continue  # every key of block j is older than the window for every query of block i
            pairs.append((i, j))
    return np.asarray(pairs, np.int32)


def chunked_attention(q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array, segment_ids_BT: jax.Array,
                      positions_BT: jax.Array, *, window: int = 0, slopes: tuple[float, ...] | None = None,
                      block: int = 512) -> jax.Array:
    """Causal self-attention, softmax(q k^T / sqrt(D) + alibi) v over the keys `masks.visible` allows.
    `slopes` (one per query head) turn on ALiBi over `positions_BT`; the output has q's shape and dtype."""
    B, T, H, D = q_BTHD.shape
    K = k_BTKD.shape[2]
    b = min(block, T)
    Tp = -(-T // b) * b
    if Tp != T:  # padded tokens form their own segment (-1): they see each other, never the real ones
        pad = ((0, 0), (0, Tp - T))
        q_BTHD, k_BTKD, v_BTKD = (jnp.pad(x, pad + ((0, 0), (0, 0))) for x in (q_BTHD, k_BTKD, v_BTKD))
        segment_ids_BT = jnp.pad(segment_ids_BT, pad, constant_values=-1)
        positions_BT = jnp.pad(positions_BT, pad)
    # Heads-major layouts: (B, K, G, Tp, D) queries and (B, K, Tp, D) keys/values; head h = k * G + g.
    q = q_BTHD.reshape(B, Tp, K, H // K, D).transpose(0, 2, 3, 1, 4)
    k, v = (x.transpose(0, 2, 1, 3) for x in (k_BTKD, v_BTKD))
    slopes_KG = None if slopes is None else tuple(np.reshape(slopes, (K, H // K)).ravel().tolist())
    out = _attention(q, k, v, segment_ids_BT.astype(jnp.int32), positions_BT.astype(jnp.int32),
                     window, slopes_KG, b)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, Tp, H, D)[:, :T]


def _block_logits(q_blk, k_blk, seg_q, seg_k, pos_q, pos_k, i, j, window, slopes_KG, b):
    """Scaled (B, K, G, b, b) float32 logits of one block pair, and its visibility mask."""
    D = q_blk.shape[-1]
    s = jnp.einsum("bkgtd,bksd->bkgts", q_blk, k_blk, preferred_element_type=jnp.float32) / np.sqrt(D)
    if slopes_KG is not None:
        K, G = k_blk.shape[1], q_blk.shape[2]
        dist = (pos_q[:, :, None] - pos_k[:, None, :]).astype(jnp.float32)  # (B, b, b)
        s = s - jnp.asarray(slopes_KG, jnp.float32).reshape(1, K, G, 1, 1) * dist[:, None, None]
    idx_q = i * b + jnp.arange(b)
    idx_k = j * b + jnp.arange(b)
    ok = visible(idx_q[None, :, None], idx_k[None, None, :], seg_q[:, :, None], seg_k[:, None, :], window)
    return s, ok[:, None, None]  # mask (B, 1, 1, b, b)


def _pair(q, k, v, seg, pos, ij, window, slopes_KG, b):
    """Block indices, the query block, key / value blocks, and the logits and mask of one block pair."""
    i, j = ij[0], ij[1]
    qs = jax.lax.dynamic_slice_in_dim(q, i * b, b, axis=3)
    ks = jax.lax.dynamic_slice_in_dim(k, j * b, b, axis=2)
    vs = jax.lax.dynamic_slice_in_dim(v, j * b, b, axis=2)
    sq, sk = (jax.lax.dynamic_slice_in_dim(seg, n * b, b, axis=1) for n in (i, j))
    pq, pk = (jax.lax.dynamic_slice_in_dim(pos, n * b, b, axis=1) for n in (i, j))
    s, ok = _block_logits(qs, ks, sq, sk, pq, pk, i, j, window, slopes_KG, b)
    return i, j, qs, ks, vs, s, ok


def _forward(q, k, v, seg, pos, window, slopes_KG, b):
    B, K, G, Tp, D = q.shape
    pairs = block_pairs(Tp // b, b, window)

    def step(carry, ij):
        acc, m, l = carry
        i, _, _, _, vs, s, ok = _pair(q, k, v, seg, pos, ij, window, slopes_KG, b)
        m_old = jax.lax.dynamic_slice_in_dim(m, i * b, b, axis=3)
        l_old = jax.lax.dynamic_slice_in_dim(l, i * b, b, axis=3)
        a_old = jax.lax.dynamic_slice_in_dim(acc, i * b, b, axis=3)
        m_new = jnp.maximum(m_old, jnp.max(jnp.where(ok, s, -jnp.inf), axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing visible yet
        p = jnp.where(ok, jnp.exp(s - m_safe[..., None]), 0.0)
        rescale = jnp.exp(jnp.where(jnp.isfinite(m_old), m_old, m_safe) - m_safe)
        l_new = l_old * rescale + p.sum(-1)
        a_new = a_old * rescale[..., None] + jnp.einsum("bkgts,bksd->bkgtd", p.astype(vs.dtype), vs,
                                                          preferred_element_type=jnp.float32)
        acc = jax.lax.dynamic_update_slice_in_dim(acc, a_new, i * b, axis=3)
        m = jax.lax.dynamic_update_slice_in_dim(m, m_new, i * b, axis=3)
        l = jax.lax.dynamic_update_slice_in_dim(l, l_new, i * b, axis=3)
        return (acc, m, l), None

    init = (jnp.zeros((B, K, G, Tp, D), jnp.float32), jnp.full((B, K, G, Tp), -jnp.inf, jnp.float32),
            jnp.zeros((B, K, G, Tp), jnp.float32))
    (acc, m, l), _ = jax.lax.scan(step, init, jnp.asarray(pairs))
    out = (acc / l[..., None]).astype(q.dtype)  # every row sees at least itself, so l > 0
    return out, m + jnp.log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, seg, pos, window, slopes_KG, b):
    return _forward(q, k, v, seg, pos, window, slopes_KG, b)[0]


def _attention_fwd(q, k, v, seg, pos, window, slopes_KG, b):
    out, lse = _forward(q, k, v, seg, pos, window, slopes_KG, b)
    return out, (q, k, v, seg, pos, out, lse)


def _attention_bwd(window, slopes_KG, b, residuals, dout):
    q, k, v, seg, pos, out, lse = residuals
    D = q.shape[-1]
    pairs = block_pairs(q.shape[3] // b, b, window)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # (B, K, G, Tp), Alg. 2 l.4

    def step(carry, ij):
        dq, dk, dv = carry
        i, j, qs, ks, vs, s, ok = _pair(q, k, v, seg, pos, ij, window, slopes_KG, b)
        lse_i = jax.lax.dynamic_slice_in_dim(lse, i * b, b, axis=3)
        delta_i = jax.lax.dynamic_slice_in_dim(delta, i * b, b, axis=3)
        do_i = jax.lax.dynamic_slice_in_dim(dout, i * b, b, axis=3).astype(jnp.float32)
        p = jnp.where(ok, jnp.exp(s - lse_i[..., None]), 0.0)
        dv_j = jnp.einsum("bkgts,bkgtd->bksd", p, do_i)
        dp = jnp.einsum("bkgtd,bksd->bkgts", do_i, vs.astype(jnp.float32))
        ds = p * (dp - delta_i[..., None]) / np.sqrt(D)
        dq_i = jnp.einsum("bkgts,bksd->bkgtd", ds, ks.astype(jnp.float32))
        dk_j = jnp.einsum("bkgts,bkgtd->bksd", ds, qs.astype(jnp.float32))
        dq = jax.lax.dynamic_update_slice_in_dim(
            dq, jax.lax.dynamic_slice_in_dim(dq, i * b, b, axis=3) + dq_i, i * b, axis=3)
        dk = jax.lax.dynamic_update_slice_in_dim(
            dk, jax.lax.dynamic_slice_in_dim(dk, j * b, b, axis=2) + dk_j, j * b, axis=2)
        dv = jax.lax.dynamic_update_slice_in_dim(
            dv, jax.lax.dynamic_slice_in_dim(dv, j * b, b, axis=2) + dv_j, j * b, axis=2)
        return (dq, dk, dv), None

    init = tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
    (dq, dk, dv), _ = jax.lax.scan(step, init, jnp.asarray(pairs))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
