"""Sparse host Engram tables on several processes (2 processes x 4 fake CPU devices over localhost/gloo,
tests/multiprocess_harness.py): each process holds only its row range of every table and of the row
moments, the batch's rows are exchanged between the processes every step, and the run equals the
1-process 8-device run of the same config and mesh: losses, final tables and moments, and a resume from
a checkpoint each process wrote its range of."""

from __future__ import annotations

import os
import re
import shutil
import sys

import numpy as np

from mhc_jax.config import load_config
from mhc_jax.train.checkpoint import Checkpointer
from mhc_jax.train.loop import run
from mhc_jax.train.metrics import read_metrics
from mhc_jax.train.sparse_rows import load_tables

from conftest import REPO_ROOT
from multiprocess_harness import N_PROCESSES, spawn, wait

STEPS = 6
# The tiny model on the embedded corpus, one sparse Engram layer of 4 heads (512 table rows), the
# (data=2, fsdp=4) mesh over both processes' devices, a checkpoint at step 3.
ARGS = ["data.batch_size=8", "data.corpus_max_mb=1", "mesh.data=2", "mesh.fsdp=4", f"training.steps={STEPS}",
        "training.log_every=1", "training.eval_every=100", "training.sample_tokens=4", "checkpoint.every=3",
        "checkpoint.keep=3", "engram.enabled=true", "engram.layers=[1]", "engram.heads_per_ngram=2",
        "engram.head_dim=8", "engram.table_size=97", "engram.placement=host"]


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir), "train")}  # later rows win (resumed runs)


def _final_tables(workdir, cfg):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint)
    try:
        return load_tables(ckpt, cfg, STEPS).state_dict()
    finally:
        ckpt.close()


def _assert_same_run(workdir, ref_losses, ref_tables, cfg):
    losses = _losses(workdir)
    assert sorted(losses) == sorted(ref_losses) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [ref_losses[s] for s in sorted(ref_losses)],
                               rtol=0, atol=1e-6)
    got = _final_tables(workdir, cfg)  # both processes' ranges, read back on this one process
    assert int(got["count"]) == int(ref_tables["count"]) == STEPS
    # The mesh's reductions run over gloo in another order, so gradients differ in the last bits, which
    # Adam's m / sqrt(v) can magnify (measured: 1.1e-6 on one of 4096 values); rows no step touched
    # (zero moments) hold their initial values bitwise: each process initialised its range alone.
    untouched = np.all(ref_tables["layer_1"]["nu"] == 0, axis=1)
    assert 0 < untouched.sum() < untouched.size
    np.testing.assert_array_equal(got["layer_1"]["table"][untouched], ref_tables["layer_1"]["table"][untouched])
    for name in ("table", "mu", "nu"):
        np.testing.assert_allclose(got["layer_1"][name], ref_tables["layer_1"][name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    return got


def test_two_processes_own_half_the_rows_each_and_train_and_resume_like_one_process(tmp_path):
    cfg = load_config("tiny", ARGS)
    assert cfg.engram.sparse
    reference = tmp_path / "reference"
    run(cfg, str(reference), progress=False)  # this process, 8 devices, the same mesh
    ref_losses, ref_tables = _losses(reference), _final_tables(reference, cfg)
    rows = ref_tables["layer_1"]["table"].shape[0]

    workdir = tmp_path / "multi"
    cmd = [sys.executable, os.path.join(REPO_ROOT, "train.py"), "--config", "tiny", "--workdir", str(workdir),
           "--no-progress", *ARGS]
    outs = wait(spawn(cmd, str(tmp_path), "train"))
    half = rows // N_PROCESSES
    for i, out in enumerate(outs):  # each process holds its own half of the rows, tables and moments
        held = re.search(rf"process {i}: Engram host tables hold rows \[(\d+), (\d+)\) of \[{rows}\] \((\d+) bytes",
                         out)
        assert held, out[-3000:]
        assert (int(held[1]), int(held[2])) == (i * half, (i + 1) * half)
        assert int(held[3]) == 3 * half * cfg.engram.head_dim * 4
    first = _assert_same_run(workdir, ref_losses, ref_tables, cfg)
    assert re.search(r"sample digest (\w+)", outs[1])[1] in outs[0]  # generation read rows from both processes

    # Resume from step 3's checkpoint (each process restores its own range, moments and step count).
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))
    outs = wait(spawn(cmd + ["training.sample_tokens=0"], str(tmp_path), "resumed"))
    assert "resumed from" in outs[0] and f"(step {STEPS // 2})" in outs[0]
    again = _assert_same_run(workdir, ref_losses, ref_tables, cfg)
    for name in ("table", "mu", "nu"):  # the resumed 2-process run is the uninterrupted one, bitwise
        np.testing.assert_array_equal(again["layer_1"][name], first["layer_1"][name], err_msg=name)


def test_row_ranges_partition_the_table_and_initialise_as_one_process():
    """Each of P processes holds rows [p c, (p + 1) c), c = ceil(rows / P), initialised alone to exactly
    the rows one process holds (init blocks are seeded independently), for P dividing the rows or not."""
    from mhc_jax.engram.host_tables import HostTables
    from mhc_jax.train.optimizer import engram_adam

    cfg = load_config("tiny", ARGS + ["engram.table_size=40000", "engram.layers=[0,1]"])  # > one init block
    whole = HostTables(cfg.engram, engram_adam(cfg), seed=3, process_index=0, process_count=1)
    for P in (2, 3):
        parts = [HostTables(cfg.engram, engram_adam(cfg), seed=3, process_index=p, process_count=P) for p in range(P)]
        for l, rows in enumerate(whole.n_rows):
            assert [(t.lo[l], t.hi[l]) for t in parts] == [(p * -(-rows // P), min(rows, (p + 1) * -(-rows // P)))
                                                           for p in range(P)]
            joined = np.concatenate([t.tables[l][:t.hi[l] - t.lo[l]] for t in parts])
            np.testing.assert_array_equal(joined, whole.tables[l])
        pad = 3 * 4 * cfg.engram.head_dim * len(whole.layers)  # at most one padding row per layer
        assert all(whole.nbytes / P <= t.nbytes <= whole.nbytes / P + pad for t in parts)
