"""What the benchmarks share: timing a jitted call, medians over interleaved rounds, the printed table, and
the JSON result (written under benchmarks/results, holding no machine path).

A benchmark script imports it as `from _common import ...` (Python puts the script's folder first on the
path).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")


def seconds_per_call(fn: Callable[[], Any], calls: int) -> float:
    """Wall seconds per call over `calls` back-to-back calls of `fn` (JAX dispatches asynchronously, so only
    the last result is waited for: the calls overlap as they do in a training loop)."""
    t0 = time.perf_counter()
    out = None
    for _ in range(calls):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / calls


def settled_peak(start: float, mfus: Sequence[dict[str, Any]]) -> tuple[float, list[float]]:
    """The CPU matmul peak as the higher of `start` (the probe taken before the run) and a probe now, and
    every dict's "mfu" (computed against `start`) rescaled to it. On a shared machine one probe can catch a
    slow moment (61 against 80 GFLOP/s measured minutes apart on the 2-core CI machine), which inflates
    every MFU measured against it. Returns (peak, [start probe, end probe])."""
    from mhc_jax.train.metrics import measure_peak_flops
    end = measure_peak_flops()
    peak = max(start, end)
    for row in mfus:
        row["mfu"] *= start / peak
    return peak, [start, end]


def compile_seconds(fn: Callable[[], Any]) -> float:
    """Seconds of the first call (tracing + compilation + one run), then one more call to warm caches."""
    seconds = seconds_per_call(fn, 1)
    seconds_per_call(fn, 1)
    return seconds


def interleaved_medians(fns: Mapping[str, Callable[[], Any]], rounds: int, calls: int) -> dict[str, float]:
    """Median seconds per call of each function over `rounds` rounds of `calls` calls, the functions taking
    turns within every round, so that drifting machine load hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(seconds_per_call(fn, calls))
    return {name: statistics.median(t) for name, t in times.items()}


def _cell(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,d}" if isinstance(value, int) else f"{value:.3f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned; ints with thousands
    separators, floats with 3 decimals, strings as given (format them first for other precisions)."""
    cells = [list(header)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def repo_relative(path: str) -> str:
    """`path` relative to the repository when it lies inside it, else its file name: results and logs name
    no machine's folders."""
    full = os.path.abspath(path)
    return os.path.relpath(full, REPO) if full.startswith(REPO + os.sep) else os.path.basename(full)


def write_result(path: str, result: Mapping[str, Any]) -> str:
    """Writes `result` as indented JSON to `path` (folders created); returns the repository-relative path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return repo_relative(path)


def load_average() -> str:
    """`cat /proc/loadavg` (1, 5, 15 minute load averages; '' where the file does not exist): recorded beside
    timings taken on a shared machine."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return ""
