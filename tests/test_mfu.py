"""The MFU denominator: datasheet dense bf16 peaks per device kind, the measured probe only on CPU."""

from __future__ import annotations

import pytest

from mhc_jax.train.metrics import measure_peak_flops, peak_flops_per_device, table_peak_flops


@pytest.mark.parametrize("kind,peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
])
def test_peak_table_gives_the_datasheet_dense_bf16_peak_per_device(kind, peak):
    assert table_peak_flops(kind) == peak


def test_unknown_device_kind_has_no_table_peak():
    assert table_peak_flops("cpu") is None and table_peak_flops("NVIDIA T4") is None


def test_configured_peak_wins_and_cpu_uses_the_measured_probe():
    assert peak_flops_per_device(1.5e12) == 1.5e12
    measured = peak_flops_per_device(0.0)  # this CPU: the probe, a plausible CPU rate
    assert 1e8 < measured < 1e13
    assert 1e8 < measure_peak_flops(n=128, chain=4, repeats=2) < 1e13
