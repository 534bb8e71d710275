"""The TPU ahead-of-time fit report, compiled for small TPU topologies on this CPU host (needs libtpu)."""

from __future__ import annotations

import json

import jax
import pytest

from mhc_jax import aot
from mhc_jax.config import ConfigError, MeshConfig, load_config
from mhc_jax.engram.layer import table_bytes
from mhc_jax.flops import model_flops_per_token
from mhc_jax.sharding import make_mesh


@pytest.fixture(scope="module")
def libtpu():
    try:
        import libtpu  # noqa: F401
    except ImportError as err:
        pytest.skip(f"libtpu not installed ({err}); pip install -e '.[tpu]' to run the AOT tests")


def test_cli_report_for_tiny_config_on_v4_fits_and_writes_json(libtpu, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = aot.main(["--config", "configs/tiny.yaml", "--topology", "v4:2x2x1", "--set", "data.batch_size=8",
                   "--set", "mesh.fsdp=2", "--set", "model.scan_layers=false", "--json", str(out)])
    assert rc == 0
    assert "fits:" in capsys.readouterr().out
    r = json.loads(out.read_text())
    # v4 runs in megacore mode: 4 chips = 4 JAX devices of 32 GiB each (Cloud TPU v4 docs: 32 GiB per chip)
    assert (r["n_chips"], r["n_devices"], r["devices_per_chip"], r["hbm_per_device_gib"]) == (4, 4, 1, 32.0)
    assert 28 < r["hbm_usable_per_device_gib"] <= 32  # the compiler's own figure, less the runtime's reserve
    assert r["mesh"] == {"dcn_data": 1, "data": 2, "fsdp": 2, "tensor": 1, "expert": 1}
    assert r["fits"] and 0 < r["total_bytes_per_device"] < 32 * 2**30
    assert r["compile_seconds"] > 0 and r["lower_seconds"] > 0
    assert r["argument_bytes"] > 0 and r["temp_bytes"] > 0
    cfg = load_config("configs/tiny.yaml", ["model.scan_layers=false"])
    assert r["model_flops_per_token"] == model_flops_per_token(cfg)
    assert r["model_flops_per_step"] == model_flops_per_token(cfg) * 8 * 32
    # cost_analysis of an SPMD program is per device: times 4 devices it is the whole step (unrolled blocks:
    # XLA counts a scanned loop body once).
    assert 0.8 < r["compiled_over_model_flops"] < 2.0, r["compiled_over_model_flops"]
    assert r["dtype"] == "bfloat16" and r["command"].startswith("python -m mhc_jax.aot")


def test_model_too_large_for_the_chip_is_reported_as_not_fitting(libtpu):
    # A 524M-row embedding: 67 GB of float32 params (plus moments) replicated on each 16 GiB v5e chip.
    cfg = load_config("configs/tiny.yaml", ["model.vocab_size=524288000", "model.n_layers=1", "data.batch_size=4",
                                            "data.seq_len=8"])
    r = aot.fit_report(cfg, "v5e:2x2", config_name="huge-vocab")
    assert not r.fits
    assert r.verdict.startswith("does not fit")
    assert max(r.needed_bytes_per_device, r.total_bytes_per_device) > 16 * 2**30


def test_host_resident_engram_table_moves_its_bytes_from_hbm_to_host_memory(libtpu):
    engram = ["engram.enabled=true", "engram.layers=[1]", "engram.heads_per_ngram=4", "engram.head_dim=32",
              "engram.table_size=30011", "data.batch_size=8"]
    reports = {place: aot.fit_report(load_config("configs/tiny.yaml", engram + [f"engram.placement={place}",
                                                                               "engram.update=dense"]),
                                     "v4:2x2x1", config_name=place) for place in ("device", "host")}
    table = table_bytes(load_config("configs/tiny.yaml", engram).engram, 1)  # rows x dim x 4 bytes
    assert reports["device"].host_bytes_per_device == 0
    # Table + Adam moments (3 copies) leave the arguments; the compiled step compiles for TPU unchanged.
    moved = reports["device"].argument_bytes - reports["host"].argument_bytes
    assert 3 * table * 0.99 <= moved <= 3 * table * 1.01, (moved, table)
    assert reports["host"].host_bytes_per_device >= 3 * table


def test_needed_bytes_parses_the_compiler_out_of_memory_message():
    msg = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
           "Used 20.50G of 15.48G hbm. Exceeded hbm capacity by 5.02G.")
    assert aot.needed_bytes(msg) == int(20.5 * 2**30)
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(1.28T) exceeds available HBM (15.75G).")
    assert aot.needed_bytes(msg) == int(1.28 * 2**40)
    assert aot.needed_bytes("something else") == 0


def test_multi_slice_mesh_puts_dcn_data_across_slices(libtpu):
    devices = aot.tpu_topology("v5e:2x2", num_slices=2).devices
    mesh = make_mesh(MeshConfig(dcn_data=2, data=-1, fsdp=2), devices)
    assert dict(mesh.shape) == {"dcn_data": 2, "data": 2, "fsdp": 2, "tensor": 1, "expert": 1}
    for s in range(2):
        assert {d.slice_index for d in mesh.devices[s].reshape(-1)} == {s}
    with pytest.raises(ConfigError, match="span 2 slices, so mesh.dcn_data must be 2"):
        make_mesh(MeshConfig(dcn_data=1, data=-1), devices)


@pytest.mark.parametrize("topology,devices,hbm_gib", [("v4:2x2x1", 4, 32), ("v5p:2x2x1", 4, 95), ("v5e:2x2", 4, 16),
                                                     ("v6e:2x2", 4, 32)])
def test_topologies_have_one_device_per_chip_with_the_chips_whole_hbm(libtpu, topology, devices, hbm_gib):
    topo = aot.tpu_topology(topology)
    assert len(topo.devices) == devices == aot.n_chips_of(topology)  # megacore on v4 / v5p
    usable = aot.usable_hbm_bytes(topo.devices[0]) / 2**30
    # read from the device's compiler, not the table (v5p's compiler allows 95.74 GiB of the table's 95)
    assert 0.85 * hbm_gib < usable < 1.02 * hbm_gib, usable


def test_hbm_table_covers_every_generation_libtpu_describes(libtpu):
    for name in ("v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2"):
        kind = aot.tpu_topology(name).devices[0].device_kind
        generation, hbm = aot.chip_info(kind)
        assert generation == name.split(":")[0] and hbm in (16.0, 32.0, 95.0)
    assert jax.devices()[0].platform == "cpu"  # the report never needs a TPU


def test_splash_attention_compiles_for_tpu_v4_megacore_with_windows_and_segments(libtpu):
    from jax.experimental import topologies

    devices = topologies.get_topology_desc("v4:2x2x1", "tpu", chip_config_name="megacore").devices
    assert len(devices) == 4  # megacore: one device per v4 chip
    # attention_impl=auto: traced on this CPU host, it must still pick splash for the TPU mesh's devices.
    cfg = aot.for_tpu(load_config("configs/tiny.yaml", [
        "model.attention_impl=auto", "model.attention_window=128", "model.global_every=2", "model.d_model=256",
        "data.seq_len=256", "model.max_seq_len=256", "data.batch_size=8", "mesh.tensor=2"]))
    compiled, mesh, _ = aot.compile_train_step(cfg, devices)
    assert dict(mesh.shape) == {"dcn_data": 1, "data": 2, "fsdp": 1, "tensor": 2, "expert": 1}
    # Each block runs the Pallas kernel three times: forward, dq and dkv (a windowed and a global block here).
    calls = [line for line in compiled.as_text().splitlines() if 'custom_call_target="tpu_custom_call"' in line]
    assert len(calls) == 3 * cfg.model.n_layers, len(calls)
    assert compiled.memory_analysis().temp_size_in_bytes > 0
