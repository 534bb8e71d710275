"""The decoder backbone: small modules, each in a file named after it.

Shape legend. An array's name ends in its shape, one letter per dimension (`x_BTnC` is batch x time x
streams x channels); each letter means one thing everywhere in the package:

    B  batch rows                          T  time: positions of the current input
    S  key positions a query can see (T, or the KV-cache slots; the Engram conv's past + current positions)
    C  d_model, the residual stream width  n  residual streams (residual.n_streams; 1 for plain)
    H  query heads                         K  key/value heads (grouped-query attention)
    D  attention head_dim (MLA: o + d)     J  rotary frequencies (D / 2)
    F  d_ff, the SwiGLU hidden width       V  padded vocabulary
    u  the SwiGLU pair (gate, up): 2
    L  transformer blocks (n_layers)       Z  sublayers: 2 per block (attention, MLP), one connection each
    E  Engram layers (engram.layers)       G  Engram table ids per position ((max_ngram - 1) * heads_per_ngram)
    M  d_mem: one position's G Engram rows concatenated (G * W)
    R  rows of one Engram table            W  width of one Engram row (engram.head_dim)
    N  looked-up Engram rows, flattened    Q  Engram conv kernel taps (engram.kernel_size)
    U  a batch's unique Engram rows, padded (sparse tables: cfg.engram_row_bucket)
    X  a stack of matrices to plot (diagnostics)
    A  integration points between baseline and input (integrated gradients, mhc_jax.interpret)
    c  MLA compressed KV latent (kv_lora_rank)         q  MLA query latent (q_lora_rank)
    o  MLA query/key dims without RoPE, per head       d  MLA decoupled RoPE dims (qk_rope_head_dim)
    v  MLA value dims per head (v_head_dim)
    I  routed experts (n_routed_experts)   O  one expert's hidden width (moe_d_ff)
    k  routed experts per token (top-k)    g  expert groups (n_groups)
    m  tokens, batch and time flattened    P  token-expert assignments (m * k), or rows of one all-to-all slot
    r  rows an expert-parallel device receives (p * P)
    Y  capacity slots of one expert        p  expert-parallel shards (mesh.expert)
    e  a grouped matmul's input width      f  its output width (mhc_jax.grouped_matmul)
    t  rows of one grouped-matmul tile     w  its work items: (tile, expert) pairs
    1  a broadcast dimension of size 1
"""

from mhc_jax.model.param_count import active_param_count, expected_param_count
from mhc_jax.model.transformer import Transformer, count_params

__all__ = ["Transformer", "active_param_count", "count_params", "expected_param_count"]
