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
  model: F moves by ~1 between a = 1e-8 and 1e-4), which no affordable quadrature resolves. The integral
  uses Gauss-Legendre quadrature with `steps` nodes; completeness (sum_t attr_t = F(e) - F(e'), the
  paper's Proposition 1) then holds to a small tolerance that `IGResult.completeness_error` reports
  (mHC tiny model: 0.2% at 64 nodes, ~1e-6 at 128). Engram ids are functions of the discrete tokens and stay
  those of the prompt along the path (not interpolated); the Engram gate's sign(s) jumps where s crosses 0,
  which the gradient cannot see, so with Engram layers completeness holds only up to those jumps (~2% on
  the tiny model).

Call both outside a `jax.set_mesh` context for a single prompt: one row does not split over the batch
axes of a multi-device mesh (the parameters keep their own shardings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhc_jax.diagnostics import _pyplot
from mhc_jax.layers import apply_rope
from mhc_jax.model.alibi import alibi_bias
from mhc_jax.model.attention import Attention
from mhc_jax.model.masks import visible_BTS


def attention_probs(attn: Attention, x_BTC: jax.Array, positions_BT: jax.Array,
                    segment_ids_BT: jax.Array) -> jax.Array:
    """(B, H, T, S) float32 attention weights of `attn` on input `x_BTC` (no cache: a full sequence)."""
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

    @property
    def completeness_error(self) -> float:
        """|sum(attributions) - (F(e) - F(e'))| relative to |F(e) - F(e')|."""
        diff = self.logit - self.baseline_logit
        return abs(float(self.attributions.sum()) - diff) / max(abs(diff), 1e-12)


def _target_logit(model, embeds_ATC, tokens_ATC_ids, target, model_kwargs):
    logits = model(tokens_ATC_ids, embeds_BTC=embeds_ATC, **model_kwargs)
    return logits[:, -1, target]


def quadrature(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) of `steps`-node Gauss-Legendre quadrature on [0, 1]: sum(w f(a)) ~ integral_0^1 f."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)  # on [-1, 1]
    return (nodes + 1) / 2, weights / 2


@nnx.jit(static_argnames=("steps",))
def _integrate(model, tokens_1T, embeds_TC, baseline_TC, target, model_kwargs, steps: int):
    alphas, weights = quadrature(steps)
    alphas_A = jnp.asarray(alphas, jnp.float32)
    weights_A = jnp.asarray(weights, jnp.float32)
    delta_TC = embeds_TC - baseline_TC
    path_ATC = baseline_TC[None] + alphas_A[:, None, None] * delta_TC[None]
    tokens_AT = jnp.broadcast_to(tokens_1T, (steps, tokens_1T.shape[1]))
    kwargs = {k: jnp.broadcast_to(v, (steps, *v.shape[1:])) for k, v in model_kwargs.items()}

    def weighted_sum(path):
        return jnp.sum(weights_A * _target_logit(model, path, tokens_AT, target, kwargs))

    grads_ATC = jax.grad(weighted_sum)(path_ATC)  # already weighted by the quadrature weights
    attributions_T = jnp.sum(delta_TC * grads_ATC.sum(0), axis=-1)
    ends = _target_logit(model, jnp.stack([embeds_TC, baseline_TC]), jnp.concatenate([tokens_1T, tokens_1T]),
                         target, {k: jnp.concatenate([v, v]) for k, v in model_kwargs.items()})
    return attributions_T, ends[0], ends[1]


def integrated_gradients(model: nnx.Module, tokens_1T: Any, target: int, baseline: int | Any, *, steps: int = 128,
                         engram_ids_1TEG: Any | None = None) -> IGResult:
    """Integrated-gradients attributions of each prompt token to the logit of `target` as the next token
    (after the last prompt position). `baseline`: a token id (its embedding at every position, e.g. the
    tokenizer's pad id) or (T, C) baseline embeddings."""
    tokens_1T = jnp.asarray(tokens_1T, jnp.int32)
    if tokens_1T.ndim != 2 or tokens_1T.shape[0] != 1:
        raise ValueError(f"tokens must have shape (1, T), got {tokens_1T.shape}")
    V = model.cfg.model.vocab_size
    if not 0 <= target < V:
        raise ValueError(f"target={target} is not a token id in [0, {V})")
    if steps < 2:
        raise ValueError(f"steps={steps} must be >= 2")
    table_VC = model.embed_VC[...]
    embeds_TC = jnp.take(table_VC, tokens_1T[0], axis=0).astype(jnp.float32)
    if isinstance(baseline, (int, np.integer)):
        if not 0 <= baseline < V:
            raise ValueError(f"baseline={baseline} is not a token id in [0, {V})")
        baseline_TC = jnp.broadcast_to(table_VC[baseline].astype(jnp.float32), embeds_TC.shape)
    else:
        baseline_TC = jnp.asarray(baseline, jnp.float32)
        if baseline_TC.shape != embeds_TC.shape:
            raise ValueError(f"baseline embeddings must have shape {embeds_TC.shape} (T, C), got {baseline_TC.shape}")
    kwargs = {} if engram_ids_1TEG is None else {"engram_ids_BTEG": jnp.asarray(engram_ids_1TEG)}
    attr, logit, base = _integrate(model, tokens_1T, embeds_TC, baseline_TC, int(target), kwargs, steps=steps)
    return IGResult(tokens=np.asarray(tokens_1T[0]), target=int(target),
                    attributions=np.asarray(attr, np.float64), logit=float(logit), baseline_logit=float(base))


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
