"""Closed-form parameter counts (mhc_jax.model.expected_param_count / active_param_count): equal to the built
model's nnx.Param elements (abstractly, nnx.eval_shape) over attention kinds, FFN kinds, MTP, residual kinds,
Engram and tied / untied embeddings; the paper configs land within 2% of the papers' total / active counts."""

from __future__ import annotations

import pytest
from flax import nnx

from mhc_jax.config import ConfigError, load_config
from mhc_jax.model import Transformer, active_param_count, expected_param_count

ENGRAM = ["engram.enabled=true", "engram.layers=[1]", "engram.heads_per_ngram=2", "engram.head_dim=8",
          "engram.table_size=101"]
MLA = ["model.attention=mla"]
MOE = ["model.ffn=moe", "model.n_routed_experts=6", "model.experts_per_token=2", "model.moe_d_ff=24",
       "model.n_shared_experts=1", "model.first_dense_layers=1", "model.n_layers=3"]

CONFIGS = {
    "gqa": [],
    "gqa-untied-padded": ["model.tie_embeddings=false", "model.vocab_pad_multiple=64"],
    "mla": MLA,
    "mla-lowrank-q-untied": MLA + ["model.q_lora_rank=12", "model.tie_embeddings=false"],
    "mla-mtp2-mhc": MLA + ["model.mtp_depth=2", "residual.kind=mhc"],
    "gqa-mtp1-hc": ["model.mtp_depth=1", "residual.kind=hc"],
    "mla-mhc_lite-learned-collapse": MLA + ["residual.kind=mhc_lite", "residual.collapse=learned"],
    "mla-engram-mhc": MLA + ENGRAM + ["residual.kind=mhc"],
    "mla-unscanned": MLA + ["model.n_layers=3", "model.scan_layers=false"],
}
MOE_CONFIGS = {
    "moe-gqa": MOE,
    "moe-mla-mtp-mhc": MOE + MLA + ["model.mtp_depth=1", "residual.kind=mhc"],
    "moe-mla-engram-untied": MOE + MLA + ENGRAM + ["model.tie_embeddings=false", "residual.kind=mhc"],
}


def abstract_param_sizes(cfg) -> dict[str, int]:
    """{parameter path: elements} of Transformer(cfg), built abstractly (no memory, no FLOPs)."""
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return {"/".join(map(str, path)): int(v.get_value().size)
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _check(overrides):
    cfg = load_config("tiny", overrides)
    sizes = abstract_param_sizes(cfg)
    assert sum(sizes.values()) == expected_param_count(cfg)
    # Active: all but the input embedding lookup (unless it is also the head) and Engram tables, and (MoE)
    # all but experts_per_token of the routed experts.
    m = cfg.model
    lookups = sum(n for p, n in sizes.items() if (p == "embed_VC" and not m.tie_embeddings) or "table" in p)
    idle = 0
    if m.ffn == "moe":
        moe_blocks = m.n_layers - m.first_dense_layers + m.mtp_depth
        idle = moe_blocks * (m.n_routed_experts - m.experts_per_token) * 3 * m.d_model * m.moe_d_ff
    assert active_param_count(cfg) == sum(sizes.values()) - lookups - idle
    return cfg, sizes


@pytest.mark.parametrize("name", list(CONFIGS))
def test_closed_form_counts_equal_the_built_model(name):
    cfg, sizes = _check(CONFIGS[name])
    if name == "mla":  # by hand: C=32, H=4, P=32, I=16, O=32, v=32, vocab 259, 2 blocks of d_ff 64
        attn = 32 * 4 * 48 + 32 * 32 + 32 + 32 * 16 + 32 * 4 * 32 * 2 + 4 * 32 * 32
        assert sum(sizes.values()) == 259 * 32 + 2 * (attn + 3 * 32 * 64 + 2 * 32) + 32


@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_closed_form_counts_equal_the_built_moe_model(name):
    try:
        _check(MOE_CONFIGS[name])
    except ConfigError as err:
        if "ffn" not in str(err):
            raise
        pytest.skip(f"model.ffn=moe is rejected in this build: {err}")


# (config, paper total, paper active): mHC paper Table 5; Engram paper's Engram-27B total.
PAPER = [("mhc_3b", 2.97e9, 612e6), ("mhc_9b", 9.18e9, 1.66e9), ("mhc_27b", 27.0e9, 4.14e9),
         ("engram_27b", 26.7e9, None)]


@pytest.mark.parametrize("name,total,active", PAPER, ids=[p[0] for p in PAPER])
def test_paper_configs_land_within_two_percent_of_the_papers_counts(name, total, active):
    cfg = load_config(f"configs/paper/{name}.yaml")
    assert cfg.model.attention == "mla" and cfg.model.ffn == "moe"
    assert abs(expected_param_count(cfg) / total - 1) < 0.02, expected_param_count(cfg)
    if active is not None:
        assert abs(active_param_count(cfg) / active - 1) < 0.02, active_param_count(cfg)
