"""Soak: train.py is SIGKILLed at random moments (async checkpoints in flight), the newest checkpoint is
damaged at random between runs (truncated, metadata deleted, bytes flipped), and the run is restarted
until it finishes; its final parameters must equal an uninterrupted run's bitwise, or the test names the
first step where the two runs' losses diverged.

It is the suite's SIGKILL-and-rerun test: the CI version kills twice and damages once; `pytest -m slow tests/test_soak.py` runs the long version
(SOAK_KILLS kills, default 20; SOAK_JSON=path writes its figures).
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import damage
from conftest import PROSE_FILE, REPO_ROOT
from mhc_jax.config import load_config
from mhc_jax.train.loop import run
from mhc_jax.train.metrics import read_metrics
from mhc_jax.train.state import load_model_from_workdir

ARGS = ["data.batch_size=8", "training.sample_tokens=0", "training.diagnostics_every=0",
        f"data.dataset=text:{PROSE_FILE}", "training.peak_flops=1e12", "training.eval_every=100000",
        "training.log_every=1", "checkpoint.every=2", "checkpoint.keep=3", "checkpoint.async_save=true"]


def _rows(workdir: str) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if '"kind": "train"' in line)


def _losses(workdir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir, "train")}  # later rows win (resumed runs)


def _launch(workdir: str, steps: int) -> subprocess.Popen:
    cmd = [sys.executable, os.path.join(REPO_ROOT, "train.py"), "--config", "tiny", "--workdir", workdir,
           "--no-progress", *ARGS, f"training.steps={steps}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def soak(root: str, *, steps: int, kills: int, damage_prob: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    reference = os.path.join(root, "reference")
    run(load_config("tiny", ARGS + [f"training.steps={steps}"]), reference, progress=False)
    workdir = os.path.join(root, "soaked")
    figures = {"kills": 0, "damaged": {}, "restarts_without_a_readable_checkpoint": 0, "launches": 0}
    while figures["launches"] < kills * 4 + 4:
        figures["launches"] += 1
        killing = figures["kills"] < kills
        proc = _launch(workdir, steps)
        if killing:
            # Kill after a random number of new steps plus a random delay (often mid async save).
            target = _rows(workdir) + int(rng.integers(1, 6))
            while proc.poll() is None and _rows(workdir) < target:
                time.sleep(0.05)
            time.sleep(float(rng.uniform(0, 0.3)))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                figures["kills"] += 1
        out, err = proc.communicate(timeout=600)
        if proc.returncode == 0:
            break
        if proc.returncode == 2 and "no readable checkpoint" in err:
            figures["restarts_without_a_readable_checkpoint"] += 1  # all moved aside: the rerun starts at 0
            continue
        assert proc.returncode == -signal.SIGKILL, f"train.py failed (rc {proc.returncode}):\n{err[-3000:]}"
        steps_on_disk = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                               if s.isdigit()) if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
        if steps_on_disk and rng.random() < damage_prob:
            kind = str(rng.choice(sorted(damage.KINDS)))
            damage.KINDS[kind](os.path.join(workdir, "checkpoints", str(steps_on_disk[-1])), rng)
            figures["damaged"][kind] = figures["damaged"].get(kind, 0) + 1
    else:
        raise AssertionError(f"the soaked run did not finish after {figures['launches']} launches: {figures}")

    fallbacks = read_metrics(workdir, "checkpoint_fallback")
    figures["fallbacks_logged"] = len(fallbacks)
    want, got = _losses(reference), _losses(workdir)
    diverged = [s for s in sorted(want) if got.get(s) != want[s]]
    assert not diverged, f"losses diverge from the uninterrupted run at step {diverged[0]} ({figures})"
    _, ref_model, ref_step = load_model_from_workdir(reference)
    _, model, step = load_model_from_workdir(workdir)
    assert step == ref_step == steps
    from flax import nnx
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(ref_model))),
                                 jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model)))):
        assert np.array_equal(np.asarray(a), np.asarray(b)), f"final parameter {jax.tree_util.keystr(path)} differs"
    assert figures["fallbacks_logged"] >= sum(figures["damaged"].values()), figures  # every damage was caught
    return figures


def test_soak_short(tmp_path):
    figures = soak(str(tmp_path), steps=30, kills=2, damage_prob=1.0, seed=0)
    print("soak:", json.dumps(figures))
    assert figures["kills"] == 2 and sum(figures["damaged"].values()) >= 1


@pytest.mark.slow
def test_soak_long(tmp_path, request):
    if "slow" not in (request.config.option.markexpr or "") and "SOAK_KILLS" not in os.environ:
        pytest.skip("the long soak runs only when asked for: pytest -m slow tests/test_soak.py (or SOAK_KILLS=N)")
    kills = int(os.environ.get("SOAK_KILLS", "20"))
    figures = soak(str(tmp_path), steps=10 * kills, kills=kills, damage_prob=0.5, seed=int(os.environ.get("SOAK_SEED", "1")))
    print("soak:", json.dumps(figures))
    out = os.environ.get("SOAK_JSON")
    if out:
        with open(out, "w") as f:
            json.dump(figures, f, indent=2)
    assert figures["kills"] == kills
