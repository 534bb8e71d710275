"""The SPMD partitioner never falls back to "Involuntary full rematerialization" (replicating a tensor to
re-split it) in the train step on data, fsdp, tensor or mixed meshes: the compiler's own log is read."""

from __future__ import annotations

import jax
import pytest

from mhc_jax.aot import compile_train_step
from mhc_jax.config import load_config

MESHES = {"data": (8, 1, 1), "fsdp": (1, 8, 1), "tensor": (4, 1, 2), "data+fsdp": (2, 4, 1), "all": (2, 2, 2)}


@pytest.fixture
def no_compilation_cache():
    """A cached executable skips the partitioner (and its log): compile for real."""
    old = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", old)


@pytest.mark.parametrize("kind,mesh", [("plain", m) for m in MESHES] + [("mhc", "data+fsdp")])
def test_train_step_partitions_without_involuntary_full_rematerialization(kind, mesh, capfd,
                                                                            no_compilation_cache):
    d, f, t = MESHES[mesh]
    cfg = load_config("tiny", [f"residual.kind={kind}", "data.batch_size=8", f"mesh.data={d}", f"mesh.fsdp={f}",
                               f"mesh.tensor={t}"])
    capfd.readouterr()
    compiled, built, _ = compile_train_step(cfg, jax.devices())
    log = capfd.readouterr().err
    assert dict(built.shape) == {"dcn_data": 1, "data": d, "fsdp": f, "tensor": t, "expert": 1}
    assert "Involuntary full rematerialization" not in log, log[:3000]
