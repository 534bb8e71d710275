"""Metrics sinks (metrics.jsonl, TensorBoard, console) and the measured matmul peak for MFU."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp


def measure_peak_flops(n: int = 1024, repeats: int = 5, dtype: jnp.dtype | None = None) -> float:
    """FLOP/s of one device on a jitted n x n matmul (best of `repeats`), the MFU denominator when no
    peak is configured. bf16 on accelerators (what training uses), float32 on CPU."""
    if dtype is None:
        dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


class MetricsWriter:
    """Appends one JSON object per line to workdir/metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            self._file = open(self.path, "a", buffering=1)
            if self._file.tell() > 0:  # a run killed mid-row left a torn last line: end it, rows stay whole
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        self._file.write("\n")
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # tensorboardX is a dependency; keep metrics.jsonl working regardless
                self._tb = None

    def write(self, step: int, kind: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "kind": kind, "time": time.time(),
               **{k: (float(v) if hasattr(v, "__float__") else v) for k, v in values.items()}}
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "kind", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def read_metrics(workdir: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The rows of workdir/metrics.jsonl (optionally of one kind: 'train', 'eval', 'diagnostics',
    'checkpoint_fallback')."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # the torn last row of a killed run (rewritten by the resumed run)
                continue
    return [r for r in rows if kind is None or r["kind"] == kind]
