"""The one typed config schema: frozen dataclasses, YAML loading with `base:` inheritance, and
`section.key=value` overrides. Every bad key, type or value fails at load time with a message naming it.

A YAML file looks like

    base: tiny.yaml          # optional, resolved relative to this file
    model: {d_model: 128, n_layers: 4}
    residual: {kind: mhc}

and `load_config("configs/tiny.yaml", ["model.n_layers=2", "residual.kind=plain"])` returns a `Config`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import math
import os
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

import yaml

from mhc_jax.errors import ConfigError  # re-exported: `from mhc_jax.config import ConfigError`


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """Decoder backbone: pre-RMSNorm blocks of GQA attention (RoPE or ALiBi, optionally windowed) and a SwiGLU MLP."""

    vocab_size: int = 259  # byte tokenizer: 256 bytes + BOS/EOS/PAD
    d_model: int = 128  # C: residual stream width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # H: query heads
    n_kv_heads: int = 4  # K: key/value heads (grouped-query attention); divides n_heads
    head_dim: int = 0  # 0 means d_model // n_heads
    d_ff: int = 512  # SwiGLU hidden width
    # DeepSeekMoE (DeepSeek-V3 Sec. 2.1.2): "dense" SwiGLU or "moe" (shared + routed experts) in every block
    # after the first `first_dense_layers`.
    ffn: Literal["dense", "moe"] = "dense"
    n_shared_experts: int = 1  # always-on experts of width moe_d_ff
    n_routed_experts: int = 8  # routed experts of width moe_d_ff
    experts_per_token: int = 2  # top-k routed experts per token
    moe_d_ff: int = 128  # SwiGLU hidden width of one expert
    first_dense_layers: int = 0  # leading blocks with a dense FFN of width d_ff
    routed_scaling_factor: float = 1.0  # scales the routed experts' combined output
    n_groups: int = 1  # group-limited routing: experts split into groups
    topk_groups: int = 1  # groups a token may route to
    bias_update_rate: float = 1e-3  # aux-loss-free balancing: bias step per update
    aux_loss_weight: float = 0.0  # sequence-wise auxiliary balance loss weight (0 = off)
    capacity_factor: float = 0.0  # 0 = dropless grouped matmul; > 0 = capacity-factor variant
    max_seq_len: int = 256  # RoPE / KV-cache capacity
    rope_theta: float = 10000.0  # mHC paper Table 5 (RoPE theta 10000)
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = True  # LM head = embedding matrix transposed
    init_std: float = 0.02  # normal init std of weights; output projections get init_std / sqrt(2 n_layers)
    # Embedding rows are padded to a multiple of this so the vocab axis divides large mesh axes
    # (vocab 129280 does not divide 1024 devices). Padded rows are masked out of the softmax.
    vocab_pad_multiple: int = 1
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # master weights and optimiser state
    # "auto": bfloat16 on GPU/TPU, float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # Token positions: rotary (RoPE), ALiBi logit biases (Press et al. 2021, arXiv 2108.12409) or none (NoPE).
    position: Literal["rope", "alibi", "none"] = "rope"
    attention_window: int = 0  # sliding window: a token sees itself and the window-1 tokens before it; 0 = full causal
    global_every: int = 0  # with a window, every k-th block (k-1, 2k-1, ...) attends fully (Gemma); 0 = none do
    # auto: splash on TPU, cuDNN on GPU (bf16/fp16), else chunked (CPU: from 1024 tokens) or xla (dense).
    attention_impl: Literal["auto", "xla", "chunked", "cudnn", "splash"] = "auto"
    attention_block: int = 512  # chunked / splash: query and key block length (splash: a multiple of 128)
    # Multi-head Latent Attention (DeepSeek-V3 Sec. 2.1.1) instead of grouped-query attention; see README
    # "DeepSeek backbone". With mla, n_kv_heads and head_dim are unused.
    attention: Literal["gqa", "mla"] = "gqa"
    q_lora_rank: int = 0  # MLA query latent rank; 0 = full-rank query projection
    kv_lora_rank: int = 32  # MLA compressed KV latent: the only per-token cache besides the rope key (paper 512)
    qk_rope_head_dim: int = 16  # MLA decoupled RoPE query/key dims per head; the rope key is shared by all heads (paper 64)
    qk_nope_head_dim: int = 32  # MLA query/key dims per head without RoPE (paper: attention dim 128)
    v_head_dim: int = 32  # MLA value dims per head (paper 128)
    # Context extension: > 1 scales the softmax by YaRN's mscale^2, mscale = 0.1 ln(factor) + 1 (MLA only).
    rope_scaling_factor: float = 1.0
    mtp_depth: int = 0  # multi-token prediction modules (DeepSeek-V3 Sec. 2.2); 0 = off
    mtp_loss_weight: float = 0.3  # lambda of the MTP loss (DeepSeek-V3: 0.3, later 0.1)
    # Runs of identical blocks as one lax.scan over stacked parameters (compile time flat in depth); see README "Scan over layers".
    scan_layers: bool = True
    # Blocks per loop trip of that scan (lax.scan's unroll; >= a run's length unrolls it fully, stacked layout kept).
    # Unrolled is faster on CPU for shallow models (4 layers at nanoGPT's shape: 0.80x step time); compile time then grows with depth.
    scan_unroll: int = 1

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m


@dataclass(frozen=True)
class ResidualConfig:
    """How each sublayer is wrapped: plain residual, Hyper-Connections, mHC or mHC-lite (mhc.md)."""

    # The connection around each sublayer (one entry of mhc_jax.residual.RESIDUAL_KINDS).
    kind: Literal["plain", "hc", "mhc", "mhc_lite"] = "plain"
    n_streams: int = 4  # n in the papers; forced to 1 for `plain`
    sinkhorn_iters: int = 20  # t_max, mHC paper Eq. 9
    sinkhorn_eps: float = 0.0  # added to every Sinkhorn denominator (DeepSeek-V4: 1e-6; 0 = paper)
    sinkhorn_log_domain: bool = False  # Sinkhorn on log values with logsumexp (same result, other rounding)
    # "paper": Eq. 7-9. "deepseek_v4": sigmoid + 1e-6, softmax start + eps, transposed mixing.
    variant: Literal["paper", "deepseek_v4"] = "paper"
    # n streams -> 1 before the final norm: their sum, or DeepSeek-V4's learned head.
    collapse: Literal["sum", "learned"] = "sum"
    alpha_init: float = 0.01  # a_pre, a_post, a_res init, mHC paper Table 5
    # Ablation switches (mHC paper Table 1): a disabled mapping becomes 1/n, ones, or identity.
    use_pre: bool = True
    use_post: bool = True  # False: H_post = ones
    use_res: bool = True  # False: H_res = identity
    hc_dynamic: bool = True  # HC: dynamic (tanh) terms on; False gives static HC
    # Selective recomputation (mHC paper Sec. 4.3) in HC / mHC / mHC-lite connections: a block keeps its input
    # streams, coefficients and sublayer inputs / outputs; gates, Sinkhorn, mixing and the streams between
    # its sublayers are recomputed in backward.
    recompute: bool = True
    # "xla" or "pallas": Pallas kernels (mhc_jax.residual.mhc_pallas; Triton on GPU, Mosaic on TPU, interpret
    # mode on CPU) for mHC's coefficients (projection + gates + Sinkhorn) and every n-stream mixing; linear domain.
    impl: Literal["xla", "pallas"] = "xla"


@dataclass(frozen=True)
class EngramConfig:
    """Engram conditional memory (engram.md)."""

    enabled: bool = False  # add Engram memory at the blocks in `layers`
    layers: tuple[int, ...] = (1,)  # 0-based block indices; the demo uses [1, 15] of 30
    max_ngram: int = 3  # orders 2..max_ngram
    heads_per_ngram: int = 8  # hash heads per n-gram order: G = (max_ngram - 1) * heads_per_ngram ids per position
    head_dim: int = 32  # W: width of one table row; a position's G rows concatenate to d_mem = G * W
    table_size: int = 4093  # base size per head; per-head primes start above it (demo: 5 * vocab)
    kernel_size: int = 4  # short conv kernel (paper)
    seed: int = 0  # hash seed (demo)
    placement: Literal["device", "host"] = "device"  # tables in device memory (sharded rows) or host memory
    # Mesh axis the table rows are split over with placement=device; "auto" = over fsdp and tensor together,
    # so no mesh with a model-parallel axis leaves a table replicated (a replicated table is logged with its bytes).
    shard_axis: str = "auto"
    lr_multiplier: float = 5.0  # Engram tables: 5x base LR, no weight decay (engram.md)
    compress_tokenizer: bool = True  # hash normalised token classes (engram.md); False hashes raw ids
    # Table rows (sum of the per-head primes) are padded up to a multiple of this so the row axis divides
    # the mesh axis it is sharded over (primes divide nothing). Padded rows are never looked up.
    row_pad_multiple: int = 128
    table_init_std: float = 1.0  # demo: torch nn.Embedding default N(0, 1)
    # How tables learn. "dense": a table-sized gradient and Adam update in the jitted step (any placement).
    # "sparse": tables and Adam moments live in host RAM (numpy); the step gets only the batch's unique rows
    # and returns their gradients; a lazy row-wise Adam updates them (mhc_jax.engram.host_tables). "auto":
    # sparse with placement=host, dense with placement=device.
    update: Literal["auto", "dense", "sparse"] = "auto"
    # Rows per layer the sparse step receives (static shape). 0 = B * T * ids per position, the most a batch
    # can touch (never exceeded); a smaller bucket saves device memory and fails clearly when exceeded.
    row_bucket: int = 0
    rows_prefetch: bool = True  # sparse: gather step t+1's rows in a background thread while step t runs

    @property
    def d_mem(self) -> int:
        return (self.max_ngram - 1) * self.heads_per_ngram * self.head_dim

    @property
    def sparse(self) -> bool:
        """Whether tables are host-resident numpy arrays updated row-wise (engram.update, resolved)."""
        return self.enabled and (self.update == "sparse" or (self.update == "auto" and self.placement == "host"))


@dataclass(frozen=True)
class DataConfig:
    """Where tokens come from. `dataset` is `pystdlib` (embedded default corpus), `text:PATH` (a local
    file or folder), or `tfds:NAME` (a prepared TFDS text dataset under `data_dir`)."""

    dataset: str = "pystdlib"  # pystdlib, text:PATH or tfds:NAME
    data_dir: str = ""  # "" means ~/.cache/mhc_jax/tfds
    text_key: str = "text"  # feature holding the text (tfds: datasets)
    train_split: str = "train"  # split the trainer reads
    eval_split: str = "validation"  # split evaluation reads
    tokenizer: str = "byte"  # "byte", a SentencePiece .model file, or a Hugging Face tokenizer.json file
    seq_len: int = 128  # T: tokens per row; <= model.max_seq_len
    batch_size: int = 16  # global batch, in rows of seq_len tokens
    shuffle_seed: int = 0  # seed of the document shuffle (reseeded every epoch)
    worker_count: int = 0  # Grain worker processes; 0 = in-process
    prefetch: int = 2  # batches prefetched in a background thread
    read_threads: int = 2  # threads that read and tokenize documents (Grain ReadOptions.num_threads)
    corpus_max_mb: float = 16.0  # pystdlib: first N MB of the sorted stdlib files (3.11 holds ~12 MB)
    doc_chars: int = 4096  # text:PATH: documents are whole paragraphs up to this many characters


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup then cosine or the mHC paper's step decay (x0.316 at 80%, x0.1 at 90%)."""

    lr: float = 3e-3  # peak learning rate
    b1: float = 0.9  # mHC paper Table 5
    b2: float = 0.95  # Adam beta2
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.1  # AdamW decay of weight matrices (norms, mHC/HC coefficients, Engram tables: none)
    warmup_steps: int = 100  # linear warmup from 0
    # After warmup: cosine to min_lr_ratio * lr, the mHC paper's step decay, or constant.
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    clip_norm: float = 1.0  # 0 disables clipping


@dataclass(frozen=True)
class TrainingConfig:
    steps: int = 1000  # optimiser steps in total
    seed: int = 0  # parameter init seed
    grad_accum: int = 1  # micro-batches per step; batch_size must divide by it
    # Recompute each block in the backward pass: nothing, everything, or all but the matmul outputs.
    remat: Literal["none", "full", "save_matmuls"] = "none"
    log_every: int = 10  # steps between metric rows (and host syncs)
    eval_every: int = 200  # steps between evaluations
    eval_batches: int = 8  # batches per evaluation
    diagnostics_every: int = 100  # mHC composite gains; 0 disables
    max_nonfinite_in_row: int = 5  # stop after this many non-finite steps in a row (each one is skipped)
    sample_tokens: int = 200  # generated at the end of train.py
    sample_prompt: str = "def "  # prompt of the sample generated at the end
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = measure with a matmul probe
    plots: bool = True  # PNGs of loss, lr, grad norm, tokens/s and mHC gains in workdir/plots at the end of a run
    profile_steps: tuple[int, ...] = ()  # [first, last] (1-based, inclusive): jax.profiler trace into workdir/profile


MESH_AXES: tuple[str, ...] = ("dcn_data", "data", "fsdp", "tensor", "expert")  # MeshConfig's axes, in mesh order


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh. -1 takes the devices that the other axes leave."""

    dcn_data: int = 1  # data parallelism across slices (data-centre network)
    data: int = -1  # data parallelism inside a slice
    fsdp: int = 1  # FSDP / ZeRO-3: parameters and optimiser state sharded, batch split
    tensor: int = 1  # tensor parallelism: heads, MLP width, vocabulary
    expert: int = 1  # expert parallelism: routed experts split over it (tokens reach them by all-to-all); also splits the batch
    zero1: bool = False  # params replicated over fsdp, optimiser state sharded


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 200  # steps between checkpoints (and one at the end)
    keep: int = 3  # newest checkpoints kept
    async_save: bool = True  # write checkpoints in the background


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    residual: ResidualConfig = field(default_factory=ResidualConfig)
    engram: EngramConfig = field(default_factory=EngramConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def replace(self, **sections: Any) -> "Config":
        """`cfg.replace(model={"n_layers": 2})` returns a validated copy with those keys changed."""
        return from_dict(merge_dicts(to_dict(self), sections))

    @property
    def engram_row_bucket(self) -> int:
        """Rows per Engram layer the sparse step receives: engram.row_bucket, or (0) the most one batch can
        touch, batch_size * seq_len * ids per position (never exceeded)."""
        e = self.engram
        return e.row_bucket or self.data.batch_size * self.data.seq_len * (e.max_ngram - 1) * e.heads_per_ngram

    @property
    def n_streams(self) -> int:
        return 1 if self.residual.kind == "plain" else self.residual.n_streams


# --------------------------------------------------------------------------------------------------
# Validation: impossible values, each naming the key, the value and what is allowed
# --------------------------------------------------------------------------------------------------


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def validate(cfg: Config) -> Config:
    m, r, e, d, o, t, c = (cfg.model, cfg.residual, cfg.engram, cfg.data, cfg.optimizer,
                           cfg.training, cfg.checkpoint)
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len",
                "vocab_pad_multiple"):
        _require(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "must be >= 1")
    _require(m.head_dim >= 0, "model.head_dim", m.head_dim, "must be >= 0 (0 = d_model // n_heads)")
    _require(m.scan_unroll >= 1, "model.scan_unroll", m.scan_unroll, "must be >= 1 (blocks per loop trip of the scan)")
    if m.head_dim == 0:
        _require(m.d_model % m.n_heads == 0, "model.n_heads", m.n_heads,
                 f"must divide model.d_model={m.d_model} (or set model.head_dim)")
    _require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads", m.n_kv_heads,
             f"must divide model.n_heads={m.n_heads} (grouped-query attention)")
    if m.position == "rope":
        _require(m.resolved_head_dim % 2 == 0, "model.head_dim", m.resolved_head_dim, "must be even (RoPE)")
    _require(m.attention_window >= 0, "model.attention_window", m.attention_window, "must be >= 0 (0 = full causal)")
    _require(m.global_every >= 0, "model.global_every", m.global_every, "must be >= 0 (0 = no global blocks)")
    _require(m.global_every == 0 or m.attention_window > 0, "model.global_every", m.global_every,
             "interleaves full blocks among windowed ones, so it needs model.attention_window > 0")
    _require(m.attention_block >= 1, "model.attention_block", m.attention_block, "must be >= 1")
    if m.attention_impl == "splash":
        _require(m.position != "alibi", "model.position", m.position,
                 "the splash kernel takes no logit bias: use rope or none, or attention_impl chunked/xla/cudnn")
        _require(m.attention_block % 128 == 0, "model.attention_block", m.attention_block,
                 "must be a multiple of 128 (TPU lanes) with attention_impl=splash")
        _require(cfg.data.seq_len % 128 == 0, "data.seq_len", cfg.data.seq_len,
                 "must be a multiple of 128 with model.attention_impl=splash (its blocks are 128-lane tiles)")
    if m.attention == "mla":
        for key in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            _require(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "must be >= 1 with model.attention=mla")
        _require(m.qk_rope_head_dim >= 2 and m.qk_rope_head_dim % 2 == 0, "model.qk_rope_head_dim",
                 m.qk_rope_head_dim, "must be even and >= 2 (MLA's decoupled RoPE part)")
        _require(m.q_lora_rank >= 0, "model.q_lora_rank", m.q_lora_rank, "must be >= 0 (0 = full-rank query)")
        _require(m.position == "rope", "model.position", m.position,
                 "must be rope with model.attention=mla (MLA's decoupled RoPE key carries the positions)")
        _require(m.attention_impl in ("auto", "xla", "chunked"), "model.attention_impl", m.attention_impl,
                 "must be auto, xla or chunked with model.attention=mla (the fused cuDNN / splash kernels "
                 "are not wired to MLA's unequal query/key and value head dims)")
    _require(m.rope_scaling_factor >= 1, "model.rope_scaling_factor", m.rope_scaling_factor, "must be >= 1 (1 = off)")
    _require(m.rope_scaling_factor == 1 or m.attention == "mla", "model.rope_scaling_factor", m.rope_scaling_factor,
             "must be 1 with model.attention=gqa (YaRN's softmax temperature is implemented for MLA only)")
    _require(m.mtp_depth >= 0, "model.mtp_depth", m.mtp_depth, "must be >= 0 (0 = off)")
    _require(m.mtp_loss_weight >= 0, "model.mtp_loss_weight", m.mtp_loss_weight, "must be >= 0")
    _require(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be > 0")
    _require(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "must be > 0")
    _require(m.init_std > 0, "model.init_std", m.init_std, "must be > 0")
    if m.ffn == "moe":
        for key in ("n_routed_experts", "experts_per_token", "moe_d_ff", "n_groups", "topk_groups"):
            _require(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "must be >= 1")
        _require(m.n_shared_experts >= 0, "model.n_shared_experts", m.n_shared_experts, "must be >= 0")
        _require(0 <= m.first_dense_layers <= m.n_layers, "model.first_dense_layers", m.first_dense_layers,
                 f"must be in [0, model.n_layers={m.n_layers}]")
        _require(m.n_routed_experts % m.n_groups == 0, "model.n_groups", m.n_groups,
                 f"must divide model.n_routed_experts={m.n_routed_experts}")
        _require(m.topk_groups <= m.n_groups, "model.topk_groups", m.topk_groups,
                 f"must be <= model.n_groups={m.n_groups}")
        _require(m.experts_per_token <= m.topk_groups * (m.n_routed_experts // m.n_groups), "model.experts_per_token",
                 m.experts_per_token, f"must be <= the experts in model.topk_groups={m.topk_groups} groups "
                 f"({m.topk_groups * (m.n_routed_experts // m.n_groups)})")
        _require(m.routed_scaling_factor > 0, "model.routed_scaling_factor", m.routed_scaling_factor, "must be > 0")
        _require(m.bias_update_rate >= 0, "model.bias_update_rate", m.bias_update_rate, "must be >= 0")
        _require(m.aux_loss_weight >= 0, "model.aux_loss_weight", m.aux_loss_weight, "must be >= 0")
        _require(m.capacity_factor >= 0, "model.capacity_factor", m.capacity_factor,
                 "must be >= 0 (0 = dropless)")
        ep = cfg.mesh.expert
        _require(ep == -1 or m.n_routed_experts % ep == 0, "mesh.expert", ep,
                 f"must divide model.n_routed_experts={m.n_routed_experts}")

    _require(r.n_streams >= 1, "residual.n_streams", r.n_streams, "must be >= 1")
    _require(r.sinkhorn_iters >= 1, "residual.sinkhorn_iters", r.sinkhorn_iters, "must be >= 1")
    _require(r.sinkhorn_eps >= 0, "residual.sinkhorn_eps", r.sinkhorn_eps, "must be >= 0")
    if r.impl == "pallas":
        _require(not r.sinkhorn_log_domain, "residual.sinkhorn_log_domain", r.sinkhorn_log_domain,
                 "must be false with residual.impl=pallas (the kernel runs the linear-domain iteration)")
        # The kernels walk each stream in power-of-two chunks of <= 1024 columns, at most 64 of them.
        _require(r.kind == "plain" or m.d_model // min(m.d_model & -m.d_model, 1024) <= 64, "model.d_model",
                 m.d_model, "must be a multiple of 128 (or of d_model / 64) with residual.impl=pallas")
    if r.kind == "mhc_lite":
        _require(r.n_streams <= 6, "residual.n_streams", r.n_streams,
                 "mhc_lite mixes all n! permutations; use n_streams <= 6")

    if e.enabled:
        _require(len(e.layers) >= 1, "engram.layers", e.layers, "must list at least one block index")
        for layer in e.layers:
            _require(0 <= layer < m.n_layers, "engram.layers", e.layers,
                     f"block indices must be in [0, model.n_layers={m.n_layers})")
        _require(len(set(e.layers)) == len(e.layers), "engram.layers", e.layers, "must not repeat")
        _require(e.max_ngram >= 2, "engram.max_ngram", e.max_ngram, "must be >= 2 (orders 2..max_ngram)")
        for key in ("heads_per_ngram", "head_dim", "table_size", "kernel_size", "row_pad_multiple"):
            _require(getattr(e, key) >= 1, f"engram.{key}", getattr(e, key), "must be >= 1")
        _require(e.lr_multiplier > 0, "engram.lr_multiplier", e.lr_multiplier, "must be > 0")
        _require(e.table_init_std > 0, "engram.table_init_std", e.table_init_std, "must be > 0")
        _require(e.update != "sparse" or e.placement == "host", "engram.update", e.update,
                 "'sparse' keeps tables in host RAM: set engram.placement=host (or update=dense)")
        _require(e.row_bucket >= 0, "engram.row_bucket", e.row_bucket, "must be >= 0 (0 = B * T * ids per position)")
    _require(e.shard_axis == "auto" or e.shard_axis in MESH_AXES, "engram.shard_axis", e.shard_axis,
             f"must be 'auto' or one of {MESH_AXES}")

    _require(bool(d.dataset), "data.dataset", d.dataset, "name a dataset: pystdlib, text:PATH or tfds:NAME")
    _require(d.dataset == "pystdlib" or d.dataset.startswith(("text:", "tfds:")), "data.dataset",
             d.dataset, "must be 'pystdlib', 'text:PATH' or 'tfds:NAME'")
    for key in ("seq_len", "batch_size"):
        _require(getattr(d, key) >= 1, f"data.{key}", getattr(d, key), "must be >= 1")
    _require(d.seq_len <= m.max_seq_len, "data.seq_len", d.seq_len,
             f"must be <= model.max_seq_len={m.max_seq_len}")
    _require(d.worker_count >= 0, "data.worker_count", d.worker_count, "must be >= 0")
    _require(d.prefetch >= 0, "data.prefetch", d.prefetch, "must be >= 0")
    _require(d.read_threads >= 1, "data.read_threads", d.read_threads, "must be >= 1")
    _require(d.corpus_max_mb > 0, "data.corpus_max_mb", d.corpus_max_mb, "must be > 0")
    _require(d.doc_chars >= 1, "data.doc_chars", d.doc_chars, "must be >= 1")

    _require(o.lr > 0, "optimizer.lr", o.lr, "must be > 0")
    _require(0 <= o.b1 < 1, "optimizer.b1", o.b1, "must be in [0, 1)")
    _require(0 <= o.b2 < 1, "optimizer.b2", o.b2, "must be in [0, 1)")
    _require(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "must be >= 0")
    _require(o.warmup_steps >= 0, "optimizer.warmup_steps", o.warmup_steps, "must be >= 0")
    _require(0 <= o.min_lr_ratio <= 1, "optimizer.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    _require(o.clip_norm >= 0, "optimizer.clip_norm", o.clip_norm, "must be >= 0 (0 disables)")

    _require(t.steps >= 1, "training.steps", t.steps, "must be >= 1")
    _require(t.grad_accum >= 1, "training.grad_accum", t.grad_accum, "must be >= 1")
    _require(d.batch_size % t.grad_accum == 0, "training.grad_accum", t.grad_accum,
             f"must divide data.batch_size={d.batch_size}")
    for key in ("log_every", "eval_every", "eval_batches", "max_nonfinite_in_row"):
        _require(getattr(t, key) >= 1, f"training.{key}", getattr(t, key), "must be >= 1")
    _require(t.diagnostics_every >= 0, "training.diagnostics_every", t.diagnostics_every, "must be >= 0")
    _require(t.peak_flops >= 0, "training.peak_flops", t.peak_flops, "must be >= 0 (0 = measure)")
    _require(t.profile_steps == () or (len(t.profile_steps) == 2 and 1 <= t.profile_steps[0] <= t.profile_steps[1]),
             "training.profile_steps", t.profile_steps, "must be [] (off) or [first, last] with 1 <= first <= last")

    for key in MESH_AXES:
        v = getattr(cfg.mesh, key)
        _require(v == -1 or v >= 1, f"mesh.{key}", v, "must be >= 1, or -1 for the remaining devices")
    _require([getattr(cfg.mesh, k) for k in MESH_AXES].count(-1) <= 1,
             "mesh", cfg.mesh, "at most one axis may be -1")

    _require(c.every >= 1, "checkpoint.every", c.every, "must be >= 1")
    _require(c.keep >= 1, "checkpoint.keep", c.keep, "must be >= 1")
    return cfg


# --------------------------------------------------------------------------------------------------
# Dict <-> dataclass with type checking
# --------------------------------------------------------------------------------------------------


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def merge_dicts(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Checks `value` against the annotation `tp`; ints are accepted for floats, lists for tuples."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}={value!r} is not allowed: must be {_type_name(tp)}")
        return value
    if origin in (tuple,):
        (elem, *_rest) = get_args(tp)
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a list of {_type_name(elem)}")
        return tuple(_coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {tp}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a number")
        try:
            value = float(value)
        except OverflowError:  # an int beyond float range
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} is not allowed: must be a finite number")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a string")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}={data!r} has the wrong type: expected a mapping of keys")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in set(data) - set(names))
    if unknown:
        where = f"section '{prefix}'" if prefix else "the config"
        raise ConfigError(f"unknown key {prefix + '.' if prefix else ''}{unknown[0]} in {where}; "
                          f"allowed keys: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        kwargs[name] = (_build(tp, data[name], key) if dataclasses.is_dataclass(tp)
                        else _coerce(key, data[name], tp))
    return cls(**kwargs)


def from_dict(data: dict) -> Config:
    return validate(_build(Config, data, ""))


# --------------------------------------------------------------------------------------------------
# YAML files and command-line overrides
# --------------------------------------------------------------------------------------------------

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def resolve_config_path(path: str) -> str:
    """A path as given, or a name under configs/ (`tiny`, `tiny.yaml`)."""
    candidates = [path, os.path.join(CONFIG_DIR, path), os.path.join(CONFIG_DIR, path + ".yaml")]
    for c in candidates:
        if os.path.isfile(c):
            return c
    available = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml")) \
        if os.path.isdir(CONFIG_DIR) else []
    raise ConfigError(f"config file {path!r} does not exist; give a path or one of: {', '.join(available)}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise ConfigError(f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line} "
                                      f"of {key_node.start_mark.name}); keep one")
                seen[key] = line
            except TypeError:  # an unhashable key: the base class reports it
                break
        return super().construct_mapping(node, deep=deep)


def _load_yaml_tree(path: str, seen: tuple[str, ...] = ()) -> dict:
    path = os.path.abspath(resolve_config_path(path))
    if path in seen:
        raise ConfigError(f"config {path} extends itself through 'base' ({' -> '.join(seen + (path,))})")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"base={base!r} in {path} is not allowed: must be the path (or configs/ name) of "
                          "another YAML config, e.g. base: tiny.yaml")
    base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
    if not os.path.isfile(base_path):
        base_path = base  # fall back to a name under configs/
    return merge_dicts(_load_yaml_tree(base_path, seen + (path,)), data)


def parse_override(text: str) -> dict:
    """`model.n_layers=2` -> {"model": {"n_layers": 2}}; the value is parsed as YAML (so `[1, 3]`,
    `true`, `1e-3` work) except that a value YAML reads as a date or null stays a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must be section.key (e.g. model.n_layers=2)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    if value is None or not isinstance(value, (int, float, bool, str, list)):
        value = raw
    return {parts[0]: {parts[1]: value}}


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Loads `path` (following `base:`) or the defaults, applies `section.key=value` overrides, validates."""
    return config_from_dict(_load_yaml_tree(path) if path else {}, overrides)


def config_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A config from a (possibly partial) dict, e.g. the one stored in a checkpoint, plus overrides."""
    for item in overrides:
        data = merge_dicts(data, parse_override(item))
    return from_dict(data)


def save_config(cfg: Config, path: str) -> None:
    """Writes `path` atomically (a temporary file renamed over it), so a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# The README's config reference, generated from the schema so it cannot drift
# --------------------------------------------------------------------------------------------------


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: description} of a schema dataclass, read from this file: the comment lines right above
    a field, then the comment on its line (the comment is the doc; a field without one has "")."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    docs = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, line = [], node.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            trailing = [comments[node.end_lineno]] if node.end_lineno in comments and \
                not lines[node.end_lineno - 1].strip().startswith("#") else []
            docs[node.target.id] = " ".join(above + trailing)
    return docs


def reference_markdown() -> str:
    """A markdown table per section: key, type, default, description. `python -m mhc_jax.config` prints it."""
    out = []
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        doc = " ".join((cls.__doc__ or "").split())
        out.append(f"**`{section.name}`**: {doc}\n")
        out.append("| key | type | default | description |\n|---|---|---|---|")
        section_hints = typing.get_type_hints(cls)
        default = cls()
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            tp = section_hints[f.name]
            type_name = " \\| ".join(repr(a) for a in get_args(tp)) if get_origin(tp) is Literal \
                else ("list of " + _type_name(get_args(tp)[0]) if get_origin(tp) is tuple else _type_name(tp))
            value = getattr(default, f.name)
            value = list(value) if isinstance(value, tuple) else value
            out.append(f"| `{section.name}.{f.name}` | {type_name} | `{value!r}` | "
                       f"{docs[f.name].replace('|', chr(92) + '|')} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
