"""Closed-form model FLOPs: hand counts for tiny configs, and agreement with XLA's count of the compiled
train step."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

from mhc_jax.config import Config, MeshConfig, load_config
from mhc_jax.data import synthetic_batch
from mhc_jax.flops import forward_flops_breakdown, model_flops_per_token
from mhc_jax.model.transformer import Transformer
from mhc_jax.sharding import batch_shardings, make_mesh, train_state_shardings
from mhc_jax.train.optimizer import make_optimizer
from mhc_jax.train.step import make_sharded_step


def tiny(**sections) -> Config:
    # configs/tiny.yaml: C=32, L=2, H=4, K=2 (D=8), F=64, V=259, T=32
    return load_config("configs/tiny.yaml").replace(**sections)


def test_plain_model_flops_match_hand_count():
    # per layer: q 32*4*8 + k,v 2*32*2*8 + o 4*8*32 + SwiGLU 3*32*64 = 1024 + 1024 + 1024 + 6144 = 9216
    # dense fwd = 2 * (2 * 9216 + head 32 * 259) = 2 * 26720 = 53440
    # attention fwd = 2 layers * 4 * H 4 * D 8 * (T + 1) / 2 = 256 * 16.5 = 4224
    cfg = tiny()
    assert forward_flops_breakdown(cfg) == {"dense": 53440.0, "attention": 4224.0, "residual": 0.0, "engram": 0.0}
    assert model_flops_per_token(cfg) == 3 * (53440 + 4224)
    assert forward_flops_breakdown(cfg, causal=False)["attention"] == 2 * 4 * 4 * 8 * 32


def test_mhc_flops_add_projection_sinkhorn_and_mixing_per_sublayer():
    # n=4, C=32, t_max=20: projection 2*128*24 = 6144; Sinkhorn 16 + 4*16*20 = 1296;
    # mixing 2*128 + 2*16*32 + 2*128 = 1536; 4 sublayers * 8976 = 35904
    cfg = tiny(residual={"kind": "mhc", "n_streams": 4, "sinkhorn_iters": 20})
    assert forward_flops_breakdown(cfg)["residual"] == 35904.0
    assert model_flops_per_token(cfg) == 3 * (53440 + 4224 + 35904)


def test_engram_flops_count_keys_value_gate_and_conv():
    # d_mem = 2 orders * 2 heads * 4 = 16, n = 4, C = 32, kernel 4:
    # keys + value 2*16*32*5 = 5120; gate 2*4*32 = 256; conv 2*4*4*32 = 1024; one layer -> 6400
    cfg = tiny(residual={"kind": "mhc", "n_streams": 4},
               engram={"enabled": True, "layers": [1], "heads_per_ngram": 2, "head_dim": 4, "kernel_size": 4})
    assert forward_flops_breakdown(cfg)["engram"] == 6400.0


def test_mla_and_mtp_flops_match_hand_count():
    # MLA (C=32, H=4, P=32, I=16, O=32, v=32, q full rank) per layer: W_Q 32*4*48 = 6144, W_DKV 32*32 = 1024,
    # W_KR 32*16 = 512, W_UK and W_UV 2*32*4*32 = 8192, W_O 4*32*32 = 4096 -> 19968; SwiGLU 6144;
    # dense fwd = 2 * (2 * 26112 + 32 * 259) = 121024; attention 2 layers * 2 H (48 + 32) * 16.5 = 21120
    cfg = tiny(model={"attention": "mla"})
    assert forward_flops_breakdown(cfg)["dense"] == 121024.0
    assert forward_flops_breakdown(cfg)["attention"] == 21120.0
    # one MTP module adds its projection 2*32*32, a block and the shared head (and the block's attention)
    mtp = tiny(model={"attention": "mla", "mtp_depth": 1})
    assert forward_flops_breakdown(mtp)["dense"] == 121024.0 + 2 * (2048 + 26112 + 32 * 259)
    assert forward_flops_breakdown(mtp)["attention"] == 21120.0 * 3 / 2


def test_moe_flops_count_the_router_shared_and_chosen_experts_only():
    # block 0 dense: attention 3072 + SwiGLU 3 * 32 * 64 = 6144; block 1 MoE: attention 3072 + router 32 * 8 +
    # (1 shared + top-2 routed) * 3 * 32 * 16 = 256 + 4608; head 32 * 259 = 8288 -> 2 * 25440
    cfg = tiny(model={"ffn": "moe", "n_routed_experts": 8, "experts_per_token": 2, "moe_d_ff": 16,
                      "n_shared_experts": 1, "first_dense_layers": 1})
    assert forward_flops_breakdown(cfg)["dense"] == 50880.0


@pytest.mark.parametrize("kind", ["plain", "mhc", "mla"])
def test_model_flops_agree_with_compiled_cost_analysis(kind: str):
    """XLA counts everything the CPU program does (elementwise ops, the full masked attention matrix, the
    optimiser), so it may exceed the model count, but only by a modest factor."""
    cfg = Config().replace(model={"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "d_ff": 256,
                                  "vocab_size": 259, "max_seq_len": 64, "dtype": "float32",
                                  "scan_layers": False},  # XLA's cost analysis counts a scanned body once
                           residual={"kind": "plain" if kind == "mla" else kind}, data={"seq_len": 64, "batch_size": 4})
    if kind == "mla":  # head dims as the paper's ratios: 128 + 64 query/key, 128 value
        cfg = cfg.replace(model={"attention": "mla", "kv_lora_rank": 32, "qk_nope_head_dim": 16,
                                 "qk_rope_head_dim": 8, "v_head_dim": 16})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(cfg, model)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    graphdef, state = nnx.split((model, optimizer))
    B, T = cfg.data.batch_size, cfg.data.seq_len
    batch = synthetic_batch(cfg)
    step = make_sharded_step(graphdef, train_state_shardings(model, optimizer, mesh, cfg), batch_shardings(batch, mesh))
    with jax.set_mesh(mesh):
        compiled = step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    ratio = cost["flops"] / (model_flops_per_token(cfg, causal=False) * B * T)
    print(f"{kind}: compiled / model FLOPs = {ratio:.3f}")
    assert 0.9 < ratio < 1.6, ratio
