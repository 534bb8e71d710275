"""Meshes, the logical-axis rules applied to the whole train state, sharded loss/gradients/steps equal to
the single-device ones, cross-mesh checkpoint restore, and multi-process detection."""

from __future__ import annotations

import ast
import logging
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # conftest sets it in CI

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mhc_jax import sharding
from mhc_jax.config import Config, ConfigError, MeshConfig
from mhc_jax.data import synthetic_batch
from mhc_jax.model.transformer import Transformer
from mhc_jax.sharding import (batch_shardings, check_global_batch, make_mesh, resolve_mesh_shape,
                              train_state_shardings)
from mhc_jax.train.optimizer import make_optimizer
from mhc_jax.train.state import abstract_train_state
from mhc_jax.train.step import loss_and_grads, make_sharded_step, train_step

B, T = 8, 16
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]  # (data, fsdp, tensor)


def make_cfg(kind: str = "plain", engram: bool = False, **mesh) -> Config:
    # Every sharded dimension divides 8: d_model 32, 8 heads, d_ff 64, vocab padded to 264.
    return Config().replace(
        model={"d_model": 32, "n_layers": 2, "n_heads": 8, "n_kv_heads": 8, "d_ff": 64, "max_seq_len": T,
               "vocab_pad_multiple": 8, "dtype": "float32", "scan_layers": False},  # per-block layout (tests/test_scan.py: scanned == unrolled)
        residual={"kind": kind, "n_streams": 4},
        engram={"enabled": engram, "layers": [1], "max_ngram": 3, "heads_per_ngram": 2, "head_dim": 4,
                "table_size": 61, "row_pad_multiple": 8},
        data={"seq_len": T, "batch_size": B},
        optimizer={"lr": 1e-2, "warmup_steps": 0},
        mesh=mesh or {})


def make_batch(cfg: Config, seed: int = 0) -> dict[str, jax.Array]:
    """Two packed documents per row, 10% of the loss masked, valid Engram table ids."""
    return jax.tree.map(jnp.asarray, synthetic_batch(cfg, seed, documents=2, masked=0.1))


def mesh_of(shape: tuple[int, int, int]) -> jax.sharding.Mesh:
    d, f, t = shape
    return make_mesh(MeshConfig(data=d, fsdp=f, tensor=t))


# --------------------------------------------------------------------------------------------------
# Mesh construction
# --------------------------------------------------------------------------------------------------


def test_mesh_minus_one_takes_the_remaining_devices():
    assert resolve_mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (1, 2, 2, 2, 1)
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=1))
    assert dict(mesh.shape) == {"dcn_data": 1, "data": 2, "fsdp": 4, "tensor": 1, "expert": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_mesh_product_mismatch_raises_naming_sizes_and_devices():
    with pytest.raises(ConfigError, match="multiplies to 4 but there are 8 devices"):
        make_mesh(MeshConfig(data=2, fsdp=2, tensor=1))
    with pytest.raises(ConfigError, match="multiply to 3, which does not divide the 8 devices"):
        resolve_mesh_shape(MeshConfig(data=-1, fsdp=3), 8)


def test_mesh_over_given_devices_keeps_their_order():
    devices = jax.devices()[::-1][:4]
    mesh = make_mesh(MeshConfig(data=2, fsdp=2), devices)
    assert list(mesh.devices.reshape(-1)) == devices


# --------------------------------------------------------------------------------------------------
# Rules applied to the train state and the batch
# --------------------------------------------------------------------------------------------------


def _spec_of(shardings, *path) -> P:
    node = shardings
    for key in path:
        node = node[key]
    return node.spec


def _adam_mu(shardings, group: str):
    return shardings[1]["opt_state"]["inner_state"][1]["inner_states"][group]["inner_state"][0]["mu"]


def test_fsdp_shards_params_and_moments_alike_and_replicates_scalars():
    cfg = make_cfg(data=1, fsdp=4, tensor=2)
    mesh = make_mesh(cfg.mesh)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    sh = train_state_shardings(model, make_optimizer(cfg, model), mesh, cfg)
    wq = ("blocks", 0, "attn", "wq_CHD")
    assert _spec_of(sh[0], *wq) == P("fsdp", "tensor", None)
    assert _spec_of(_adam_mu(sh, "decay"), *wq) == P("fsdp", "tensor", None)
    assert _spec_of(sh[0], "embed_VC") == P("tensor", "fsdp")
    assert _spec_of(sh[0], "blocks", 0, "mlp", "w_down_FC") == P("tensor", "fsdp")
    assert _spec_of(_adam_mu(sh, "decay"), "blocks", 1, "mlp", "w_down_FC") == P("tensor", "fsdp")
    assert _spec_of(sh[0], "final_norm", "scale") == P(None)
    assert sh[1]["step"].spec == P()
    assert sh[1]["opt_state"]["inner_state"][1]["inner_states"]["decay"]["inner_state"][0]["count"].spec == P()


def test_zero1_replicates_params_over_fsdp_but_shards_moments():
    cfg = make_cfg(data=1, fsdp=4, tensor=2).replace(mesh={"zero1": True})
    mesh = make_mesh(cfg.mesh)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    sh = train_state_shardings(model, make_optimizer(cfg, model), mesh, cfg)
    wq = ("blocks", 0, "attn", "wq_CHD")
    assert _spec_of(sh[0], *wq) == P(None, "tensor", None)
    assert _spec_of(_adam_mu(sh, "decay"), *wq) == P("fsdp", "tensor", None)
    assert _spec_of(sh[0], "embed_VC") == P("tensor", None)
    assert _spec_of(_adam_mu(sh, "decay"), "embed_VC") == P("tensor", "fsdp")


def test_a_parameter_the_mesh_does_not_divide_is_named_with_its_axis_at_start_up(caplog):
    cfg = make_cfg().replace(model={"vocab_pad_multiple": 1})  # 259 rows do not split over tensor=2
    with caplog.at_level(logging.WARNING, logger="mhc_jax.train.state"):
        abstract_train_state(cfg, mesh_of((4, 1, 2)))
    lines = [r.getMessage() for r in caplog.records if "embed_VC" in r.getMessage()]
    assert len(lines) == 1 and "dimension 0 (259) is not divisible by mesh axis tensor (2)" in lines[0], lines
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mhc_jax.train.state"):
        abstract_train_state(make_cfg(), mesh_of((4, 1, 2)))  # vocab padded to 264: every axis divides
    assert not caplog.records


def test_every_constrain_call_names_activation_axes_of_the_rules_table():
    package = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mhc_jax")
    calls = 0
    for folder, _, files in os.walk(package):
        for name in (f for f in files if f.endswith(".py")):
            with open(os.path.join(folder, name)) as f:
                tree = ast.parse(f.read())
            consts = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                      for t in node.targets if isinstance(t, ast.Name)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "constrain":
                    axes = node.args[1]
                    axes = ast.literal_eval(consts[axes.id] if isinstance(axes, ast.Name) else axes)
                    assert all(a is None or (a.startswith("activation_") and a in sharding.LOGICAL_AXIS_RULES)
                               for a in axes), (name, node.lineno, axes)
                    calls += 1
    assert calls >= 4


def test_batch_rows_split_over_data_and_fsdp_and_bad_batch_raises():
    mesh = mesh_of((2, 4, 1))
    sh = batch_shardings({"inputs": jax.ShapeDtypeStruct((8, T), jnp.int32),
                          "engram_ids": jax.ShapeDtypeStruct((8, T, 1, 4), jnp.int32)}, mesh)
    assert sh["inputs"].spec == P(("data", "fsdp"), None)
    assert sh["engram_ids"].spec == P(("data", "fsdp"), None, None, None)
    with pytest.raises(ValueError, match="data.batch_size=12 .* multiple of 8"):
        check_global_batch(12, mesh)
    with pytest.raises(ValueError, match="multiple of 16"):
        check_global_batch(8, mesh, grad_accum=2)


# --------------------------------------------------------------------------------------------------
# Sharded numerics equal single-device numerics
# --------------------------------------------------------------------------------------------------

MODELS = [("plain", False), ("mhc", False), ("mhc", True)]


@pytest.mark.multidevice
@pytest.mark.parametrize("kind,engram", MODELS, ids=["plain", "mhc", "mhc+engram"])
def test_loss_and_grads_on_every_mesh_equal_single_device(kind: str, engram: bool):
    check_sharded_loss_and_grads(make_cfg(kind, engram), MESHES)


def check_sharded_loss_and_grads(cfg: Config, meshes: list[tuple[int, int, int]]) -> dict:
    """Loss and gradients of `cfg`'s model on each (data, fsdp, tensor) mesh equal the single-device ones;
    returns the last mesh's parameter shardings."""
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    batch = make_batch(cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def run(p, r, b):
        loss, grads, _ = loss_and_grads(nnx.merge(graphdef, p, r), b)
        return loss, grads

    ref_loss, ref_grads = jax.jit(run)(params, rest, batch)
    for shape in meshes:
        mesh = mesh_of(shape)
        p_sh = sharding.train_state_shardings_of(params, mesh, cfg)
        b_sh = batch_shardings(batch, mesh)
        with jax.set_mesh(mesh):
            loss, grads = jax.jit(run, out_shardings=(None, p_sh))(
                jax.device_put(params, p_sh), rest, jax.device_put(batch, b_sh))
        chex.assert_trees_all_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
        assert grads["embed_VC"][...].sharding.spec == p_sh["embed_VC"].spec, shape
    return p_sh


@pytest.mark.multidevice
@pytest.mark.parametrize("kind,engram", [("plain", False), ("mhc", True)], ids=["plain", "mhc+engram"])
def test_sharded_train_step_equals_unsharded_train_step(kind: str, engram: bool):
    # Adam's first update is g / (|g| + eps) * lr: with eps 1e-8 a gradient near zero turns float32
    # reduction-order noise into lr-sized parameter noise; eps 1e-3 keeps the update smooth in g.
    cfg = make_cfg(kind, engram, data=2, fsdp=2, tensor=2).replace(optimizer={"eps": 1e-3})
    batch = make_batch(cfg, seed=1)
    ref_model = Transformer(cfg, rngs=nnx.Rngs(0))
    ref_opt = make_optimizer(cfg, ref_model)
    ref_metrics = train_step(ref_model, ref_opt, batch)
    ref_state = nnx.state((ref_model, ref_opt))

    mesh = make_mesh(cfg.mesh)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(cfg, model)
    graphdef, state = nnx.split((model, optimizer))
    state_sh = train_state_shardings(model, optimizer, mesh, cfg)
    batch_sh = batch_shardings(batch, mesh)
    step = make_sharded_step(graphdef, state_sh, batch_sh)
    with jax.set_mesh(mesh):
        new_state, metrics = step(jax.device_put(state, state_sh), jax.device_put(batch, batch_sh))
    chex.assert_trees_all_close(metrics, ref_metrics, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(new_state, ref_state, rtol=1e-4, atol=1e-6)
    wq = new_state[0]["blocks"][0]["attn"]["wq_CHD"][...]
    assert wq.sharding.spec == P("fsdp", "tensor", None)


# --------------------------------------------------------------------------------------------------
# Checkpoints move between meshes
# --------------------------------------------------------------------------------------------------


@pytest.mark.multidevice
def test_checkpoint_from_one_mesh_restores_on_another_and_on_one_device(tmp_path):
    from mhc_jax.train.checkpoint import Checkpointer, pure_state

    cfg = make_cfg("mhc", data=2, fsdp=4, tensor=1)
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    optimizer = make_optimizer(cfg, model)
    mesh = make_mesh(cfg.mesh)
    state_sh = train_state_shardings(model, optimizer, mesh, cfg)
    graphdef, state = nnx.split((model, optimizer))
    batch = make_batch(cfg, seed=2)
    step = make_sharded_step(graphdef, state_sh, batch_shardings(batch, mesh))
    with jax.set_mesh(mesh):  # one step, so the Adam moments are not zeros
        state, _ = step(jax.device_put(state, state_sh), jax.device_put(batch, batch_shardings(batch, mesh)))
    nnx.update((model, optimizer), state)
    saved = pure_state(model, optimizer)
    assert saved[0]["blocks"][0]["attn"]["wq_CHD"].sharding.spec == P("fsdp", None, None)

    ckpt = Checkpointer(str(tmp_path / "ckpt"), cfg.checkpoint)
    ckpt.save(1, saved, meta={"step": 1}, force=True)
    ckpt.wait()
    expected = jax.tree.map(np.asarray, saved)

    for target in [make_mesh(MeshConfig(data=8)), make_mesh(MeshConfig(data=1), jax.devices()[:1])]:
        shardings = nnx.to_pure_dict(train_state_shardings(model, optimizer, target, cfg))
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), saved, shardings)
        restored, _, meta, step_no = ckpt.restore(abstract)
        assert step_no == 1 and meta["step"] == 1
        chex.assert_trees_all_equal(jax.tree.map(np.asarray, restored), expected)
        chex.assert_trees_all_equal_structs(restored, saved)
        leaves = jax.tree.leaves(restored)
        assert all(x.sharding.mesh.shape == target.shape for x in leaves)
        assert {d for x in leaves for d in x.sharding.device_set} == set(target.devices.reshape(-1))
    ckpt.close()
