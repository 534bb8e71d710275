"""The trainer: learning, accumulation, weight-decay groups, exact resume, preemption, checkpoint
fallback, evaluation and cached generation, and clear CLI errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax.config import load_config
from mhc_jax.data import synthetic_batch
from mhc_jax.generate import generate
from mhc_jax.model import Transformer
from mhc_jax.train.checkpoint import Checkpointer
from mhc_jax.train.loop import run
from mhc_jax.train.metrics import read_metrics
from mhc_jax.train.optimizer import clip_if_finite, group_table, make_optimizer
from mhc_jax.train.step import loss_and_grads, train_step

from conftest import PROSE_FILE, REPO_ROOT

BASE = ["data.batch_size=8", "training.sample_tokens=8", "training.diagnostics_every=0", f"data.dataset=text:{PROSE_FILE}"]


def tiny(*overrides):
    return load_config("tiny", BASE + list(overrides))


def losses(workdir):
    rows = {r["step"]: r["loss"] for r in read_metrics(workdir, "train")}  # later rows win (resumed runs)
    return [rows[s] for s in sorted(rows)]


def test_loss_goes_down_in_a_few_dozen_steps(tmp_path):
    cfg = tiny("training.steps=40", "training.eval_every=40", "optimizer.lr=1e-2")
    result = run(cfg, str(tmp_path), progress=False)
    curve = losses(str(tmp_path))
    assert len(curve) == 40
    assert np.mean(curve[-5:]) < np.mean(curve[:5]) - 1.0, curve
    assert result.eval["loss"] < curve[0]
    assert result.sample.startswith(cfg.training.sample_prompt)


def test_logged_step_time_excludes_evaluation_and_checkpoint_time(tmp_path, monkeypatch):
    """The MFU / tokens-per-second columns time train steps only: an eval (and checkpoint) right after a log
    row is not charged to the next window's steps (it was, inflating step_time ~(eval s / log_every))."""
    import mhc_jax.train.loop as loop
    real = loop.evaluate

    def slow_evaluate(s, step):
        time.sleep(2.0)  # a stand-in for a long eval: 2 s over the 2 steps of a window would be >= 1 s each
        return real(s, step)

    monkeypatch.setattr(loop, "evaluate", slow_evaluate)
    cfg = tiny("training.steps=8", "training.log_every=2", "training.eval_every=2", "checkpoint.every=4")
    run(cfg, str(tmp_path), progress=False)
    rows = [r for r in read_metrics(str(tmp_path), "train") if r["step"] > 2]  # the first window holds the compile
    assert len(rows) == 6
    assert max(r["step_time"] for r in rows) < 0.9, [r["step_time"] for r in rows]


def test_gradient_accumulation_equals_one_big_batch():
    cfg = tiny()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, synthetic_batch(cfg, masked=0.2))
    loss1, g1, n1 = loss_and_grads(model, batch, 1)
    loss4, g4, n4 = loss_and_grads(model, batch, 4)  # 4 micro-batches of 2 rows
    assert float(n1) == float(n4) == float(batch["loss_mask"].sum())
    chex.assert_trees_all_close(loss1, loss4, rtol=1e-6)
    chex.assert_trees_all_close(g1, g4, rtol=1e-5, atol=1e-8)


def test_train_step_accumulates_over_the_grad_accum_it_is_given():
    cfg = tiny()
    batch = synthetic_batch(cfg, masked=0.2)
    metrics = {}
    for k in (1, 4):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        metrics[k] = train_step(model, make_optimizer(cfg, model), batch, grad_accum=k)
    chex.assert_trees_all_close(metrics[4]["loss"], metrics[1]["loss"], rtol=1e-6)
    chex.assert_trees_all_close(metrics[4]["grad_norm"], metrics[1]["grad_norm"], rtol=1e-5)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="training.grad_accum=3"):  # 8 rows do not split into 3
        train_step(model, make_optimizer(cfg, model), batch, grad_accum=3)


@pytest.mark.parametrize("clip_norm", [0.0, 1.0])
def test_clip_if_finite_equals_optax_apply_if_finite_of_clipping(clip_norm):
    """The step's optimiser wrapper (one given norm for clipping and the finiteness test) against optax's
    apply_if_finite(chain(clip_by_global_norm, adam)): same state tree (checkpoints), same updates and
    counters through a clipped step, an unclipped one and two non-finite ones (skipped, params untouched)."""
    import optax
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    inner = optax.adam(0.1)
    ours = clip_if_finite(inner, clip_norm)
    ref = optax.apply_if_finite(optax.chain(*([optax.clip_by_global_norm(clip_norm)] if clip_norm else []), inner),
                                max_consecutive_errors=10**9)
    s_ours, s_ref = ours.init(params), ref.init(params)
    chex.assert_trees_all_equal_structs(s_ours, s_ref)
    steps = [{"w": 3.0 * jnp.ones((2, 3)), "b": jnp.full(3, -2.0)},  # norm 8.5: clipped when clip_norm = 1
             {"w": 0.01 * jnp.ones((2, 3)), "b": jnp.zeros(3)},
             {"w": jnp.full((2, 3), jnp.nan), "b": jnp.zeros(3)},
             {"w": jnp.zeros((2, 3)), "b": jnp.array([jnp.inf, 0.0, 0.0])},
             {"w": -jnp.ones((2, 3)), "b": jnp.ones(3)}]
    for i, g in enumerate(steps):
        u_ours, s_ours = ours.update(g, s_ours, params, grad_norm=optax.tree.norm(g))
        u_ref, s_ref = ref.update(g, s_ref, params)
        chex.assert_trees_all_close(u_ours, u_ref, rtol=1e-6, atol=0)
        chex.assert_trees_all_close(s_ours, s_ref, rtol=1e-6, atol=0)
        assert int(s_ours.notfinite_count) == {2: 1, 3: 2}.get(i, 0)
    assert int(s_ours.total_notfinite) == 2
    # Without a given norm the wrapper computes it: the same update.
    chex.assert_trees_all_close(ours.update(steps[0], ours.init(params), params)[0],
                                ref.update(steps[0], ref.init(params), params)[0], rtol=1e-6, atol=0)


def test_cpu_init_compiled_at_llvm_o1_gives_bit_identical_parameters_to_xla_defaults(monkeypatch):
    """INIT_COMPILER_OPTIONS["cpu"] only speeds up compiling the init program: the parameters and optimiser
    state it creates equal, bit for bit, those of the same program compiled with XLA's default options."""
    import mhc_jax.train.state as train_state
    from mhc_jax.sharding import make_mesh

    cfg = tiny("residual.kind=mhc")
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        _, state, _ = train_state.init_train_state(cfg, mesh)
        monkeypatch.setattr(train_state, "INIT_COMPILER_OPTIONS", {})  # XLA's defaults on every platform
        _, default, _ = train_state.init_train_state(cfg, mesh)
    chex.assert_trees_all_equal(nnx.to_pure_dict(state), nnx.to_pure_dict(default))


def test_weight_decay_groups_follow_the_documented_rule():
    cfg = tiny("residual.kind=mhc", "engram.enabled=true", "engram.layers=[0]")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    table = group_table(nnx.state(model, nnx.Param))
    for path, group in table.items():
        name = path[-1]
        if name == "table":
            assert group == "engram", path
        elif name in ("scale",) or "norm" in "/".join(path):
            assert group == "no_decay", path
        elif path[0] == "blocks" and path[2] in ("attn_res", "mlp_res"):
            assert group == "no_decay", path  # mHC mapping parameters take no weight decay
        elif name in ("wq_CHD", "wk_CKD", "wv_CKD", "wo_HDC", "w_gate_CF", "w_up_CF", "w_down_FC", "embed_VC"):
            assert group == "decay", path
    assert {"decay", "no_decay", "engram"} == set(table.values())
    # Decoupled weight decay with zero gradients shrinks exactly the decayed matrices.
    cfg = cfg.replace(optimizer={"warmup_steps": 0, "schedule": "constant", "clip_norm": 0.0})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    opt = make_optimizer(cfg, model)
    before = nnx.clone(nnx.state(model, nnx.Param))
    opt.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    after = nnx.state(model, nnx.Param)
    for (path, b), (_, a) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after)):
        key = tuple(str(p) for p in path)
        changed = not np.array_equal(np.asarray(a[...]), np.asarray(b[...]))
        assert changed == (table[key] == "decay"), key


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_losses_bitwise(tmp_path):
    cfg = tiny("training.steps=6", "checkpoint.every=3", "training.eval_every=100", "training.sample_tokens=0")
    run(cfg, str(tmp_path), progress=False)
    uninterrupted = losses(str(tmp_path))
    shutil.rmtree(tmp_path / "checkpoints" / "6")  # as if the run had died after step 3's checkpoint
    result = run(cfg, str(tmp_path), progress=False)
    assert result.step == 6
    assert losses(str(tmp_path)) == uninterrupted  # bitwise: the rows of steps 4..6 were rewritten


def test_host_resident_engram_table_trains_like_device_placement_and_resumes(tmp_path):
    engram = ["residual.kind=mhc", "engram.enabled=true", "engram.layers=[1]", "engram.heads_per_ngram=2",
              "engram.head_dim=8", "training.steps=6", "checkpoint.every=3", "training.eval_every=6"]
    device_dir, host_dir = str(tmp_path / "device"), str(tmp_path / "host")
    run(tiny(*engram, "training.sample_tokens=0"), device_dir, progress=False)
    host_cfg = tiny(*engram, "training.sample_tokens=4", "engram.placement=host", "engram.update=dense")
    result = run(host_cfg, host_dir, progress=False)
    host_losses = losses(host_dir)
    np.testing.assert_allclose(host_losses, losses(device_dir), rtol=1e-6)
    assert result.sample.startswith(host_cfg.training.sample_prompt)  # generation with the host table

    from mhc_jax.train.state import load_model_from_workdir
    _, model, step = load_model_from_workdir(host_dir)
    assert step == 6 and model.blocks[1].engram.table[...].sharding.memory_kind == "pinned_host"

    shutil.rmtree(os.path.join(host_dir, "checkpoints", "6"))  # resume the host run from step 3
    run(host_cfg.replace(training={"sample_tokens": 0}), host_dir, progress=False)
    assert losses(host_dir) == host_losses


def _train_cmd(workdir, *extra):
    return [sys.executable, os.path.join(REPO_ROOT, "train.py"), "--config", "tiny", "--workdir", str(workdir),
            "--no-progress", *BASE, *extra]


def test_sigterm_saves_a_restorable_checkpoint_and_exits_143(tmp_path):
    proc = subprocess.Popen(_train_cmd(tmp_path, "training.steps=100000", "checkpoint.every=100000",
                                       "training.eval_every=100000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Wait until training steps are being logged, then ask it to stop.
    t0 = time.time()
    while time.time() - t0 < 240:
        if os.path.exists(tmp_path / "metrics.jsonl") and os.path.getsize(tmp_path / "metrics.jsonl") > 0:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, (out, err)
    assert "Re-run the same command to resume" in out
    cfg = tiny()
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), cfg.checkpoint)
    step = ckpt.latest_step()
    assert step is not None and step >= cfg.training.log_every
    ckpt.close()
    from mhc_jax.train.state import load_model_from_workdir
    _, model, restored_step = load_model_from_workdir(str(tmp_path))
    assert restored_step == step


def test_truncated_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    cfg = tiny("training.steps=4", "checkpoint.every=2", "training.eval_every=100", "training.sample_tokens=0")
    run(cfg, str(tmp_path), progress=False)
    newest = tmp_path / "checkpoints" / "4" / "state"
    for root, _, files in os.walk(newest):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "r+b") as fh:
                fh.truncate(max(0, os.path.getsize(path) // 3))
    from mhc_jax.train.state import load_model_from_workdir
    _, _, step = load_model_from_workdir(str(tmp_path))
    assert step == 2


@pytest.mark.parametrize("overrides", [[], ["residual.kind=mhc", "engram.enabled=true", "engram.layers=[1]"]])
def test_cached_generation_equals_recomputing_the_full_sequence(overrides):
    cfg = tiny(*overrides)
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    engram_fn = None
    if cfg.engram.enabled:
        from mhc_jax.data.tokenizer import load_tokenizer
        from mhc_jax.engram.ids import EngramIds
        engram_fn = EngramIds(cfg.engram, load_tokenizer("byte"))
    prompt = [256, 10, 20, 30, 40]
    for kwargs in ({"temperature": 0.0}, {"temperature": 1.0, "top_k": 20, "top_p": 0.9, "seed": 1}):
        cached = generate(model, prompt, 12, use_cache=True, engram_ids=engram_fn, **kwargs)
        full = generate(model, prompt, 12, use_cache=False, engram_ids=engram_fn, **kwargs)
        assert cached == full and len(cached) == 12


def test_evaluate_reads_the_checkpoint_the_trainer_wrote(tmp_path, capsys):
    cfg = tiny("training.steps=3", "training.eval_every=3", "training.sample_tokens=0")
    result = run(cfg, str(tmp_path), progress=False)
    from mhc_jax.evaluate import main
    assert main(["--workdir", str(tmp_path), "--json", str(tmp_path / "eval.json")]) == 0
    out = json.loads((tmp_path / "eval.json").read_text())
    assert out["step"] == 3
    assert out["loss"] == pytest.approx(result.eval["loss"], rel=1e-5)


def test_train_py_rejects_a_bad_config_and_an_unwritable_workdir(tmp_path):
    bad = subprocess.run(_train_cmd(tmp_path / "w", "model.n_heads=3"), capture_output=True, text=True)
    assert bad.returncode == 2
    assert "model.n_heads=3 is not allowed" in bad.stderr
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    unwritable = subprocess.run(_train_cmd(blocker / "sub"), capture_output=True, text=True)
    assert unwritable.returncode == 2
    assert "is not writable" in unwritable.stderr and str(blocker / "sub") in unwritable.stderr


def test_train_step_compiler_options_apply_to_cpu_only():
    # XLA:CPU gets CPU_COMPILER_OPTIONS (this jaxlib accepts them: a step compiles with them); an
    # ahead-of-time compile for another platform gets none.
    # The answer does not depend on a context mesh (the trainer asks under jax.set_mesh).
    from mhc_jax.train.step import CPU_COMPILER_OPTIONS, compiler_options
    compiler_options.cache_clear()
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        assert compiler_options("cpu") == CPU_COMPILER_OPTIONS
    assert compiler_options("tpu") is None and compiler_options("gpu") is None
