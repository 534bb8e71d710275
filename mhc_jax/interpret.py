"""Interpretability: attention maps of every layer and head, and integrated-gradients token attributions.

Shapes: B batch, T query positions, S key positions, L layers, H query heads, K KV heads, D head dim,
C model width, A integration nodes (alphas).

* `attention_maps(model, tokens_BT)` -> (L, B, H, T, S) float32: softmax(q k^T / sqrt(D)) of every block's
  attention on a real forward pass (causal and same-document masked, RoPE applied, each query head with
  its grouped KV head, sliding window and ALiBi as configured), recomputed from the attention input and
  weights the block uses.
* `integrated_gradients(model, tokens_1T, target, baseline)`: Sundararajan et al. 2017, Eq. 1, over the
  input embeddings e of the prompt for F(e) = the logit of token `target` at the last position:
      attr_t = sum_c (e - e')_tc * integral_0^1 dF(e' + a (e - e'))/de_tc da
  with baseline e' the embedding of one token id at every position (the tokenizer's pad id is the usual
  choice) or given (T, C) embeddings. Zero embeddings make a poor baseline: RMS normalisation is singular
  at 0, so along a path from 0 the logit swings over many decades of a near 0 (measured on the tiny
  model: F moves by ~1 between a = 1e-8 and 1e-4), which no affordable quadrature resolves. A token
  baseline can come close to that: training at a high learning rate pushes the tied embedding of the
  never-seen pad token opposite to the frequent tokens' (notebook 02's mHC model: cosine -0.96 with " "), so
  the straight path shrinks those positions' embeddings ~7x near a = 0.55 and F climbs by 4 logits within
  ~0.05 of a (dF/da up to 117), where a fixed 128-node rule misses completeness by 11% (24% on the
  CPU-size run). The integral is therefore adaptive: composite Gauss-Legendre on panels of [0, 1], each
  panel checked against F(a_hi) - F(a_lo) from forward passes at its ends and halved until the
  attributions sum to the logit difference (the paper's Proposition 1) within a quarter of `tolerance`;
  `IGResult.completeness_error` reports the error reached, and above `tolerance` it warns or raises
  (notebook 02: 0.04% with ~500 nodes; 0.18% with ~2000 on the CPU-size run).
  Engram ids are functions of the discrete tokens and stay those of the prompt along the path (not
  interpolated); the Engram gate sqrt(|s|) is steep where s crosses 0, which the panels resolve likewise.

Call both outside a `jax.set_mesh` context for a single prompt: one row does not split over the batch
axes of a multi-device mesh (the parameters keep their own shardings).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhc_jax.diagnostics import _pyplot
from mhc_jax.errors import NumericalError
from mhc_jax.layers import apply_rope
from mhc_jax.model.alibi import alibi_bias
from mhc_jax.model.attention import Attention
from mhc_jax.model.masks import visible_BTS
from mhc_jax.model.mla import MLA


def attention_probs(attn: Attention | MLA, x_BTC: jax.Array, positions_BT: jax.Array,
                    segment_ids_BT: jax.Array) -> jax.Array:
    """(B, H, T, S) float32 attention weights of `attn` on input `x_BTC` (no cache: a full sequence)."""
    if isinstance(attn, MLA):
        return attn.attention_probs(x_BTC, positions_BT, segment_ids_BT)
    dt = attn.dtype
    x = x_BTC.astype(dt)
    q_BTHD = jnp.einsum("btc,chd->bthd", x, attn.wq_CHD[...].astype(dt))
    k_BSKD = jnp.einsum("btc,ckd->btkd", x, attn.wk_CKD[...].astype(dt))
    if attn.position == "rope":
        q_BTHD = apply_rope(q_BTHD, positions_BT, attn.rope_theta)
        k_BSKD = apply_rope(k_BSKD, positions_BT, attn.rope_theta)
    H, K = q_BTHD.shape[2], k_BSKD.shape[2]
    k_BSHD = jnp.repeat(k_BSKD, H // K, axis=2)  # query head h reads KV head h // (H / K)
    scores_BHTS = jnp.einsum("bthd,bshd->bhts", q_BTHD.astype(jnp.float32), k_BSHD.astype(jnp.float32))
    scores_BHTS = scores_BHTS / jnp.sqrt(jnp.float32(q_BTHD.shape[-1]))
    if attn.slopes is not None:  # ALiBi
        scores_BHTS = scores_BHTS + alibi_bias(jnp.asarray(attn.slopes), positions_BT, positions_BT)
    # The model's own mask: causal, same document, within the block's sliding window if any.
    scores_BHTS = jnp.where(visible_BTS(segment_ids_BT, attn.window)[:, None], scores_BHTS, -jnp.inf)
    return jax.nn.softmax(scores_BHTS, axis=-1)


class _AttentionProbe(nnx.Module):
    """Stands in for a block's Attention while maps are collected: sows the weights, then runs it."""

    def __init__(self, attn: Attention):
        self.attn = attn

    def __call__(self, x_BTC, positions_BT, segment_ids_BT, cache=None):
        self.sow(nnx.Intermediate, "probs", attention_probs(self.attn, x_BTC, positions_BT, segment_ids_BT))
        return self.attn(x_BTC, positions_BT, segment_ids_BT, cache)


@nnx.jit
def _capture_maps(model: nnx.Module, tokens_BT: jax.Array, model_kwargs: dict[str, Any]) -> jax.Array:
    _, sown = nnx.capture(lambda m: m(tokens_BT, **model_kwargs), nnx.Intermediate)(model)
    by_block = {path[1]: var.get_value()[0] for path, var in nnx.to_flat_state(sown) if path[-1] == "probs"}
    return jnp.stack([by_block[i] for i in range(len(model.blocks))])


def attention_maps(model: nnx.Module, tokens_BT: Any, **model_kwargs: Any) -> np.ndarray:
    """(L, B, H, T, T) float32 attention weights of every block and head for `tokens_BT` (model kwargs such
    as `engram_ids_BTEG` or `segment_ids_BT` pass through). Rows sum to 1; entries above the diagonal are 0."""
    model = model.unrolled()  # a copy, values shared, one Block per layer (model.scan_layers stacks them)
    for block in model.blocks:
        block.attn = _AttentionProbe(block.attn)
    model.remat = "none"  # nothing to save for a single forward pass
    return np.asarray(_capture_maps(model, jnp.asarray(tokens_BT), model_kwargs))


# --------------------------------------------------------------------------------------------------
# Integrated gradients
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class IGResult:
    tokens: np.ndarray  # (T,) the prompt's token ids
    target: int  # the next token whose logit is explained
    attributions: np.ndarray  # (T,) float64, one per prompt token
    logit: float  # F(e): the target's logit at the last position
    baseline_logit: float  # F(e') with the baseline embeddings
    steps: int = 0  # quadrature nodes the adaptive rule used (each a forward and backward pass)
    panels: int = 0  # Gauss-Legendre panels [a_i, a_i+1] the path ended up split into

    @property
    def completeness_error(self) -> float:
        """|sum(attributions) - (F(e) - F(e'))| relative to |F(e) - F(e')|."""
        diff = self.logit - self.baseline_logit
        return abs(float(self.attributions.sum()) - diff) / max(abs(diff), 1e-12)


class IncompleteAttributionsWarning(UserWarning):
    """Integrated gradients stopped at `max_steps` with a completeness error above the tolerance."""


def _target_logit(model, embeds_ATC, tokens_ATC_ids, target, model_kwargs):
    logits = model(tokens_ATC_ids, embeds_BTC=embeds_ATC, **model_kwargs)
    return logits[:, -1, target]


def quadrature(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) of `steps`-node Gauss-Legendre quadrature on [0, 1]: sum(w f(a)) ~ integral_0^1 f."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)  # on [-1, 1]
    return (nodes + 1) / 2, weights / 2


@nnx.jit
def _path_points(model, tokens_1T, embeds_TC, baseline_TC, target, model_kwargs, alphas_A, weights_A):
    """At the path points e' + a (e - e'), a in alphas_A: F (A,), and w_a * sum_c (e - e')_tc dF/de_tc (A, T)."""
    delta_TC = embeds_TC - baseline_TC
    path_ATC = baseline_TC[None] + alphas_A[:, None, None] * delta_TC[None]
    A = alphas_A.shape[0]
    tokens_AT = jnp.broadcast_to(tokens_1T, (A, tokens_1T.shape[1]))
    kwargs = {k: jnp.broadcast_to(v, (A, *v.shape[1:])) for k, v in model_kwargs.items()}
    logits_A, pullback = jax.vjp(lambda p: _target_logit(model, p, tokens_AT, target, kwargs), path_ATC)
    (grads_ATC,) = pullback(weights_A)  # one backward pass gives every point's gradient, already weighted
    return logits_A, jnp.sum(grads_ATC * delta_TC[None], axis=-1)


_PANEL_NODES = 8  # Gauss-Legendre nodes per panel: exact for polynomials of degree 15 on each panel


def _adaptive_integral(evaluate, steps: int, goal_rtol: float, max_steps: int):
    """Composite Gauss-Legendre over panels of [0, 1], split where completeness fails on the panel.

    On each panel [lo, hi] the quadrature must give F(hi) - F(lo), which the forward passes at the panel's
    ends give exactly; the miss is that panel's quadrature error, and the misses add up to the completeness
    error. Panels whose miss is above their share of the goal are halved until the misses sum below
    goal_rtol |F(1) - F(0)| (or their signed sum does and their sum is below 4x that) or `max_steps` nodes
    are spent. `evaluate(alphas, weights)` -> (F, attr)."""
    order = min(_PANEL_NODES, steps)
    nodes, weights = quadrature(order)
    edges = np.linspace(0.0, 1.0, max(1, steps // order) + 1)
    pending = list(zip(edges[:-1], edges[1:]))
    ends: dict[float, float] = {}  # F at each panel end
    done: dict[tuple[float, float], tuple[np.ndarray, float]] = {}  # panel -> (attributions (T,), miss)
    used = 0
    while True:
        new_ends = sorted({a for panel in pending for a in panel} - ends.keys())
        alphas = np.concatenate([lo + (hi - lo) * nodes for lo, hi in pending] + [np.asarray(new_ends)])
        w = np.concatenate([(hi - lo) * weights for lo, hi in pending] + [np.zeros(len(new_ends))])
        f, attr = evaluate(alphas, w)
        used += len(pending) * order
        ends.update(zip(new_ends, f[len(alphas) - len(new_ends):].tolist()))
        for i, (lo, hi) in enumerate(pending):
            a = attr[i * order:(i + 1) * order].sum(0)
            done[(lo, hi)] = (a, float(a.sum()) - (ends[hi] - ends[lo]))
        diff = ends[1.0] - ends[0.0]
        # float32 logits: differences below ~1e-5 of their size are rounding, not quadrature error.
        goal = max(goal_rtol * abs(diff), 1e-5 * max(abs(ends[1.0]), abs(ends[0.0]), 1.0))
        misses = {panel: abs(miss) for panel, (_, miss) in done.items()}
        bound, error = sum(misses.values()), abs(sum(miss for _, miss in done.values()))
        # Done when the misses' sum is below the goal, or when their signed sum (the completeness error) is
        # and their sum is below 4x the goal (so no cancellation hides an error above that): a steep
        # sqrt(|s|) (the Engram gate) converges slowly in every panel around it, not only in one.
        if bound <= goal or (error <= goal and bound <= 4 * goal):
            break
        worst = sorted(misses, key=misses.get, reverse=True)
        split = [p for p in worst if misses[p] > goal / len(misses)] or worst[:1]
        affordable = (max_steps - used) // (2 * order)  # two halves per split panel
        if affordable < 1:
            break
        pending = []
        for lo, hi in split[:affordable]:
            del done[(lo, hi)]
            mid = (lo + hi) / 2
            pending += [(lo, mid), (mid, hi)]
    attributions = np.sum([a for a, _ in done.values()], axis=0)
    return attributions, ends[1.0], ends[0.0], used, len(done)


def integrated_gradients(model: nnx.Module, tokens_1T: Any, target: int, baseline: int | Any, *, steps: int = 64,
                         tolerance: float = 0.01, max_steps: int = 4096, batch_size: int = 64,
                         on_incomplete: str = "warn", engram_ids_1TEG: Any | None = None) -> IGResult:
    """Integrated-gradients attributions of each prompt token to the logit of `target` as the next token
    (after the last prompt position). `baseline`: a token id (its embedding at every position, e.g. the
    tokenizer's pad id) or (T, C) baseline embeddings.

    The path integral starts with `steps` Gauss-Legendre nodes (panels of 8) and halves the panels that miss
    completeness until the attributions sum to F(e) - F(e') within tolerance / 4 or `max_steps` nodes are
    spent (`batch_size` path points per forward/backward pass). `IGResult.completeness_error` is the error
    reached; above `tolerance` it warns (`on_incomplete="warn"`, IncompleteAttributionsWarning), raises
    (`"raise"`, NumericalError) or stays silent (`"ignore"`)."""
    tokens_1T = jnp.asarray(tokens_1T, jnp.int32)
    if tokens_1T.ndim != 2 or tokens_1T.shape[0] != 1:
        raise ValueError(f"tokens must have shape (1, T), got {tokens_1T.shape}")
    V = model.cfg.model.vocab_size
    if not 0 <= target < V:
        raise ValueError(f"target={target} is not a token id in [0, {V})")
    if steps < 2:
        raise ValueError(f"steps={steps} must be >= 2")
    if max_steps < steps:
        raise ValueError(f"max_steps={max_steps} must be >= steps={steps}")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance={tolerance} must be in (0, 1)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if on_incomplete not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_incomplete={on_incomplete!r} must be 'warn', 'raise' or 'ignore'")
    # Through host numpy: token and given baselines get the same placement, hence one compiled program.
    table_VC = np.asarray(model.embed_VC[...], np.float32)
    embeds_TC = table_VC[np.asarray(tokens_1T[0])]
    if isinstance(baseline, (int, np.integer)):
        if not 0 <= baseline < V:
            raise ValueError(f"baseline={baseline} is not a token id in [0, {V})")
        baseline_TC = np.broadcast_to(table_VC[baseline], embeds_TC.shape)
    else:
        baseline_TC = np.asarray(baseline, np.float32)
        if baseline_TC.shape != embeds_TC.shape:
            raise ValueError(f"baseline embeddings must have shape {embeds_TC.shape} (T, C), got {baseline_TC.shape}")
    embeds_TC, baseline_TC = jnp.asarray(embeds_TC), jnp.asarray(baseline_TC)
    kwargs = {} if engram_ids_1TEG is None else {"engram_ids_BTEG": jnp.asarray(engram_ids_1TEG)}

    def evaluate(alphas: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = -(-len(alphas) // batch_size) * batch_size  # padded to whole batches: one compiled shape
        a = np.zeros(n, np.float32)
        w = np.zeros(n, np.float32)
        a[:len(alphas)], w[:len(alphas)] = alphas, weights
        out = [_path_points(model, tokens_1T, embeds_TC, baseline_TC, int(target), kwargs,
                            jnp.asarray(a[i:i + batch_size]), jnp.asarray(w[i:i + batch_size]))
               for i in range(0, n, batch_size)]
        f = np.concatenate([np.asarray(o[0], np.float64) for o in out])
        attr = np.concatenate([np.asarray(o[1], np.float64) for o in out])
        return f[:len(alphas)], attr[:len(alphas)]

    attr, logit, base, used, panels = _adaptive_integral(evaluate, steps, tolerance / 4, max_steps)
    result = IGResult(tokens=np.asarray(tokens_1T[0]), target=int(target), attributions=attr, logit=logit,
                      baseline_logit=base, steps=used, panels=panels)
    if result.completeness_error > tolerance and on_incomplete != "ignore":
        msg = (f"integrated gradients: attributions sum to {attr.sum():.6g} but F(e) - F(e') = {logit - base:.6g} "
               f"(completeness error {result.completeness_error:.2%} > tolerance {tolerance:.2%}) after "
               f"{used} quadrature nodes; raise max_steps={max_steps}, or pick a baseline whose path to the input "
               f"keeps the embeddings away from 0")
        if on_incomplete == "raise":
            raise NumericalError(msg)
        warnings.warn(msg, IncompleteAttributionsWarning, stacklevel=2)
    return result


# --------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------


def token_labels(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Short printable labels of token ids for plot axes (special tokens by name)."""
    names = {tokenizer.bos_id: "<bos>", tokenizer.eos_id: "<eos>", tokenizer.pad_id: "<pad>"}
    out = []
    for i in ids:
        i = int(i)
        text = names.get(i) or tokenizer.token_bytes(i).decode("utf-8", "replace")
        out.append(text.replace("\n", "\\n").replace(" ", "\u2423") or f"#{i}")
    return out


def plot_attention_maps(maps_LHTS: Any, labels: Sequence[str], path: str) -> str:
    """A grid of heatmaps (rows: layers, columns: heads) of one sequence's attention weights."""

    plt = _pyplot()
    m = np.asarray(maps_LHTS)
    L, H, T = m.shape[0], m.shape[1], m.shape[2]
    fig, axes = plt.subplots(L, H, figsize=(1.9 * H + 1, 1.9 * L + 0.6), squeeze=False)
    for layer in range(L):
        for head in range(H):
            ax = axes[layer][head]
            ax.imshow(m[layer, head], cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_xticks(range(T))
            ax.set_yticks(range(T))
            ax.set_xticklabels(labels if layer == L - 1 else [], rotation=90, fontsize=5)
            ax.set_yticklabels(labels if head == 0 else [], fontsize=5)
            ax.set_title(f"layer {layer} head {head}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_attributions(result: IGResult, labels: Sequence[str], target_label: str, path: str) -> str:
    """A bar per prompt token: its integrated-gradients attribution to the target's logit."""

    plt = _pyplot()
    a = result.attributions
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(a) + 1), 3.2))
    ax.bar(range(len(a)), a, color=["C3" if v < 0 else "C0" for v in a])
    ax.set_xticks(range(len(a)))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_ylabel("attribution (logit units)")
    ax.set_title(f"integrated gradients for next token {target_label!r}: sum {a.sum():.3f} = "
                 f"logit {result.logit:.3f} - baseline {result.baseline_logit:.3f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
