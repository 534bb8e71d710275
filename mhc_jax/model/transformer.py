"""The decoder-only language model: embedding -> expand to n streams -> blocks -> collapse -> norm -> head.

Each block hands its two sublayers (norm + attention, norm + MLP) as branches to residual-connection
modules (plain / HC / mHC / mHC-lite, see mhc_jax.residual), and, at the blocks listed in
`engram.layers`, adds the Engram memory to every stream before attention.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mhc_jax.config import Config
from mhc_jax.engram.layer import Engram
from mhc_jax.model.attention import Attention, KVCache, init_kv_cache
from mhc_jax.model.masks import layer_windows
from mhc_jax.model.mla import MLA, init_mla_cache
from mhc_jax.model.mlp import MLP
from mhc_jax.model.moe import MoE, MoeStats, is_moe_block
from mhc_jax.layers import RMSNorm, compute_dtype, param
from mhc_jax.residual import expand, make_collapse, make_residual
from mhc_jax.sharding import constrain

STREAM_AXES = ("activation_batch", "activation_length", "activation_streams", "activation_embed")  # x_BTnC
LayerCache = dict[str, Any]  # {"attn": KVCache, "engram": engram conv state (if the block has Engram)}

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    def __init__(self, cfg: Config, index: int, *, rngs: nnx.Rngs, window: int = 0):
        """`window`: this block's attention window (0 = full causal), from masks.layer_windows: the one
        attention setting that differs between blocks, passed in so runs of equal blocks can be grouped."""
        m = cfg.model
        dtype = compute_dtype(m.dtype)
        # GPT-2 style: output projections scaled by 1/sqrt(2 * n_layers) so the residual variance
        # does not grow with depth.
        out_std = m.init_std / math.sqrt(2 * m.n_layers)
        self.index = index
        self.attn_norm = RMSNorm(m.d_model, eps=m.norm_eps, dtype=dtype, rngs=rngs)
        attention = MLA if m.attention == "mla" else Attention
        self.attn = attention(m, dtype=dtype, out_std=out_std, rngs=rngs, window=window)
        self.mlp_norm = RMSNorm(m.d_model, eps=m.norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = (MoE(m, dtype=dtype, out_std=out_std, rngs=rngs) if is_moe_block(m, index)
                    else MLP(m, dtype=dtype, out_std=out_std, rngs=rngs))
        self.attn_res = make_residual(cfg.residual, m.d_model, 2 * index, norm_eps=m.norm_eps, rngs=rngs)
        self.mlp_res = make_residual(cfg.residual, m.d_model, 2 * index + 1, norm_eps=m.norm_eps, rngs=rngs)
        engram = None
        if cfg.engram.enabled and index in cfg.engram.layers:
            engram = Engram(cfg.engram, index, d_model=m.d_model, n_streams=cfg.n_streams, n_layers=m.n_layers,
                            init_std=m.init_std, norm_eps=m.norm_eps, dtype=m.dtype, param_dtype=m.param_dtype,
                            rngs=rngs)
        self.engram = nnx.data(engram)

    def __call__(self, x_BTnC: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array,
                 engram_ids_BTG: jax.Array | None, cache: LayerCache | None,
                 engram_rows_UW: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
        new_cache: LayerCache | None = None if cache is None else dict(cache)
        if self.engram is not None:
            if engram_ids_BTG is None:
                raise ValueError(f"block {self.index} has Engram but no engram_ids were given; the data "
                                 "pipeline (or generate) must hash the input tokens")
            y_BTnC, engram_state = self.engram(x_BTnC, engram_ids_BTG, segment_ids_BT,
                                               None if cache is None else cache["engram"], engram_rows_UW)
            x_BTnC = x_BTnC + y_BTnC.astype(x_BTnC.dtype)
            if new_cache is not None:
                new_cache["engram"] = engram_state

        def attention_branch(h_BTC: jax.Array) -> jax.Array:
            out_BTC, kv = self.attn(self.attn_norm(h_BTC), positions_BT, segment_ids_BT,
                                    None if cache is None else cache["attn"])
            if new_cache is not None:
                new_cache["attn"] = kv
            return out_BTC

        # The streams between the sublayers are recomputed from what they are made of (`source`), not kept for
        # the backward pass (n-stream kinds with residual.recompute; StreamConnection.with_source).
        x_BTnC, source = self.attn_res.with_source(x_BTnC, attention_branch)
        x_BTnC = constrain(x_BTnC, STREAM_AXES)
        x_BTnC = self.mlp_res(x_BTnC, lambda h_BTC: self.mlp(self.mlp_norm(h_BTC)), source)
        x_BTnC = constrain(x_BTnC, STREAM_AXES)
        return x_BTnC, new_cache


# --------------------------------------------------------------------------------------------------
# Scan over layers (model.scan_layers)
#
# Scheme: blocks are grouped into maximal runs of consecutive blocks with the same parameter structure
# (`block_key`: dense or MoE feed-forward); a run of two or more becomes one `BlockStack` whose parameters
# carry a leading "layers" axis (one row per block, in block order) and which runs as one `lax.scan`, so the
# compiled program holds one body per run, not one per layer. Blocks of a run may still differ in how they
# compute (`block_variant`: the attention window): when the variants repeat with a period p (e.g. local /
# global windows alternating, model.global_every=2: p = 2) the scan runs over groups of p consecutive blocks
# and its body applies the period's p blocks in order, each with its own variant and remat policy; a run
# whose variants are not periodic (a tail shorter than a period, or no repetition) splits into runs of equal
# variants. The program then holds at most p block bodies per run, whatever the depth. A block unlike its
# neighbours stays a plain `Block` called as itself: every Engram block (its own table rows and hash
# primes), and any leading block that differs. Each layer is still built by `Block(cfg, index)` (per-index
# initialisation, e.g. HC's one-hot on stream index mod n, is kept) and the results are stacked.
# Checkpoints store the stacked layout: `blocks/<group>/layers/...` with a leading layer axis.
# --------------------------------------------------------------------------------------------------


def block_key(cfg: Config, index: int) -> tuple | None:
    """Block `index`'s parameter structure: blocks that may share a scan have equal keys; None: never stacked."""
    if cfg.engram.enabled and index in cfg.engram.layers:
        return None
    return ("block", is_moe_block(cfg.model, index))


def block_variant(cfg: Config, index: int) -> int:
    """What else makes block `index` compile to another program than its neighbours: its attention window.
    (A new per-block static setting goes here and into `BlockStack._variant`.)"""
    m = cfg.model
    return layer_windows(m.n_layers, m.attention_window, m.global_every)[index]


def _period(variants: list) -> int:
    """The smallest p such that the sequence repeats with period p at least twice (variants[i] ==
    variants[i - p]), or 0 if there is none."""
    for p in range(1, len(variants) // 2 + 1):
        if all(variants[i] == variants[i - p] for i in range(p, len(variants))):
            return p
    return 0


def _split_run(run: list[int], variants: list) -> list[list[int]]:
    """A run of structurally equal blocks -> groups: whole periods of a periodic variant pattern as one
    group, the tail (a prefix of the period) grouped likewise; a non-periodic run as runs of equal variants."""
    if len(run) < 2:
        return [run] if run else []
    p = _period(variants)
    if p:
        whole = len(run) // p * p
        return [run[:whole]] + _split_run(run[whole:], variants[whole:])
    groups: list[list[int]] = []
    for i, v in zip(run, variants):
        if groups and variants[run.index(groups[-1][-1])] == v:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def block_groups(cfg: Config) -> list[tuple[int, ...]]:
    """Block indices in order, grouped for model.scan_layers (`_split_run` of each run of equal, non-None
    `block_key`); a group of one is a plain Block."""
    runs: list[list[int]] = []
    for i in range(cfg.model.n_layers):
        key = block_key(cfg, i)
        if runs and key is not None and block_key(cfg, runs[-1][-1]) == key:
            runs[-1].append(i)
        else:
            runs.append([i])
    return [tuple(g) for run in runs for g in _split_run(run, [block_variant(cfg, i) for i in run])]


def _stack_variables(*variables: nnx.Variable) -> nnx.Variable:
    axes = variables[0].get_metadata().get("axes")
    value = jnp.stack([v.get_value() for v in variables])
    return variables[0].replace(value, **({} if axes is None else {"axes": ("layers", *axes)}))


class BlockStack(nnx.Module):
    """Blocks `indices` (same parameter structure) with parameters stacked on a leading "layers" axis in
    block order, run by one scan over periods of their variants (`block_variant`, e.g. the window)."""

    def __init__(self, cfg: Config, indices: tuple[int, ...], *, rngs: nnx.Rngs, windows: tuple[int, ...]):
        """`windows`: each block's attention window (masks.layer_windows), periodic over `indices`."""
        self.indices = tuple(indices)
        self.period = _period(list(windows)) or 1
        self.unroll = max(1, cfg.model.scan_unroll // self.period)  # loop trips run over periods of blocks
        self.windows = tuple(windows[:self.period])  # block j of the stack has windows[j % period]
        if len(indices) % self.period or tuple(windows) != self.windows * (len(indices) // self.period):
            raise ValueError(f"blocks {indices}: windows {windows} do not repeat with a period dividing the run")
        blocks = [Block(cfg, i, rngs=rngs, window=w) for i, w in zip(indices, windows)]
        graphdef, _ = nnx.split(blocks[0])
        stacked = jax.tree.map(_stack_variables, *[nnx.state(b) for b in blocks],
                               is_leaf=lambda x: isinstance(x, nnx.Variable))
        self.layers = nnx.merge(graphdef, stacked)

    def _variant(self, layer: Block, j: int) -> Block:
        """`layer` (a merged slice of the stack) set up as block j of a period."""
        layer.attn.window = self.windows[j % self.period]
        return layer

    def layer(self, j: int) -> Block:
        """Layer j of the stack as a Block (the decode path runs the layers one by one with their caches)."""
        graphdef, state = nnx.split(self.layers)
        return self._variant(nnx.merge(graphdef, jax.tree.map(lambda a: a[j], state)), j)

    def __call__(self, x_BTnC: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array,
                 remat: str) -> jax.Array:
        graphdef, state = nnx.split(self.layers)
        p = self.period

        def apply(j: int, x: jax.Array, layer_state: Any) -> tuple[jax.Array, Any]:
            layer = self._variant(nnx.merge(graphdef, layer_state), j)
            x, _ = layer(x, positions_BT, segment_ids_BT, None, None)
            return x, nnx.state(layer, MoeStats)  # what each MoE layer routed leaves the scan as ys

        steps = [functools.partial(apply, j) for j in range(p)]
        if remat != "none":  # each block rematerialised on its own, as in the unrolled loop
            steps = [jax.checkpoint(f, policy=REMAT_POLICIES[remat], prevent_cse=False) for f in steps]

        def body(x: jax.Array, period_state: Any) -> tuple[jax.Array, Any]:
            stats = []
            for j, step in enumerate(steps):
                x, s = step(x, jax.tree.map(lambda a: a[j], period_state))
                stats.append(s)
            return x, jax.tree.map(lambda *a: jnp.stack(a), *stats)

        by_period = jax.tree.map(lambda a: a.reshape(a.shape[0] // p, p, *a.shape[1:]), state)
        x_BTnC, stats = jax.lax.scan(body, x_BTnC, by_period, unroll=self.unroll)
        nnx.update(self.layers, jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), stats))
        return x_BTnC


def unstacked_state(cfg: Config, state: nnx.State) -> nnx.State:
    """The state of a model built with `cfg` (model.scan_layers on) in the unscanned layout: each stacked
    `blocks/<group>/layers/...` variable sliced into `blocks/<i>/...` per layer, single blocks renumbered.
    Works on concrete and traced values (slicing a stacked array is what the scan does anyway)."""
    groups = block_groups(cfg)
    flat = []
    for path, var in nnx.to_flat_state(state):
        if not path or path[0] != "blocks":
            flat.append((path, var))
            continue
        g, rest = int(path[1]), path[2:]
        if rest[:1] == ("layers",):
            axes = var.get_metadata().get("axes")
            for j, i in enumerate(groups[g]):
                flat.append((("blocks", i, *rest[1:]),
                             var.replace(var.get_value()[j], **({} if axes is None else {"axes": axes[1:]}))))
        else:
            flat.append((("blocks", groups[g][0], *rest), var))
    return nnx.from_flat_state(flat)


class MTPModule(nnx.Module):
    """One multi-token prediction module (DeepSeek-V3 Sec. 2.2, Eq. 21-23): h'_k = M_k [RMSNorm(h_{k-1});
    RMSNorm(Emb(t_{i+k}))] (the 2C -> C projection M_k kept as its two C x C halves, M_k [a; b] = a W_h + b W_e),
    then one transformer block; the embedding and the LM head are the main model's, the output RMSNorm is the
    module's own (DeepSeek-V3's shared_head.norm). The block is built as block n_layers + k (so, with MoE, a MoE
    block like the last ones) with a plain residual and no window: with mHC the module works on the main
    model's collapsed hidden state (the n streams summed / mixed by the collapse head), a single stream."""

    def __init__(self, cfg: Config, depth: int, *, rngs: nnx.Rngs):
        m = cfg.model
        dtype = compute_dtype(m.dtype)
        C, pdt = m.d_model, jnp.dtype(m.param_dtype)
        init = nnx.initializers.normal(m.init_std)
        self.hidden_norm = RMSNorm(C, eps=m.norm_eps, dtype=dtype, rngs=rngs)
        self.embed_norm = RMSNorm(C, eps=m.norm_eps, dtype=dtype, rngs=rngs)
        self.w_hidden_CC = param(rngs, init, (C, C), ("embed", "embed"), pdt)
        self.w_embed_CC = param(rngs, init, (C, C), ("embed", "embed"), pdt)
        self.block = Block(cfg.replace(residual={"kind": "plain"}), m.n_layers + depth, rngs=rngs)
        self.out_norm = RMSNorm(C, eps=m.norm_eps, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, h_BTC: jax.Array, embeds_BTC: jax.Array, positions_BT: jax.Array,
                 segment_ids_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(this depth's hidden state h_k for the next module, its normalised output for the shared head)."""
        dt = self.dtype
        x_BTC = (self.hidden_norm(h_BTC) @ self.w_hidden_CC[...].astype(dt)
                 + self.embed_norm(embeds_BTC) @ self.w_embed_CC[...].astype(dt))
        x_BT1C, _ = self.block(x_BTC[:, :, None], positions_BT, segment_ids_BT, None, None)
        return x_BT1C[:, :, 0], self.out_norm(x_BT1C[:, :, 0])


def shift_left(x_BT: jax.Array, k: int, fill: int | float = 0) -> jax.Array:
    """x[:, t + k] at t, `fill` past the end: the token (target, mask) k positions ahead of each position."""
    return jnp.concatenate([x_BT[:, k:], jnp.full((x_BT.shape[0], k, *x_BT.shape[2:]), fill, x_BT.dtype)], axis=1)


class Transformer(nnx.Module):
    """Decoder-only LM. `model(tokens_BT, ...)` -> logits (B, T, padded_vocab) in float32, with the padded
    vocabulary rows masked to a large negative value."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        m = cfg.model
        self.cfg = cfg
        self.dtype = compute_dtype(m.dtype)
        self.n_streams = cfg.n_streams
        V = m.padded_vocab_size
        self.embed_VC = param(rngs, nnx.initializers.normal(m.init_std), (V, m.d_model), ("vocab", "embed"),
                             jnp.dtype(m.param_dtype))
        windows = layer_windows(m.n_layers, m.attention_window, m.global_every)
        if m.scan_layers:
            self.blocks = nnx.List([Block(cfg, g[0], rngs=rngs, window=windows[g[0]]) if len(g) == 1
                                    else BlockStack(cfg, g, rngs=rngs, windows=tuple(windows[i] for i in g))
                                    for g in block_groups(cfg)])
        else:
            self.blocks = nnx.List([Block(cfg, i, rngs=rngs, window=windows[i]) for i in range(m.n_layers)])
        self.collapse = make_collapse(cfg.residual, m.d_model, norm_eps=m.norm_eps, rngs=rngs)
        self.final_norm = RMSNorm(m.d_model, eps=m.norm_eps, dtype=self.dtype, rngs=rngs)
        self.head_CV = nnx.data(None if m.tie_embeddings else param(
            rngs, nnx.initializers.normal(m.init_std), (m.d_model, V), ("embed", "vocab"), jnp.dtype(m.param_dtype)))
        self.remat = cfg.training.remat
        self.mtp = nnx.List([MTPModule(cfg, k + 1, rngs=rngs) for k in range(m.mtp_depth)])

    def __call__(self, tokens_BT: jax.Array, *, positions_BT: jax.Array | None = None,
                 segment_ids_BT: jax.Array | None = None,
                 engram_ids_BTEG: jax.Array | None = None, engram_rows_EUW: jax.Array | None = None,
                 embeds_BTC: jax.Array | None = None) -> jax.Array:
        """engram_ids_BTEG: table ids per Engram layer (config order) and hash head (the batch layout, mhc_jax.data);
        with engram.update=sparse, slots into engram_rows_EUW (the batch's unique rows per layer).
        embeds_BTC: input embeddings used instead of the rows of `tokens_BT` (integrated gradients)."""
        logits, _ = self._run(tokens_BT, positions_BT, segment_ids_BT, engram_ids_BTEG, None, engram_rows_EUW,
                              embeds_BTC)
        return logits

    def with_mtp(self, tokens_BT: jax.Array, *, positions_BT: jax.Array | None = None,
                 segment_ids_BT: jax.Array | None = None, engram_ids_BTEG: jax.Array | None = None,
                 engram_rows_EUW: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array]]:
        """Training forward with multi-token prediction: (logits_BTV, [logits_BTV of depth k = 1..mtp_depth]).
        Depth k's logits at position t predict token t + k + 1 (its input embedding is token t + k's); the
        last k positions see a padding token and must be masked by the loss (mhc_jax.train.step)."""
        return self._run(tokens_BT, positions_BT, segment_ids_BT, engram_ids_BTEG, None, engram_rows_EUW, mtp=True)

    def decode(self, tokens_BT: jax.Array, positions_BT: jax.Array, cache: list[LayerCache],
               engram_ids_BTEG: jax.Array | None = None,
               engram_rows_EUW: jax.Array | None = None) -> tuple[jax.Array, list[LayerCache]]:
        """Runs new tokens at `positions_BT` against the cache; returns their logits and the new cache."""
        return self._run(tokens_BT, positions_BT, jnp.ones_like(tokens_BT), engram_ids_BTEG, cache, engram_rows_EUW)

    def layers(self) -> list[Block]:
        """Every block in order as a Block (stacked layers of model.scan_layers sliced out one by one)."""
        return [b for group in self.blocks
                for b in ([group.layer(j) for j in range(len(group.indices))] if isinstance(group, BlockStack)
                          else [group])]

    def unrolled(self) -> "Transformer":
        """A new module holding this model's values with every block a plain `Block` (the unscanned
        layout): what diagnostics and interpretability read per layer. Call it inside a jitted function
        on a large model (slices of the stacked parameters are then not materialised eagerly)."""
        cfg = self.cfg.replace(model={"scan_layers": False})
        with nnx.use_eager_sharding(False):
            graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
        state = nnx.state(self)
        model = nnx.merge(graphdef, unstacked_state(self.cfg, state) if self.cfg.model.scan_layers else state)
        model.remat = self.remat
        return model

    def init_cache(self, batch: int, max_len: int) -> list[LayerCache]:
        caches = []
        for block in self.layers():
            init = init_mla_cache if self.cfg.model.attention == "mla" else init_kv_cache
            c: LayerCache = {"attn": init(self.cfg.model, batch, max_len, self.dtype, block.attn.window)}
            if block.engram is not None:
                c["engram"] = block.engram.init_cache(batch)
            caches.append(c)
        return caches

    def _run(self, tokens_BT, positions_BT, segment_ids_BT, engram_ids_BTEG, cache, engram_rows_EUW=None,
             embeds_BTC=None, mtp=False):
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        # FSDP gathers the table's embed dimension before the lookup (as for any weight), so the looked-up
        # rows come out split over the batch like the tokens; gathering from the fsdp-split table would
        # give rows split over embed, which the partitioner can only re-split by replicating them.
        embed_VC = constrain(self.embed_VC[...], ("activation_vocab", None))
        if embeds_BTC is None:
            embeds_BTC = jnp.take(embed_VC, tokens_BT, axis=0)
        x_BTnC = constrain(expand(embeds_BTC.astype(self.dtype), self.n_streams), STREAM_AXES)
        if cache is None:  # training / scoring: stacked runs scan, single blocks run as themselves
            for group in self.blocks:
                x_BTnC = (group(x_BTnC, positions_BT, segment_ids_BT, self.remat) if isinstance(group, BlockStack)
                          else self._run_block(group, x_BTnC, positions_BT, segment_ids_BT, engram_ids_BTEG,
                                               engram_rows_EUW))
            h_BTC = self.collapse(x_BTnC)
            logits_BTV = self._project(self.final_norm(h_BTC))
            if not mtp:
                return logits_BTV, None
            mtp_logits = []
            call = lambda mod, *args: mod(*args)  # noqa: E731
            if self.remat != "none":  # each MTP block rematerialised like the main blocks
                call = nnx.remat(call, policy=REMAT_POLICIES[self.remat])
            for k, module in enumerate(self.mtp, start=1):
                ahead_BTC = jnp.take(embed_VC, shift_left(tokens_BT, k), axis=0).astype(self.dtype)
                h_BTC, out_BTC = call(module, h_BTC, ahead_BTC, positions_BT, segment_ids_BT)
                mtp_logits.append(self._project(out_BTC))
            return logits_BTV, mtp_logits
        new_cache = []
        for i, block in enumerate(self.layers()):  # decoding: layer by layer with their caches
            ids, rows = self._engram_inputs(block, engram_ids_BTEG, engram_rows_EUW)
            x_BTnC, layer_cache = block(x_BTnC, positions_BT, segment_ids_BT, ids, cache[i], rows)
            new_cache.append(layer_cache)
        return self._head(x_BTnC), new_cache

    def _engram_inputs(self, block: Block, engram_ids_BTEG: jax.Array | None,
                       engram_rows_EUW: jax.Array | None) -> tuple[jax.Array | None, jax.Array | None]:
        """(ids_BTG, rows_UW) of `block`'s Engram layer (None, None without one)."""
        if block.engram is None or engram_ids_BTEG is None:
            return None, None
        e = self.cfg.engram.layers.index(block.index)
        return engram_ids_BTEG[:, :, e], None if engram_rows_EUW is None else engram_rows_EUW[e]

    def _run_block(self, block: Block, x_BTnC, positions_BT, segment_ids_BT, engram_ids_BTEG,
                   engram_rows_EUW) -> jax.Array:
        """One block on the full-sequence path (no cache), rematerialised per `training.remat`."""
        ids, rows = self._engram_inputs(block, engram_ids_BTEG, engram_rows_EUW)
        if self.remat != "none":
            x_BTnC, _ = nnx.remat(lambda blk, *a: blk(*a), policy=REMAT_POLICIES[self.remat])(
                block, x_BTnC, positions_BT, segment_ids_BT, ids, None, rows)
            return x_BTnC
        return block(x_BTnC, positions_BT, segment_ids_BT, ids, None, rows)[0]

    def _head(self, x_BTnC: jax.Array) -> jax.Array:
        return self._project(self.final_norm(self.collapse(x_BTnC)))

    def _project(self, h_BTC: jax.Array) -> jax.Array:
        """The LM head on a normalised hidden state: float32 logits, padded vocabulary rows masked."""
        head_CV = self.embed_VC[...].T if self.head_CV is None else self.head_CV[...]
        logits_BTV = jnp.einsum("btc,cv->btv", h_BTC, head_CV.astype(self.dtype)).astype(jnp.float32)
        m = self.cfg.model
        if m.padded_vocab_size != m.vocab_size:
            logits_BTV = jnp.where(jnp.arange(m.padded_vocab_size) < m.vocab_size, logits_BTV, -1e9)
        return constrain(logits_BTV, ("activation_batch", "activation_length", "activation_vocab"))


def count_params(model: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

