"""Amax Gain Magnitude of the residual mixing matrices (mHC paper Sec. 3.1), and plots of them.

For each sublayer l (attention and MLP counted separately) the connection's acting matrix H_l mixes the
streams as x_{l+1} = H_l x_l + ... (paper orientation, see mhc_jax.residual.mhc). Per token:
- forward gain of a matrix M: max_i sum_j |M[i, j]| (max absolute row sum: how much a signal can grow
  going forward); backward gain: max_j sum_i |M[i, j]| (max absolute column sum: the same for gradients).
- per-layer gains use M = H_l; composite gains use M = H_{L-1} ... H_{l+1} H_l, the map from the input of
  sublayer l to the output of the last one (paper Eq. 4 and Fig. 3(b)), so composite[0] spans the network.
Each gain is averaged over the tokens (and rows) of the batch. For the plain residual H = 1 and every gain
is 1. Reported (paper): HC composite peaks ~3000; mHC single layer ~1, composite at most ~1.6.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhc_jax.residual.base import StreamConnection
from mhc_jax.residual.plain import PlainResidual

Connection = StreamConnection  # HC, mHC, mHC-lite


def connections(model: nnx.Module) -> list[Connection]:
    """The model's HC / mHC / mHC-lite connections, in sublayer order."""
    found = [node for _, node in nnx.iter_graph(model) if isinstance(node, StreamConnection)]
    return sorted(found, key=lambda c: c.sublayer_index)


def _unrolled(model: nnx.Module) -> nnx.Module:
    """A copy of `model` (values shared) whose blocks are plain Blocks, so each connection's mapping is
    sown where it is computed: a scan body's sows do not escape the scan (model.scan_layers)."""
    return model.unrolled() if hasattr(model, "unrolled") else nnx.merge(*nnx.split(model))


@nnx.jit
def _forward_capture(model: nnx.Module, tokens_BT: jax.Array, model_kwargs: dict[str, Any]) -> jax.Array:
    model = _unrolled(model)  # inside the jit: the per-layer slices of stacked parameters stay in the program
    for c in connections(model):
        c.capture_mappings = True
    _, sown = nnx.capture(lambda m: m(tokens_BT, **model_kwargs), nnx.Intermediate)(model)
    by_path = {tuple(path[:-1]): var.get_value() for path, var in nnx.to_flat_state(sown)
               if path[-1] == "h_res"}
    paths = {id(node): tuple(path) for path, node in nnx.iter_graph(model)}
    return jnp.stack([by_path[paths[id(c)]][0] for c in connections(model)])


def collect_h_res(model: nnx.Module, tokens_BT: jax.Array, **model_kwargs: Any) -> jax.Array:
    """The acting H_res of every sublayer on a real forward pass: (n_sublayers, B, T, n, n) float32.

    Each connection sows its H_res only while `capture_mappings` is set (on a copy of the model made inside
    the jitted pass, unscanned), so training pays nothing; the model's call signature is unchanged. The
    plain residual has H = 1: (2 * n_layers, B, T, 1, 1) ones.
    """
    B, T = tokens_BT.shape
    if not connections(model):
        cfg = getattr(model, "cfg", None)
        n_plain = (2 * cfg.model.n_layers if cfg is not None
                   else sum(isinstance(node, PlainResidual) for _, node in nnx.iter_graph(model)))
        if n_plain == 0:
            raise ValueError(f"{type(model).__name__} has no residual connections to inspect")
        return jnp.ones((n_plain, B, T, 1, 1), jnp.float32)
    return _forward_capture(model, tokens_BT, model_kwargs)  # sowing works inside nnx.remat too


def _fwd_gain(m: np.ndarray) -> np.ndarray:
    return np.abs(m).sum(axis=-1).max(axis=-1)  # max absolute row sum


def _bwd_gain(m: np.ndarray) -> np.ndarray:
    return np.abs(m).sum(axis=-2).max(axis=-1)  # max absolute column sum


def amax_gains(h_res_ZBTnn: Any) -> dict[str, np.ndarray]:
    """Per-sublayer and composite forward/backward Amax gains, each (Z,) float64 averaged over B and T.

    Keys: per_layer_fwd, per_layer_bwd, composite_fwd, composite_bwd (composite[l] is the product of the
    matrices of sublayers l..Z-1, computed in float64)."""
    h = np.asarray(h_res_ZBTnn, np.float64)
    if h.ndim < 3 or h.shape[-1] != h.shape[-2]:
        raise ValueError(f"amax_gains needs (Z, ..., n, n) matrices, got shape {h.shape}")
    Z = h.shape[0]
    token_axes = tuple(range(1, h.ndim - 2))
    comp_fwd, comp_bwd = np.zeros(Z), np.zeros(Z)
    prod = np.broadcast_to(np.eye(h.shape[-1]), h.shape[1:])
    for layer in reversed(range(Z)):
        prod = prod @ h[layer]  # H_{Z-1} ... H_layer
        comp_fwd[layer] = _fwd_gain(prod).mean()
        comp_bwd[layer] = _bwd_gain(prod).mean()
    return {"per_layer_fwd": _fwd_gain(h).mean(axis=token_axes),
            "per_layer_bwd": _bwd_gain(h).mean(axis=token_axes),
            "composite_fwd": comp_fwd, "composite_bwd": comp_bwd}


def composite_matrices(h_res_ZBTnn: Any) -> np.ndarray:
    """(Z, ..., n, n) composite maps H_{Z-1} ... H_l in float64 (for heatmaps of the composite)."""
    h = np.asarray(h_res_ZBTnn, np.float64)
    out = np.empty_like(h)
    prod = np.broadcast_to(np.eye(h.shape[-1]), h.shape[1:])
    for layer in reversed(range(h.shape[0])):
        prod = prod @ h[layer]
        out[layer] = prod
    return out


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_gains(gains: Mapping[str, Mapping[str, np.ndarray]], path: str, title: str = "") -> str:
    """One PNG with per-layer and composite gains (log scale) for each labelled run, e.g.
    {"hc": amax_gains(...), "mhc": amax_gains(...)}. Solid: forward gain, dashed: backward gain."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind in zip(axes, ("per_layer", "composite")):
        for i, (label, g) in enumerate(gains.items()):
            color = f"C{i}"
            ax.plot(g[f"{kind}_fwd"], color=color, label=f"{label} forward")
            ax.plot(g[f"{kind}_bwd"], color=color, linestyle="--", label=f"{label} backward")
        ax.set_yscale("log")
        ax.set_xlabel("sublayer index l (attention and MLP counted separately)")
        ax.set_ylabel("Amax gain magnitude")
        ax.set_title("single layer H_l" if kind == "per_layer" else "composite H_{L-1} ... H_l")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_h_res_heatmaps(matrices_Xnn: Any, path: str, titles: Sequence[str] | None = None) -> str:
    """Heatmaps of X mixing matrices (mHC paper Figs. 7-8), each cell annotated with its value and each
    panel with its row and column sums."""
    plt = _pyplot()
    m = np.asarray(matrices_Xnn, np.float64)
    if m.ndim == 2:
        m = m[None]
    X = m.shape[0]
    fig, axes = plt.subplots(1, X, figsize=(2.8 * X, 3.0), squeeze=False)
    vmax = max(float(np.abs(m).max()), 1e-12)
    for k, ax in enumerate(axes[0]):
        ax.imshow(m[k], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        for (i, j), v in np.ndenumerate(m[k]):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        rows, cols = m[k].sum(-1), m[k].sum(-2)
        name = titles[k] if titles is not None else f"H_res[{k}]"
        ax.set_title(f"{name}\nrow sums {rows.min():.2f}..{rows.max():.2f}, "
                     f"col {cols.min():.2f}..{cols.max():.2f}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# Engram gates
# --------------------------------------------------------------------------------------------------


@nnx.jit
def _engram_gates(model: nnx.Module, batch: dict[str, Any]) -> list[jax.Array]:
    def run(m: nnx.Module) -> jax.Array:
        return m(batch["inputs"], positions_BT=batch.get("positions"), segment_ids_BT=batch.get("segment_ids"),
                 engram_ids_BTEG=batch["engram_ids"], engram_rows_EUW=batch.get("engram_rows"))

    _, sown = nnx.capture(run, nnx.Intermediate)(model)
    return [var.get_value()[0] for path, var in nnx.to_flat_state(sown) if path[-1] == "gate"]


def engram_gate_stats(model: nnx.Module, batch: dict[str, Any]) -> dict[str, float]:
    """Per Engram layer, over the batch's real tokens and the streams: mean and std of the context gate,
    and the fractions nearly closed (< 0.1) and nearly open (> 0.9). A memory the model ignores shows as
    gates drifting to 0; the paper's Fig. 7 shows them selective (open on multi-token entities)."""
    engrams = [b.engram for b in model.blocks if getattr(b, "engram", None) is not None]
    try:
        for e in engrams:
            e.capture_gates = True
        gates = _engram_gates(model, batch)
    finally:
        for e in engrams:
            e.capture_gates = False
    loss_mask = batch.get("loss_mask")
    mask = None if loss_mask is None or not getattr(loss_mask, "is_fully_addressable", True) else np.asarray(loss_mask) > 0
    gates = [jax.device_get(g) if getattr(g, "is_fully_addressable", True) else np.asarray(g.addressable_data(0))
             for g in gates]
    out: dict[str, float] = {}
    for e, g in zip(engrams, gates):
        g = np.asarray(g, np.float64)  # (B, T, n)
        vals = g[mask] if mask is not None and mask.any() else g.reshape(-1, g.shape[-1])
        key = f"engram{e.layer_id}_gate"
        out.update({f"{key}_mean": float(vals.mean()), f"{key}_std": float(vals.std()),
                    f"{key}_closed_frac": float((vals < 0.1).mean()), f"{key}_open_frac": float((vals > 0.9).mean())})
    return out
