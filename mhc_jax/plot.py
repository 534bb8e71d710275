"""PNG plots of a run's metrics.jsonl: loss (train and eval), learning rate, gradient norm, tokens/s and
the mHC composite gains over steps. Written into `workdir/plots/` at the end of every run and by

    python -m mhc_jax.plot --workdir W

A metric the run never logged (e.g. gains of a plain-residual run, eval of a run shorter than
training.eval_every) gets no plot; rows of a resumed run that repeat a step are taken from the later run.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from mhc_jax.cli import entry_point, exit_process
from mhc_jax.diagnostics import _pyplot
from mhc_jax.errors import DataError
from mhc_jax.train.metrics import read_metrics

PLOTS_DIR = "plots"
# file stem -> (title, y label, log y, [(kind, key, legend label), ...])
PLOTS: dict[str, tuple[str, str, bool, list[tuple[str, str, str]]]] = {
    "loss": ("Loss", "cross-entropy (nats / token)", False, [("train", "loss", "train"), ("eval", "loss", "eval")]),
    "lr": ("Learning rate", "lr", False, [("train", "lr", "lr")]),
    "grad_norm": ("Gradient norm (global L2, before clipping)", "||g||", True, [("train", "grad_norm", "grad norm")]),
    "tokens_per_s": ("Throughput", "tokens / s", False, [("train", "tokens_per_s", "tokens/s")]),
    "mhc_gains": ("mHC Amax gain magnitude (max over sublayers)", "gain", True, [
        ("diagnostics", "composite_fwd_max", "composite forward"),
        ("diagnostics", "composite_bwd_max", "composite backward"),
        ("diagnostics", "layer_fwd_max", "single layer forward"),
        ("diagnostics", "layer_bwd_max", "single layer backward")]),
}


def series(rows: Sequence[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in rows of `kind`, sorted by step, the last row of a repeated step winning."""
    by_step = {r["step"]: r[key] for r in rows if r.get("kind") == kind and isinstance(r.get(key), (int, float))}
    steps = sorted(by_step)
    return steps, [float(by_step[s]) for s in steps]


def plot_metrics(rows: Sequence[dict[str, Any]], out_dir: str) -> list[str]:
    """One PNG per metric present in `rows` (metrics.jsonl rows); returns the paths written."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for stem, (title, ylabel, log_y, lines) in PLOTS.items():
        data = [(label, *series(rows, kind, key)) for kind, key, label in lines]
        data = [(label, s, v) for label, s, v in data if s]
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for label, steps, values in data:
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=label)
        if log_y and all(v > 0 for _, _, vals in data for v in vals):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if len(data) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_workdir(workdir: str) -> list[str]:
    """PNGs of `workdir/metrics.jsonl` into `workdir/plots/`; [] when the run has no metrics yet."""
    if not os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
        return []
    return plot_metrics(read_metrics(workdir), os.path.join(workdir, PLOTS_DIR))


@entry_point
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a workdir written by train.py")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.workdir, "metrics.jsonl")):
        raise DataError(f"{os.path.join(args.workdir, 'metrics.jsonl')} does not exist: {args.workdir!r} is not "
                        "a workdir written by train.py (or it has not logged a step yet)")
    for path in plot_workdir(args.workdir):
        print(path)
    return 0


if __name__ == "__main__":
    exit_process(main())
