"""Closed-form parameter counts of `Transformer(cfg)`: total (`expected_param_count`, equal to counting the built
model's nnx.Param leaves) and active per token (`active_param_count`, DeepSeek's "activated parameters").

Active = the weights one token's forward pass multiplies by: every weight except the input embedding table
(a row lookup; with tied embeddings the matrix is still the LM head, so it counts once), the Engram tables
(row lookups) and the routed experts a token is not sent to (n_routed_experts - experts_per_token per MoE
block). With that convention the mHC paper's MoE models land on its Table 5 numbers (configs/paper/*.yaml).

Covered: gqa / mla attention (full or low-rank query), dense / moe FFN (shared + routed experts, a router of
C x n_routed_experts weights; the aux-loss-free selection bias is state, not a parameter), the first
`first_dense_layers` dense blocks of width d_ff, multi-token prediction modules, every residual kind
(mhc_jax.residual), Engram layers, tied or untied embeddings, padded vocabulary rows.
"""

from __future__ import annotations

from mhc_jax.config import Config, ModelConfig
from mhc_jax.engram.layer import engram_param_count, table_rows
from mhc_jax.model.moe import is_moe_block
from mhc_jax.residual import residual_param_count


def attention_param_count(m: ModelConfig) -> int:
    """One block's attention projections (and MLA's two latent RMSNorm scales)."""
    C, H = m.d_model, m.n_heads
    if m.attention == "gqa":
        K, D = m.n_kv_heads, m.resolved_head_dim
        return C * H * D + 2 * C * K * D + H * D * C
    q, c, o, d, v = m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    query = C * q + q + q * H * (o + d) if q else C * H * (o + d)  # W_DQ + norm + W_UQ, or W_Q
    return query + C * c + c + C * d + c * H * o + c * H * v + H * v * C  # W_DKV + norm, W_KR, W_UK, W_UV, W_O


def ffn_param_count(m: ModelConfig, index: int, active: bool = False) -> int:
    """Block `index`'s FFN: SwiGLU of width d_ff, or router + shared experts + routed experts (all, or the
    experts_per_token a token uses when `active`)."""
    C = m.d_model
    if not is_moe_block(m, index):
        return 3 * C * m.d_ff
    expert = 3 * C * m.moe_d_ff
    routed = m.experts_per_token if active else m.n_routed_experts
    return C * m.n_routed_experts + (m.n_shared_experts + routed) * expert


def block_param_count(m: ModelConfig, index: int, active: bool = False) -> int:
    """Attention + FFN + their two RMSNorm scales (connections and Engram are counted apart)."""
    return attention_param_count(m) + ffn_param_count(m, index, active) + 2 * m.d_model


def mtp_param_count(m: ModelConfig, active: bool = False) -> int:
    """mtp_depth modules: two input RMSNorms, the 2C -> C projection, one block (plain residual) and the
    module's own output RMSNorm; the embedding and the head are shared with the main model."""
    C = m.d_model
    return sum(2 * C + 2 * C * C + block_param_count(m, m.n_layers + k, active) + C for k in range(m.mtp_depth))


def _count(cfg: Config, active: bool) -> int:
    m = cfg.model
    C, V = m.d_model, m.padded_vocab_size
    blocks = sum(block_param_count(m, i, active) for i in range(m.n_layers))
    head = V * C  # the untied head, or the tied embedding used as the head
    embed = 0 if (active or m.tie_embeddings) else V * C  # the lookup table alone is not multiplied
    total = embed + head + blocks + C + residual_param_count(cfg.residual, C, m.n_layers) + mtp_param_count(m, active)
    if cfg.engram.enabled:
        for layer in cfg.engram.layers:
            total += engram_param_count(cfg.engram, layer, C, cfg.n_streams)
            if active:
                total -= table_rows(cfg.engram, layer) * cfg.engram.head_dim
    return total


def expected_param_count(cfg: Config) -> int:
    """Closed-form number of parameters of `Transformer(cfg)` (every nnx.Param element)."""
    return _count(cfg, active=False)


def active_param_count(cfg: Config) -> int:
    """Parameters one token's forward pass multiplies by (see the module docstring): DeepSeek's activated parameters."""
    return _count(cfg, active=True)
