"""Training stability of plain, HC and mHC residuals side by side (mHC paper Sec. 3.1 and Fig. 3, small).

    python -m mhc_jax.experiments.stability --steps 200 --lrs 3e-3,3e-2 --out runs/stability

Trains the same small model with each residual kind on the same batches for the same steps at each
learning rate (include a deliberately high one), through the shared train step, and records the training
loss, the gradient norm and the Amax gains of the composite residual map (mhc_jax.diagnostics) every
`--diag-every` steps on a fixed batch. Prints a table, writes `stability.json` and `stability.png` to --out.

Data: ../shared/data/tinyshakespeare.txt (relative to the repository) when it exists, else the embedded
default corpus, through the input pipeline (mhc_jax.data.pipeline, byte tokenizer); every run sees the
same batches.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhc_jax.config import Config
from mhc_jax.data.layout import BATCH_KEYS
from mhc_jax.data.pipeline import make_train_iterator
from mhc_jax.diagnostics import amax_gains, collect_h_res
from mhc_jax.model import Transformer
from mhc_jax.residual import RESIDUAL_KINDS
from mhc_jax.train.optimizer import make_optimizer
from mhc_jax.train.step import train_step

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAKESPEARE = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")
Batch = dict[str, np.ndarray]


def base_config(args: argparse.Namespace) -> Config:
    d = args.d_model
    dataset = f"text:{os.path.abspath(SHAKESPEARE)}" if os.path.isfile(SHAKESPEARE) else "pystdlib"
    return Config().replace(
        model={"d_model": d, "n_layers": args.layers, "n_heads": max(1, d // 16), "n_kv_heads": max(1, d // 16),
               "d_ff": 4 * d, "max_seq_len": args.seq},
        residual={"n_streams": args.n_streams},
        data={"dataset": dataset, "seq_len": args.seq, "batch_size": args.batch, "shuffle_seed": args.seed},
        # Constant LR after a short warmup, so a high LR stays high and its effect is visible.
        optimizer={"schedule": "constant", "warmup_steps": max(1, args.steps // 10)},
        training={"steps": args.steps, "seed": args.seed})


def make_batches(cfg: Config, n_batches: int) -> list[Batch]:
    """The same `n_batches` batches of the input pipeline for every run."""
    it = make_train_iterator(cfg)
    return [{k: np.asarray(v) for k, v in next(it).items() if k in BATCH_KEYS} for _ in range(n_batches)]


def gains_summary(model: nnx.Module, tokens_BT: jax.Array) -> dict[str, Any]:
    g = amax_gains(collect_h_res(model, tokens_BT))
    return {"composite_fwd_max": float(g["composite_fwd"].max()), "composite_bwd_max": float(g["composite_bwd"].max()),
            "per_layer_fwd_max": float(g["per_layer_fwd"].max()), "per_layer_bwd_max": float(g["per_layer_bwd"].max()),
            "gains": {k: v.tolist() for k, v in g.items()}}


def train_one(cfg: Config, batches: Sequence[Batch], diag_tokens: jax.Array, diag_every: int) -> dict[str, Any]:
    model = Transformer(cfg, rngs=nnx.Rngs(cfg.training.seed))
    optimizer = make_optimizer(cfg, model)
    rec: dict[str, Any] = {"kind": cfg.residual.kind, "lr": cfg.optimizer.lr, "loss": [], "grad_norm": [],
                           "diag_steps": [], "composite_fwd_max": [], "composite_bwd_max": []}

    def diagnose(step: int) -> None:
        s = gains_summary(model, diag_tokens)
        rec["diag_steps"].append(step)
        rec["composite_fwd_max"].append(s["composite_fwd_max"])
        rec["composite_bwd_max"].append(s["composite_bwd_max"])
        rec["final_gains"] = s

    t0 = time.perf_counter()
    diagnose(0)
    for step, batch in enumerate(batches, start=1):
        metrics = train_step(model, optimizer, {k: jnp.asarray(v) for k, v in batch.items()})
        rec["loss"].append(float(metrics["loss"]))
        rec["grad_norm"].append(float(metrics["grad_norm"]))
        if step % diag_every == 0 or step == len(batches):
            diagnose(step)
    rec["seconds"] = time.perf_counter() - t0
    tail = [x for x in rec["loss"][-max(1, len(batches) // 10):] if math.isfinite(x)]
    rec["final_loss"] = float(np.mean(tail)) if tail else float("nan")
    rec["nonfinite_steps"] = int(sum(not (math.isfinite(a) and math.isfinite(b))
                                     for a, b in zip(rec["loss"], rec["grad_norm"])))
    return rec


def format_table(runs: Sequence[dict[str, Any]]) -> str:
    head = (f"{'lr':>8s} {'kind':6s} {'final loss':>10s} {'min loss':>9s} {'max |g|':>9s} {'nonfinite':>9s} "
            f"{'comp fwd (max/end)':>19s} {'comp bwd (max/end)':>19s}")
    lines = [head, "-" * len(head)]
    for r in runs:
        finite = [x for x in r["loss"] if math.isfinite(x)] or [float("nan")]
        lines.append(
            f"{r['lr']:8.0e} {r['kind']:6s} {r['final_loss']:10.4f} {min(finite):9.4f} "
            f"{np.nanmax(r['grad_norm']):9.3f} {r['nonfinite_steps']:9d} "
            f"{max(r['composite_fwd_max']):9.3f}/{r['composite_fwd_max'][-1]:<9.3f} "
            f"{max(r['composite_bwd_max']):9.3f}/{r['composite_bwd_max'][-1]:<9.3f}")
    return "\n".join(lines)


def plot(runs: Sequence[dict[str, Any]], lrs: Sequence[float], path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["kind"] for r in runs}, key=list(RESIDUAL_KINDS).index)
    fig, axes = plt.subplots(len(lrs), 4, figsize=(18, 3.6 * len(lrs)), squeeze=False)
    for row, lr in enumerate(lrs):
        for r in (r for r in runs if r["lr"] == lr):
            c = f"C{kinds.index(r['kind'])}"
            steps = np.arange(1, len(r["loss"]) + 1)
            axes[row, 0].plot(steps, r["loss"], color=c, label=r["kind"], lw=1)
            axes[row, 1].plot(steps, r["grad_norm"], color=c, label=r["kind"], lw=1)
            axes[row, 2].plot(r["diag_steps"], r["composite_fwd_max"], "o-", color=c, label=r["kind"], ms=3)
            axes[row, 3].plot(r["diag_steps"], r["composite_bwd_max"], "o-", color=c, label=r["kind"], ms=3)
        titles = ("training loss", "gradient norm", "composite forward gain (max over l)",
                  "composite backward gain (max over l)")
        for col, title in enumerate(titles):
            ax = axes[row, col]
            ax.set_title(f"lr={lr:g}: {title}", fontsize=9)
            ax.set_xlabel("step")
            if col:
                ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lrs", default="3e-3,3e-2", help="comma-separated learning rates")
    p.add_argument("--kinds", default="plain,hc,mhc",
                   help=f"comma-separated residual kinds of {', '.join(RESIDUAL_KINDS)}")
    p.add_argument("--out", default="runs/stability")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--n-streams", type=int, default=4)
    p.add_argument("--diag-every", type=int, default=0, help="steps between gain measurements (0: steps/10)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    lrs = [float(x) for x in args.lrs.split(",") if x]
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in kinds if k not in RESIDUAL_KINDS]
    if bad or not kinds:
        p.error(f"--kinds {args.kinds!r}: allowed kinds are {', '.join(RESIDUAL_KINDS)}")
    if not lrs or any(lr <= 0 for lr in lrs):
        p.error(f"--lrs {args.lrs!r}: give positive learning rates, e.g. 3e-3,3e-2")
    if args.steps < 1:
        p.error(f"--steps {args.steps}: must be >= 1")
    diag_every = args.diag_every or max(1, args.steps // 10)

    base = base_config(args)
    batches = make_batches(base, args.steps)
    diag_tokens = jnp.asarray(batches[0]["inputs"][:2])
    print(f"data: {base.data.dataset}; model d={args.d_model} layers={args.layers} "
          f"seq={args.seq} batch={args.batch} n={args.n_streams}; {args.steps} steps per run")
    runs = []
    for lr in lrs:
        for kind in kinds:
            cfg = base.replace(residual={"kind": kind}, optimizer={"lr": lr})
            rec = train_one(cfg, batches, diag_tokens, diag_every)
            print(f"  lr={lr:g} {kind:6s} final loss {rec['final_loss']:.4f}  ({rec['seconds']:.0f}s)", flush=True)
            runs.append(rec)

    table = format_table(runs)
    print()
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "stability.json"), "w") as f:
        json.dump({"args": vars(args), "data": {"dataset": base.data.dataset},
                   "table": table, "runs": runs}, f, indent=1)
    png = plot(runs, lrs, os.path.join(args.out, "stability.png"))
    print(f"\nwrote {os.path.join(args.out, 'stability.json')} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
