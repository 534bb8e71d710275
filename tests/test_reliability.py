"""Reliability: damaged checkpoints are detected (checksums), moved aside and fallen back from; the
workdir's config lives in its checkpoints; a non-finite run stops at the step; every expected failure of
every CLI is one `error:` line with exit 2; sampling values are validated."""

import importlib.util
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import damage
from conftest import PROSE_FILE, REPO_ROOT
from mhc_jax.config import ConfigError, load_config
from mhc_jax.errors import CheckpointError, TrainingError
from mhc_jax.generate import check_sampling, fit_prompt
from mhc_jax.sharding import make_mesh
from mhc_jax.train.checkpoint import HOST_ITEM, Checkpointer, host_tree_checksums, tree_checksums
from mhc_jax.train.loop import run
from mhc_jax.train.metrics import MetricsWriter, read_metrics
from mhc_jax.train.state import init_train_state, restore_train_state

BASE = ["data.batch_size=8", "training.sample_tokens=0", "training.diagnostics_every=0",
        f"data.dataset=text:{PROSE_FILE}", "training.peak_flops=1e12", "training.eval_every=100",
        "checkpoint.every=2", "checkpoint.keep=3"]


def tiny(*overrides):
    return load_config("tiny", BASE + list(overrides))


def losses(workdir):
    rows = {r["step"]: r["loss"] for r in read_metrics(workdir, "train")}
    return [rows[s] for s in sorted(rows)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir trained for 6 steps with checkpoints 2, 4, 6, and its loss curve."""
    workdir = str(tmp_path_factory.mktemp("trained") / "w")
    run(tiny("training.steps=6"), workdir, progress=False)
    return workdir, losses(workdir)


def copy_of(trained, tmp_path):
    dest = str(tmp_path / "w")
    shutil.copytree(trained[0], dest)
    return dest


# --------------------------------------------------------------------------------------------------
# Integrity checksums
# --------------------------------------------------------------------------------------------------


def _reference_checksum(x: np.ndarray) -> str:
    """The documented formula in numpy uint64 arithmetic reduced mod 2^32 (independent of the jax code)."""
    u = x.reshape(-1).view(np.uint32).astype(np.uint64) if x.dtype.itemsize == 4 else \
        x.reshape(-1).view(np.uint16).astype(np.uint64)
    i = np.arange(u.size, dtype=np.uint64)
    m = 1 << 32
    s1 = int(np.sum((u * (2 * i + 1)) % m) % m)
    mixed = ((u ^ (u >> 16)) * 0x45D9F3B) % m
    w = ((i * 0x9E3779B1) % m) | 1
    s2 = int(np.sum((mixed * w) % m) % m)
    return "%08x%08x" % (s1, s2)


def test_checksum_matches_its_formula_is_mesh_independent_and_sees_one_flipped_bit():
    rng = np.random.default_rng(0)
    tree = {"w": rng.standard_normal((16, 24)).astype(np.float32),
            "b": rng.standard_normal((8,)).astype(jnp.bfloat16), "n": np.array(7, np.int32)}
    sums = tree_checksums(jax.tree.map(jnp.asarray, tree))
    assert sums["['w']"] == _reference_checksum(tree["w"])
    assert sums["['b']"] == _reference_checksum(tree["b"])
    mesh = make_mesh(load_config(None, ["mesh.data=2", "mesh.tensor=4"]).mesh)
    sharded = jax.device_put(jnp.asarray(tree["w"]), NamedSharding(mesh, PartitionSpec("data", "tensor")))
    assert tree_checksums({"w": sharded})["['w']"] == sums["['w']"]
    flipped = tree["w"].copy()
    flipped.view(np.uint32)[5, 7] ^= 1 << 13
    assert tree_checksums({"w": jnp.asarray(flipped)})["['w']"] != sums["['w']"]
    # the host tables' numpy checksum (chunked, on the host) is the same function
    tree["count"] = np.asarray(1234567890, np.int32)
    assert host_tree_checksums(tree) == tree_checksums(jax.tree.map(jnp.asarray, tree))
    assert host_tree_checksums({"w": flipped})["['w']"] != sums["['w']"]


# --------------------------------------------------------------------------------------------------
# Checkpoints that heal
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(damage.KINDS))
def test_damaged_newest_checkpoint_is_moved_aside_and_its_step_saved_again(trained, tmp_path, kind):
    workdir = copy_of(trained, tmp_path)
    damage.KINDS[kind](os.path.join(workdir, "checkpoints", "6"))
    cfg = tiny("training.steps=6")
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        graphdef, state, shardings = init_train_state(cfg, mesh)
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint, heal=True)
        restored, data_state, meta, step = restore_train_state(ckpt, graphdef, state, shardings)
        assert step == 4 and [s["step"] for s in ckpt.skipped] == [6]
        moved = ckpt.skipped[0]["moved_to"]
        assert moved.startswith(os.path.join(workdir, "checkpoints_unreadable", "6-")) and os.path.isdir(moved)
        assert ckpt.all_steps() == [2, 4]
        ckpt.save(6, nnx.to_pure_dict(restored), data_state, {"step": 6, "config": meta["config"]}, force=True)
        ckpt.close()
    assert Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint).all_steps() == [2, 4, 6]


def flip_silently(files: list[str], silent: Callable[[], bool]) -> None:
    """Flips single bits of `files` until `silent()` says the storage reads them back without complaint
    but with other numbers (compressed chunks carry no checksum of their own); undoes every other flip."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        path = files[int(rng.integers(len(files)))]
        data = bytearray(open(path, "rb").read())
        at, bit = int(rng.integers(len(data))), 1 << int(rng.integers(8))
        data[at] ^= bit
        open(path, "wb").write(bytes(data))
        if silent():
            return
        data[at] ^= bit  # rejected or harmless: undo it and try another
        open(path, "wb").write(bytes(data))
    pytest.fail("no silent corruption found in 300 single-bit flips")


def test_silently_changed_numbers_fail_the_checksum_and_the_previous_step_is_used(tmp_path):
    """Searches for a byte flip that the storage layer reads back without complaint but with other numbers
    (compressed chunks carry no checksum of their own), then checks that restore refuses it."""
    import orbax.checkpoint as ocp
    cfg = tiny().checkpoint
    values = np.linspace(-1, 1, 4096, dtype=np.float32)
    ckpt = Checkpointer(str(tmp_path / "c"), cfg, heal=True)
    for step in (1, 2):
        ckpt.save(step, {"w": jnp.asarray(values * step)}, None, {"step": step}, force=True)
    ckpt.wait()
    target = {"w": jax.ShapeDtypeStruct(values.shape, values.dtype,
                                        sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}

    def unverified_read() -> np.ndarray | None:
        try:
            out = ckpt.manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
            return np.asarray(out["state"]["w"])
        except Exception:  # noqa: BLE001 - the storage layer noticed this flip
            return None

    flip_silently(damage._array_files(str(tmp_path / "c" / "2")),
                  lambda: (read := unverified_read()) is not None and not np.array_equal(read, values * 2))
    restored, _, _, step = ckpt.restore(target)
    assert step == 1 and "checksum mismatch in 1 of 1 arrays (e.g. ['w'])" in ckpt.skipped[0]["reason"]
    np.testing.assert_array_equal(np.asarray(restored["w"]), values)
    ckpt.close()


def _host_tables(step: int) -> dict:
    """A sparse Engram host item (mhc_jax.engram.host_tables.HostTables.state_dict) with distinct numbers."""
    t = np.linspace(-1, 1, 2048, dtype=np.float32).reshape(256, 8) * step
    return {"count": np.asarray(step, np.int64), "layer_1": {"table": t, "mu": t / 10, "nu": t * t}}


@pytest.mark.parametrize("how", ["silent", "flip_bytes", "truncate"])
def test_damaged_host_tables_fail_their_checksums_and_the_previous_step_is_used(tmp_path, how):
    """The sparse Engram tables and row moments (Orbax item engram_tables) are covered by the checksums:
    a damaged host item makes its step unreadable like damaged state: the trainer's restore falls back to
    the previous step and moves the damaged one aside; a reader is told the step is damaged."""
    import orbax.checkpoint as ocp
    ckpt = Checkpointer(str(tmp_path / "c"), tiny().checkpoint, heal=True)
    w = np.arange(64, dtype=np.float32)
    for step in (1, 2):
        ckpt.save(step, {"w": jnp.asarray(w * step)}, None, {"step": step}, force=True, host_state=_host_tables(step))
    ckpt.wait()
    step_dir = str(tmp_path / "c" / "2")

    def silent() -> bool:
        try:
            out = ckpt.manager.restore(2, args=ocp.args.Composite(
                **{HOST_ITEM: ocp.args.StandardRestore(_host_tables(0))}))
        except Exception:  # noqa: BLE001 - the storage layer noticed this flip
            return False
        got = jax.tree.map(np.asarray, out[HOST_ITEM])
        return not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(_host_tables(2))))

    files = damage._array_files(step_dir, HOST_ITEM)
    if how == "silent":
        flip_silently(files, silent)
    else:  # the kinds of damage.KINDS, to the host item's files (the state stays intact)
        for path in files:
            data = bytearray(open(path, "rb").read())
            if how == "truncate":
                data = data[:len(data) // 2]
            else:
                mid = len(data) // 2
                data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
            open(path, "wb").write(bytes(data))

    reader = Checkpointer(str(tmp_path / "c"), tiny().checkpoint, read_only=True)
    with pytest.raises(CheckpointError, match="checkpoint step 2 in .* is unreadable"):
        reader.restore_host_state(_host_tables(0), 2)
    reader.close()
    target = {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
    restored, _, _, step = ckpt.restore(target, host_target=_host_tables(0))
    assert step == 1 and [s["step"] for s in ckpt.skipped] == [2]
    if how == "silent":
        assert "checksum mismatch in 1 of 4 engram_tables arrays" in ckpt.skipped[0]["reason"]
    assert ckpt.skipped[0]["moved_to"] and os.path.isdir(ckpt.skipped[0]["moved_to"])
    chex.assert_trees_all_equal(ckpt.host_state, _host_tables(1))
    np.testing.assert_array_equal(np.asarray(restored["w"]), w)
    ckpt.close()


def test_rerun_after_damage_falls_back_logs_it_and_retrains_to_the_same_losses(trained, tmp_path, capsys):
    workdir = copy_of(trained, tmp_path)
    damage.flip_bytes(os.path.join(workdir, "checkpoints", "6"))
    damage.truncate(os.path.join(workdir, "checkpoints", "4"))
    run(tiny("training.steps=6"), workdir, progress=False)
    out = capsys.readouterr().out
    assert "checkpoint step 6 is unreadable" in out and "resumed from" in out and "(step 2)" in out
    fallback = read_metrics(workdir, "checkpoint_fallback")
    assert [r["step"] for r in fallback] == [6, 4]
    assert all(os.path.isdir(r["moved_to"]) for r in fallback)
    assert losses(workdir) == trained[1]  # bitwise: steps 3..6 retrained from step 2


def test_reader_falls_back_without_moving_and_names_a_missing_step(trained, tmp_path):
    from mhc_jax.train.state import load_model_from_workdir
    workdir = copy_of(trained, tmp_path)
    damage.delete_metadata(os.path.join(workdir, "checkpoints", "6"))
    _, _, step = load_model_from_workdir(workdir)
    assert step == 4 and sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]
    with pytest.raises(Exception, match=r"checkpoint step 5 does not exist .* holds steps \[2, 4, 6\]"):
        load_model_from_workdir(workdir, step=5)


# --------------------------------------------------------------------------------------------------
# Workdir hygiene and resuming with another config
# --------------------------------------------------------------------------------------------------


def test_config_yaml_appears_only_with_a_checkpoint_and_resume_checks_the_checkpoint(trained, tmp_path, capsys):
    failed = str(tmp_path / "failed")
    with pytest.raises(Exception, match="does not exist"):
        run(tiny("data.dataset=text:/no/such/file.txt"), failed, progress=False)
    assert not os.path.exists(os.path.join(failed, "config.yaml"))  # a retry with another model is free

    workdir = copy_of(trained, tmp_path)
    os.remove(os.path.join(workdir, "config.yaml"))
    with pytest.raises(ConfigError, match="model config differs"):
        run(tiny("training.steps=8", "model.d_model=64"), workdir, progress=False)
    assert not os.path.exists(os.path.join(workdir, "config.yaml"))
    from mhc_jax.train.state import load_config_from_workdir
    assert load_config_from_workdir(workdir).model.d_model == 32  # from the checkpoint itself

    with pytest.raises(ConfigError, match="trained with data.dataset="):
        run(tiny("training.steps=8", "data.dataset=pystdlib"), workdir, progress=False)
    result = run(tiny("training.steps=3"), workdir, progress=False)
    assert result.status == "nothing_to_train" and result.step == 6
    assert "nothing to train" in capsys.readouterr().out
    result = run(tiny("training.steps=7", "data.batch_size=16"), workdir, progress=False)
    assert result.step == 7
    assert "resuming with a changed config (not an exact continuation): data.batch_size: 8 -> 16" \
        in capsys.readouterr().out
    assert load_config(os.path.join(workdir, "config.yaml")).data.batch_size == 16


# --------------------------------------------------------------------------------------------------
# Non-finite stop
# --------------------------------------------------------------------------------------------------


def test_nonfinite_run_stops_at_the_step_before_any_checkpoint_or_eval(tmp_path):
    cfg = tiny("training.steps=20", "training.log_every=20", "training.max_nonfinite_in_row=2",
               "checkpoint.every=3", "training.eval_every=3", "optimizer.lr=1e30", "optimizer.clip_norm=0",
               "optimizer.warmup_steps=0", "optimizer.schedule=constant")
    with pytest.raises(TrainingError, match=r"NaN/Inf for 2 steps in a row \(steps 2 to 3\)"):
        run(cfg, str(tmp_path), progress=False)
    rows = read_metrics(str(tmp_path))
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train[:3]] == [1, 2, 3] and len(train) <= 4  # every computed step, no more
    assert [r["nonfinite"] for r in train[:3]] == [False, True, True]
    assert not any(r["kind"] == "eval" for r in rows)
    assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")
    assert not os.path.exists(tmp_path / "config.yaml")


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": float("nan")}, "temperature=nan is not allowed"),
    ({"temperature": -1.0}, "temperature=-1.0 is not allowed: must be a finite number >= 0"),
    ({"top_p": 0.0}, r"top_p=0.0 is not allowed: must be in \(0, 1\]"),
    ({"top_p": 1.5}, "top_p=1.5 is not allowed"),
    ({"top_k": -3}, "top_k=-3 is not allowed: must be an integer >= 0"),
    ({"max_new_tokens": -1}, "max_new_tokens=-1 is not allowed"),
])
def test_bad_sampling_values_are_refused_naming_the_value(kwargs, message):
    args = {"temperature": 0.8, "top_k": 0, "top_p": 1.0, "max_new_tokens": 10, **kwargs}
    with pytest.raises(ConfigError, match=message):
        check_sampling(**args)


def test_long_prompt_keeps_its_last_tokens_and_max_new_tokens_is_honoured_or_refused():
    ids = [256] + list(range(100))  # BOS + 100 prompt tokens, context 64
    kept, dropped = fit_prompt(ids, 50, 64)
    assert len(kept) + 50 == 64 and kept[0] == 256 and kept[1:] == list(range(100))[-13:] and dropped == 87
    assert fit_prompt(ids[:5], 10, 64) == (ids[:5], 0)
    with pytest.raises(ConfigError, match=r"max_new_tokens=63 is not allowed: .* <= model.max_seq_len - 2 = 62"):
        fit_prompt(ids, 63, 64)


# --------------------------------------------------------------------------------------------------
# One error line per CLI
# --------------------------------------------------------------------------------------------------


def _train_main():
    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(REPO_ROOT, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _one_error_line(capsys, rc, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    line = err[-1]
    assert line.startswith("error: ") and "Traceback" not in "\n".join(err), err
    for needle in needles:
        assert needle in line, (needle, line)


def test_every_cli_turns_expected_failures_into_one_error_line(trained, tmp_path, capsys):
    from mhc_jax.aot import main as aot_main
    from mhc_jax.data.tokenizer import main as tokenizer_main
    from mhc_jax.evaluate import main as evaluate_main
    from mhc_jax.generate import main as generate_main

    train = _train_main()
    w = str(tmp_path / "w")
    args = ["--config", "tiny", "--workdir", w, "--no-progress", *BASE]
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n\nencore\n".encode("latin-1"))
    (tmp_path / "empty_dir").mkdir()
    for dataset, needle in [("text:/no/such/path", "does not exist"), (f"text:{tmp_path}/empty.txt", "empty"),
                            (f"text:{tmp_path}/binary.bin", "not valid UTF-8"),
                            (f"text:{tmp_path}/latin1.txt", "not valid UTF-8"),
                            (f"text:{tmp_path}/empty_dir", "holds no (non-hidden) files"),
                            ("tfds:no_such_dataset_xyz", "TFDS has no dataset named")]:
        _one_error_line(capsys, train(args + [f"data.dataset={dataset}"]), needle)
    assert not os.path.exists(os.path.join(w, "config.yaml"))
    # Overrides anywhere among the flags (parse_intermixed_args); the bad value is named.
    _one_error_line(capsys, train(["--config", "tiny", "model.n_heads=3", "--workdir", w, "training.steps=2"]),
                    "model.n_heads=3 is not allowed")
    (tmp_path / "base3.yaml").write_text("base: 3\n")
    _one_error_line(capsys, train(["--config", str(tmp_path / "base3.yaml")]), "base=3", "is not allowed")
    (tmp_path / "dup.yaml").write_text("model:\n  d_model: 32\n  d_model: 64\n")
    _one_error_line(capsys, train(["--config", str(tmp_path / "dup.yaml")]), "'d_model' appears twice",
                    "lines 2 and 3")

    missing = str(tmp_path / "missing")
    _one_error_line(capsys, generate_main(["--workdir", missing]), "does not exist")
    assert not os.path.exists(missing)  # a reader never creates the workdir
    _one_error_line(capsys, evaluate_main(["--workdir", missing]), "does not exist")
    _one_error_line(capsys, generate_main(["--workdir", trained[0], "--step", "5"]),
                    "checkpoint step 5 does not exist", "[2, 4, 6]")
    for flag, value, needle in [("--top-p", "0", "top_p=0.0"), ("--temperature", "nan", "temperature=nan"),
                                ("--top-k", "-1", "top_k=-1"), ("--max-new-tokens", "500", "max_new_tokens=500")]:
        _one_error_line(capsys, generate_main(["--workdir", trained[0], flag, value]), needle)

    broken = copy_of(trained, tmp_path / "broken")
    for step in (2, 4, 6):
        damage.truncate(os.path.join(broken, "checkpoints", str(step)))
    _one_error_line(capsys, generate_main(["--workdir", broken]), "no readable checkpoint")
    _one_error_line(capsys, aot_main(["--config", "tiny", "--topology", "v4:2x2x1", "--set", "model.d_model=3"]),
                    "model.d_model=3")
    _one_error_line(capsys, tokenizer_main(["train", "--dataset", f"text:{PROSE_FILE}", "--vocab-size", "100",
                                            "--out", str(tmp_path / "t.model")]), "vocab_size=100")


def _cmd(workdir, *extra):
    return [sys.executable, os.path.join(REPO_ROOT, "train.py"), "--config", "tiny", "--workdir", str(workdir),
            "--no-progress", *BASE, *extra]


def test_closed_event_loop_posts_are_silenced_and_every_other_unraisable_exception_still_reported(monkeypatch):
    """After a failed async save, TensorStore's threads post to Orbax's closed asyncio loop; CLIs drop
    exactly those unraisable exceptions (the full-disk run below printed 0-14 of them under its one line)."""
    import asyncio
    import gc

    from mhc_jax.cli import _install_unraisable_filter

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    _install_unraisable_filter()
    _install_unraisable_filter()  # idempotent: one filter however many entry points run in a process
    loop = asyncio.new_event_loop()
    loop.close()

    class PostsOnDelete:  # an exception in __del__ goes to sys.unraisablehook, like TensorStore's posts
        def __init__(self, post: Callable[[], object]):
            self.post = post

        def __del__(self):
            self.post()

    def raise_same_message():
        raise RuntimeError("Event loop is closed")

    for post in (lambda: loop.call_soon_threadsafe(print), raise_same_message, lambda: 1 / 0):
        PostsOnDelete(post)
        gc.collect()
    chex.assert_equal([type(u.exc_value) for u in reported], [RuntimeError, ZeroDivisionError])
    assert reported[0].exc_value.args == ("Event loop is closed",)  # not from asyncio: still reported


def test_entry_point_drops_only_expected_failures_from_asyncios_never_retrieved_task_log(caplog):
    """On a full disk an Orbax write task fails with nobody awaiting it, and asyncio logs its traceback when
    the task is collected (seen under the one error line in CI): a CLI drops that record for a disk-full
    error and keeps it for any other."""
    import asyncio
    import errno
    import gc

    from mhc_jax.cli import entry_point

    async def fail(err: Exception):
        raise err

    def never_retrieved(err: Exception) -> None:
        loop = asyncio.new_event_loop()
        task = loop.create_task(fail(err))
        loop.run_until_complete(asyncio.sleep(0))  # the task runs and fails; nobody awaits it
        loop.close()
        del task
        gc.collect()

    @entry_point
    def main(argv=None) -> int:
        never_retrieved(ValueError('RESOURCE_EXHAUSTED: Failed writing "x": No space left on device'))
        never_retrieved(OSError(errno.ENOSPC, "No space left on device"))
        never_retrieved(KeyError("a bug"))
        return 0

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        chex.assert_equal(main([]), 0)
    logged = [r for r in caplog.records if r.name == "asyncio"]
    chex.assert_equal([type(r.exc_info[1]) for r in logged], [KeyError])
    assert "Task exception was never retrieved" in logged[0].getMessage()


def _skip_without_mount_namespaces() -> None:
    """The full-disk tests mount a small tmpfs inside `unshare -rm` (user + mount namespaces)."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -rm` (user + mount namespaces) to mount a small tmpfs")


def test_full_disk_names_the_path_and_the_space_keeps_the_last_checkpoint_and_resumes_once_freed(tmp_path):
    _skip_without_mount_namespaces()
    disk = tmp_path / "disk"
    disk.mkdir()
    w = disk / "w"
    train = " ".join(f"'{a}'" for a in _cmd(w, "training.steps=40", "checkpoint.every=2", "checkpoint.keep=100",
                                                 "checkpoint.async_save=true"))
    # The same command again once the disk has room (a remount to 64 MiB): it resumes from the last good step.
    rerun = f"mount -o remount,size=64m {disk} && {train} > {tmp_path}/again.out 2> {tmp_path}/again.err"
    script = (f"mount -t tmpfs -o size=8000k tmpfs {disk} && {train}; rc=$?; ls {w}/checkpoints; "
              f"echo ---; {rerun}; echo again=$?; ls -a {w}/checkpoints; exit $rc")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    # Our one error line and no traceback: TensorStore's posts to Orbax's closed event loop are silenced by
    # the CLI (test above), Orbax's writer threads still running when the error is raised find their
    # half-written step in place, and anything else, ours above all, fails here.
    ours = re.findall(r"error: no space left on device writing checkpoint step [^\n]*? is kept", proc.stderr)
    assert len(ours) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"to {w}/checkpoints: a checkpoint of this run takes about " in ours[0] and "MiB free" in ours[0]
    last_good = int(re.search(r"the last good checkpoint \(step (\d+)\) is kept", ours[0]).group(1))
    failed, resumed = proc.stdout.split("---")
    kept = [int(s) for s in failed.split() if s.isdigit()]
    assert last_good in kept and max(kept) < 40, failed
    again = (tmp_path / "again.out").read_text()
    assert "again=0" in resumed, (tmp_path / "again.err").read_text()[-3000:]
    assert f"resumed from {w}/checkpoints/{last_good} (step {last_good})" in again, again[-3000:]
    # Orbax removed the half-written step when the run started again; step 40 is complete.
    after = resumed.split()
    assert 40 in [int(s) for s in after if s.isdigit()], resumed
    assert not [s for s in after if "tmp" in s], resumed


def _tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar under `logdir` as TensorBoard itself reads it: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_reads_back_every_finite_scalar_of_metrics_jsonl_across_a_resumed_run(tmp_path):
    rows = [(step, "train", {"loss": 3.0 / (step + 1), "lr": 1e-3 * step, "nonfinite": float("nan"), "tag": "x"})
            for step in range(1, 6)] + [(5, "eval", {"loss": 2.5})]
    first = MetricsWriter(str(tmp_path))
    for row in rows[:3]:
        first.write(*row)
    first.close()
    resumed = MetricsWriter(str(tmp_path))  # a resumed run: a second events file in the same directory
    for row in rows[3:]:
        resumed.write(*row)
    resumed.close()
    got = _tensorboard_scalars(tmp_path / "tensorboard")
    want: dict[str, list[tuple[int, float]]] = {}
    for row in read_metrics(str(tmp_path)):  # what metrics.jsonl holds, finite numbers only
        for k, v in row.items():
            if k not in ("step", "kind", "time") and isinstance(v, float) and np.isfinite(v):
                want.setdefault(f"{row['kind']}/{k}", []).append((row["step"], float(np.float32(v))))
    chex.assert_equal(sorted(got), ["eval/loss", "train/loss", "train/lr"])
    chex.assert_equal(got, want)


def test_a_full_tensorboard_disk_warns_once_and_the_run_goes_on_writing_metrics_jsonl(tmp_path):
    """tensorboardX's SummaryWriter hung here: its writer thread died on ENOSPC and every later add_scalar
    blocked on the thread's full queue (CI: a full-disk run never exited). The mirror now writes in the
    caller's thread, stops with one warning, and metrics.jsonl keeps every row."""
    _skip_without_mount_namespaces()
    (tmp_path / "tensorboard").mkdir()
    writer = ("from mhc_jax.train.metrics import MetricsWriter\n"
              f"w = MetricsWriter({str(tmp_path)!r})\n"
              "for step in range(400):\n"
              "    w.write(step, 'train', {f'value_{i}': step + i / 8 for i in range(16)})\n"
              "w.close()\nprint('closed')\n")
    script = f"mount -t tmpfs -o size=16k tmpfs {tmp_path / 'tensorboard'} && {shlex.quote(sys.executable)} -c " \
             f"{shlex.quote(writer)}; rc=$?; cp -r {tmp_path / 'tensorboard'} {tmp_path / 'copy'}; exit $rc"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert proc.returncode == 0 and "closed" in proc.stdout, proc.stderr[-3000:]
    warnings = re.findall(r"TensorBoard events stop at .*", proc.stderr)
    assert len(warnings) == 1 and "No space left on device" in warnings[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    chex.assert_equal([r["step"] for r in read_metrics(str(tmp_path))], list(range(400)))
    steps = [step for step, _ in _tensorboard_scalars(tmp_path / "copy")["train/value_0"]]
    assert 0 < len(steps) < 400 and steps == list(range(len(steps))), steps  # the rows that fitted, in order


def test_a_second_sigterm_does_not_end_in_a_traceback(tmp_path):
    proc = subprocess.Popen(_cmd(tmp_path, "training.steps=100000", "checkpoint.every=100000",
                                 "training.log_every=1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (os.path.exists(tmp_path / "metrics.jsonl") and os.path.getsize(tmp_path / "metrics.jsonl")):
        assert proc.poll() is None and time.time() - t0 < 300, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert "Re-run the same command to resume" in out
    assert Checkpointer(str(tmp_path / "checkpoints"), tiny().checkpoint).latest_step() is not None
