"""Metrics sinks (metrics.jsonl, TensorBoard, console) and the MFU denominator (a table of dense bf16
peaks per device kind; a warmed-up, repeated matmul probe on CPU)."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import socket
import struct
import time
from typing import Any

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16 peak FLOP/s per JAX device, matched against `device.device_kind`. TPU v4 and
# v5p run in megacore mode (one device per chip), so a device's peak is the chip's.
#   TPU v4   275e12  https://cloud.google.com/tpu/docs/v4   ("275 TFLOPs bf16 per chip")
#   TPU v5e  197e12  https://cloud.google.com/tpu/docs/v5e  ("197 TFLOPs bf16 per chip")
#   TPU v5p  459e12  https://cloud.google.com/tpu/docs/v5p  ("459 TFLOPs bf16 per chip")
#   TPU v6e  918e12  https://cloud.google.com/tpu/docs/v6e  ("918 TFLOPs bf16 per chip")
#   A100     312e12  NVIDIA A100 datasheet, BF16 Tensor Core 312 TFLOPS (624 with sparsity)
#   H100     989e12  NVIDIA H100 datasheet, SXM5 BF16 Tensor Core 989 TFLOPS dense (1979 with sparsity);
#                    the PCIe card: 756e12
#   H200     989e12  NVIDIA H200 datasheet, BF16 Tensor Core 989 TFLOPS dense (1979 with sparsity)
# Checked in this order (first substring that occurs in device_kind wins), so "H100 PCIe" precedes "H100".
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5"
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("A100", 312e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
)


def table_peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of this kind from `PEAK_BF16_FLOPS`, or None if unknown."""
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in device_kind.lower():
            return peak
    return None


def measure_peak_flops(n: int = 512, chain: int = 16, repeats: int = 3, dtype: jnp.dtype | None = None) -> float:
    """FLOP/s of one device on `chain` dependent n x n matmuls inside one jitted loop (so Python dispatch is
    not timed), compiled and warmed up first, best of `repeats`. bf16 on accelerators, float32 on CPU."""
    if dtype is None:
        dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    a = (jax.random.normal(jax.random.key(0), (n, n), jnp.float32) / math.sqrt(n)).astype(dtype)
    f = jax.jit(lambda x: jax.lax.fori_loop(0, chain, lambda _, y: y @ x, x))
    f(a).block_until_ready()  # compile
    f(a).block_until_ready()  # warm up (caches, clocks)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 * chain / best


def peak_flops_per_device(configured: float = 0.0) -> float:
    """The MFU denominator: `training.peak_flops` if set, else the table's dense bf16 peak of this device,
    else (CPU, or an accelerator the table does not know) the measured matmul probe."""
    if configured > 0:
        return configured
    kind = jax.devices()[0].device_kind
    peak = table_peak_flops(kind) if jax.default_backend() != "cpu" else None
    if peak is not None:
        return peak
    if jax.default_backend() != "cpu":
        log.warning("no peak FLOP/s known for device kind %r; MFU uses a measured matmul probe (set "
                    "training.peak_flops to the datasheet value)", kind)
    return measure_peak_flops()


def moe_metrics(step_metrics: dict[str, Any], moe_blocks: list[int]) -> dict[str, float]:
    """DeepSeekMoE columns of one train row from the step's `moe_*` arrays (host numpy): per MoE block
    `moe_load_max_over_mean/<block>` (1 = perfectly balanced), `moe_dropped/<block>` (capacity drops) and
    `moe_bias_spread/<block>` (max - min of the aux-loss-free bias); their worst / total over blocks; the
    sequence-wise balance loss. {} for a dense model."""
    if "moe_load_LI" not in step_metrics:
        return {}
    load_LI, dropped_L, bias_LI = (step_metrics[k] for k in ("moe_load_LI", "moe_dropped_L", "moe_bias_LI"))
    ratio_L = load_LI.max(axis=1) / max(float(load_LI.mean()), 1e-9)
    spread_L = bias_LI.max(axis=1) - bias_LI.min(axis=1)
    row = {"moe_load_max_over_mean": float(ratio_L.max()), "moe_dropped": float(dropped_L.sum()),
           "moe_bias_spread": float(spread_L.max()), "moe_balance_loss": float(step_metrics["moe_balance_loss"])}
    for block, ratio, dropped, spread in zip(moe_blocks, ratio_L, dropped_L, spread_L):
        row.update({f"moe_load_max_over_mean/{block}": float(ratio), f"moe_dropped/{block}": float(dropped),
                    f"moe_bias_spread/{block}": float(spread)})
    return row


class TensorBoardMirror:
    """Scalars as TensorBoard event records (TFRecord framing, tensorboardX's protos and CRC), written in the
    caller's thread, one unbuffered write per row. Not tensorboardX's SummaryWriter: it writes from a thread
    that dies on a write error (a full disk), after which add_scalar, and the close it registers with atexit,
    block forever on the thread's full queue (a run hung in CI). A failed write disables the mirror with one
    warning; metrics.jsonl is the record, and a full disk is reported by the write that needs the space."""

    def __init__(self, logdir: str):
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.record_writer import masked_crc32c
        self._Event, self._Summary, self._crc = Event, Summary, masked_crc32c
        os.makedirs(logdir, exist_ok=True)
        # The name TensorBoard looks for (SummaryWriter's, plus the pid): a new file per run.
        name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab", buffering=0)
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        record = header + struct.pack("<I", self._crc(header)) + data + struct.pack("<I", self._crc(data))
        try:
            written = self._file.write(record)
            if written != len(record):  # a raw write may stop short when the disk fills mid-record
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: wrote {written} of {len(record)} bytes")
        except OSError as err:
            # Nothing after this point: a record after a torn one would hide it from TensorBoard's reader.
            log.warning("TensorBoard events stop at %s (%s); metrics.jsonl keeps every row", self.path, err)
            self.close()

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self._file is None or not scalars:
            return
        values = [self._Summary.Value(tag=tag, simple_value=v) for tag, v in scalars.items()]
        self._write(self._Event(wall_time=time.time(), step=step, summary=self._Summary(value=values)))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()  # unbuffered: nothing left to flush, so closing cannot fail on a full disk
            self._file = None


class MetricsWriter:
    """Appends one JSON object per line to workdir/metrics.jsonl and mirrors scalars to TensorBoard
    (workdir/tensorboard)."""

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
                self._tb = TensorBoardMirror(os.path.join(workdir, "tensorboard"))
            except ImportError:  # tensorboardX is a dependency; keep metrics.jsonl working regardless
                self._tb = None
            except OSError as err:  # e.g. a disk too full for one more file: the mirror is not the record
                log.warning("no TensorBoard events for this run (%s); metrics.jsonl keeps every row", err)
                self._tb = None

    def write(self, step: int, kind: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "kind": kind, "time": time.time(),
               **{k: (float(v) if hasattr(v, "__float__") else v) for k, v in values.items()}}
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            self._tb.write(step, {f"{kind}/{k}": v for k, v in row.items() if k not in ("step", "kind", "time")
                                  and isinstance(v, (int, float)) and math.isfinite(v)})

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
