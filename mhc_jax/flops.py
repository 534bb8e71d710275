"""Closed-form model FLOPs per token, for MFU and the AOT fit report.

Convention (the "6N" rule of Kaplan et al. 2020 / PaLM appendix B, extended): every multiply-add of a
contraction (matmul, einsum) counts 2 FLOPs; the backward pass costs twice the forward, so training is
3 x forward. Elementwise work (norms, activations, softmax, residual adds, the loss) is not counted, except
Sinkhorn-Knopp, which is nothing but elementwise arithmetic and is counted explicitly. Model FLOPs exclude
rematerialisation (recomputation is hardware FLOPs, not model FLOPs) and the embedding / Engram table
lookups (gathers; their gradients are scatter-adds).

Forward FLOPs per token, with C = d_model, L = n_layers, H / K = query / KV heads of size D, F = d_ff,
V = padded vocabulary, T = sequence length, n = residual streams:

    dense      2 [L (C H D + 2 C K D + H D C + 3 C F) + C V]           (q, k, v, o; SwiGLU; LM head)
               = 2 x the active matmul weights: with MLA its projections (mhc_jax.model.param_count), with
                 DeepSeekMoE the router, shared and experts_per_token routed experts; with MTP (training) each
                 module's 2C x C projection, block and shared head (DeepSeek-V3: "activated parameters")
    attention  L * 2 * 2 H D * ctx      (q k^T and p v; ctx = (T + 1) / 2 attended keys on average with a
                                          causal mask, or T when counting the full masked matrix as XLA does;
                                          MLA: 2 H (qk_nope + qk_rope + v_head_dim) per key)
    mHC        2L sublayers x [2 nC (n^2 + 2n)                          (fused coefficient projection, Eq. 14)
                               + n^2 + 4 n^2 t_max                       (exp, then t_max column+row passes)
                               + 2 nC + 2 n^2 C + 2 nC]                  (H_pre x, H_res x, H_post^T F(.))
    HC         2L x [2 n C (n + 1) + 2 n C + mixing as mHC]             (dynamic tanh projections)
    mHC-lite   2L x [2 nC (n! + 2n) + 2 n! n^2 + mixing as mHC]         (convex mix of n! permutations)
    collapse   learned head: 2 nC n + 2 nC; sum: 0
    Engram     per Engram layer: 2 d_mem C (n + 1) + 2 n C + 2 kernel n C   (n keys + value, gate dot, conv)

`model_flops_per_token(cfg)` = 3 x the sum, causal attention at data.seq_len.
"""

from __future__ import annotations

from mhc_jax.config import Config, ModelConfig
from mhc_jax.model.masks import layer_windows
from mhc_jax.model.param_count import attention_param_count, ffn_param_count
from mhc_jax.residual import learned_collapse, residual_kind
from mhc_jax.residual.collapse import collapse_flops
from mhc_jax.sinkhorn import sinkhorn_flops  # noqa: F401 (re-exported)

BACKWARD_FACTOR = 3.0  # forward + backward (2x forward): Kaplan et al. 2020, "C = 6N"


def residual_flops_per_token(cfg: Config) -> float:
    """Forward FLOPs of all residual connections (2 per block) and the collapse head, per token; each
    kind's formula sits next to its class (mhc_jax.residual.RESIDUAL_KINDS)."""
    r, C = cfg.residual, cfg.model.d_model
    per = residual_kind(r.kind).flops(r, C)
    head = collapse_flops(r, C) if learned_collapse(r) else 0.0
    return 2 * cfg.model.n_layers * per + head


def engram_flops_per_token(cfg: Config) -> float:
    """Forward FLOPs of the Engram layers per token (key and value projections, gate, conv)."""
    e, n, C = cfg.engram, cfg.n_streams, cfg.model.d_model
    if not e.enabled:
        return 0.0
    per = 2.0 * e.d_mem * C * (n + 1) + 2.0 * n * C + 2.0 * e.kernel_size * n * C
    return len(e.layers) * per


def block_matmul_params(m: ModelConfig, index: int) -> int:
    """Weights block `index` multiplies one token by: the attention projections (MLA: without its two latent
    RMSNorm scales) and the FFN's active part (MoE: router, shared and experts_per_token routed experts)."""
    norms = 0 if m.attention == "gqa" else m.kv_lora_rank + m.q_lora_rank
    return attention_param_count(m) - norms + ffn_param_count(m, index, active=True)


def dense_flops_per_token(cfg: Config) -> float:
    """Forward FLOPs of the weight matmuls per token, counting active parameters only (attention projections,
    SwiGLU or the active experts, LM head), plus the MTP modules' (projection, block, shared head) in training."""
    m = cfg.model
    C, V = m.d_model, m.padded_vocab_size
    main = sum(block_matmul_params(m, i) for i in range(m.n_layers)) + C * V
    mtp = sum(2 * C * C + block_matmul_params(m, m.n_layers + k) + C * V for k in range(m.mtp_depth))
    return 2.0 * (main + mtp)


def attention_flops_per_token(cfg: Config, seq_len: int | None = None, causal: bool = True) -> float:
    """Forward FLOPs of q k^T and p v per token: 2 H (D_qk + D_v) per attended key and layer (GQA: D_qk = D_v =
    head_dim; MLA: D_qk = qk_nope + qk_rope, D_v = v_head_dim, unpadded). In a block with a sliding window W
    (model.attention_window) token t attends to min(t + 1, W) keys; MTP modules' blocks attend causally."""
    m = cfg.model
    T = seq_len or cfg.data.seq_len
    keys = 0.0
    for W in layer_windows(m.n_layers, m.attention_window, m.global_every) + (0,) * m.mtp_depth:
        if not causal:
            keys += float(T)
        elif W and W < T:
            keys += (W * (W + 1) / 2.0 + (T - W) * W) / T
        else:
            keys += (T + 1) / 2.0
    dims = 2 * m.resolved_head_dim if m.attention == "gqa" else m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim
    return 2.0 * m.n_heads * dims * keys


def forward_flops_breakdown(cfg: Config, seq_len: int | None = None, causal: bool = True) -> dict[str, float]:
    return {"dense": dense_flops_per_token(cfg),
            "attention": attention_flops_per_token(cfg, seq_len, causal),
            "residual": residual_flops_per_token(cfg),
            "engram": engram_flops_per_token(cfg)}


def model_flops_per_token(cfg: Config, seq_len: int | None = None, causal: bool = True) -> float:
    """Training (forward + backward) model FLOPs per token at `seq_len` (default data.seq_len)."""
    return BACKWARD_FACTOR * sum(forward_flops_breakdown(cfg, seq_len, causal).values())
