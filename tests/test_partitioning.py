"""The SPMD partitioner never falls back to "Involuntary full rematerialization" (replicating a tensor to
re-split it) in the train step or in generation's decode step on data, fsdp, tensor or mixed meshes: the
compiler's own log is read."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mhc_jax.aot import compile_train_step
from mhc_jax.config import load_config
from mhc_jax.sampling import _decode_and_sample
from mhc_jax.sharding import make_mesh
from mhc_jax.train.checkpoint import abstract_like
from mhc_jax.train.state import abstract_train_state

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


@pytest.mark.parametrize("kind,mesh", [("plain", m) for m in MESHES] + [("mhc", "data+fsdp")])
def test_decode_step_partitions_without_involuntary_full_rematerialization(kind, mesh, capfd, no_compilation_cache):
    """The programs `generate` runs (a 3-token prompt, then one token at a time; batch 1, which no batch
    axis divides), compiled for the trained model's shardings with replicated inputs and cache."""
    d, f, t = MESHES[mesh]
    cfg = load_config("tiny", [f"residual.kind={kind}", "data.batch_size=8", f"mesh.data={d}", f"mesh.fsdp={f}",
                               f"mesh.tensor={t}"])
    built = make_mesh(cfg.mesh)
    replicated = NamedSharding(built, PartitionSpec())

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    with jax.set_mesh(built):
        graphdef, state, shardings = abstract_train_state(cfg, built)
        nnx.replace_by_pure_dict(state, abstract_like(nnx.to_pure_dict(state), nnx.to_pure_dict(shardings)))
        model, _ = nnx.merge(graphdef, state)
        cache = jax.tree.map(lambda a: spec(a.shape, a.dtype),
                             nnx.eval_shape(lambda m: m.init_cache(1, cfg.model.max_seq_len), model))
        capfd.readouterr()
        for T in (3, 1):
            _decode_and_sample.lower(model, spec((1, T), jnp.int32), spec((1, T), jnp.int32), cache, (None, None),
                                     0.8, 40, 1.0, spec((2,), jnp.uint32)).compile()
    log = capfd.readouterr().err
    assert "Involuntary full rematerialization" not in log, log[:3000]
