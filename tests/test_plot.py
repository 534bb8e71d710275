"""Pictures of a run: PNGs of every logged metric at the end of a run and by `python -m mhc_jax.plot`, and
a jax.profiler trace of the steps `training.profile_steps` names."""

import glob
import gzip
import json
import os

import pytest

from mhc_jax.config import ConfigError, load_config
from mhc_jax.plot import main, plot_metrics, series
from mhc_jax.train.loop import run

from conftest import PROSE_FILE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_series_sorts_by_step_and_a_resumed_run_wins():
    rows = [{"step": 2, "kind": "train", "loss": 3.0}, {"step": 1, "kind": "train", "loss": 4.0},
            {"step": 2, "kind": "eval", "loss": 9.0}, {"step": 2, "kind": "train", "loss": 2.5}]
    assert series(rows, "train", "loss") == ([1, 2], [4.0, 2.5])
    assert series(rows, "eval", "loss") == ([2], [9.0])
    assert series(rows, "diagnostics", "composite_fwd_max") == ([], [])


def test_only_logged_metrics_are_plotted(tmp_path):
    rows = [{"step": s, "kind": "train", "loss": 5.0 / s, "lr": 1e-3, "grad_norm": 1.0 / s, "tokens_per_s": 100.0}
            for s in range(1, 6)]
    paths = plot_metrics(rows, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["grad_norm.png", "loss.png", "lr.png", "tokens_per_s.png"]
    for p in paths:
        w, h = png_size(p)
        assert w >= 300 and h >= 200


@pytest.fixture(scope="module")
def mhc_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    cfg = load_config("tiny", ["residual.kind=mhc", "residual.n_streams=2", "training.steps=4", "training.log_every=1",
                               "training.eval_every=2", "training.eval_batches=1", "training.diagnostics_every=2",
                               "training.sample_tokens=0", "training.profile_steps=[2,3]", "checkpoint.every=4", "data.batch_size=8",
                               f"data.dataset=text:{PROSE_FILE}"])
    return workdir, run(cfg, workdir, progress=False)


def test_a_run_ends_with_plots_of_loss_lr_grad_norm_throughput_and_mhc_gains(mhc_run):
    workdir, result = mhc_run
    names = sorted(os.path.basename(p) for p in result.plots)
    assert names == ["grad_norm.png", "loss.png", "lr.png", "mhc_gains.png", "tokens_per_s.png"]
    assert all(os.path.dirname(p) == os.path.join(workdir, "plots") for p in result.plots)
    for p in result.plots:
        png_size(p)


def test_plot_command_redraws_the_plots_of_a_workdir(mhc_run, capsys):
    workdir, result = mhc_run
    for p in result.plots:
        os.remove(p)
    assert main(["--workdir", workdir]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(result.plots) and all(os.path.isfile(p) for p in printed)


def test_profile_steps_write_a_trace_of_the_train_step(mhc_run):
    workdir, _ = mhc_run
    traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.trace.json.gz"))
    assert len(traces) == 1, os.listdir(workdir)
    with gzip.open(traces[0]) as f:
        events = json.load(f)["traceEvents"]
    names = {e.get("name", "") for e in events}
    # The jitted train step ran (and was traced) while the profiler was on.
    assert any("step" in n for n in names), sorted(names)[:50]


def test_plot_command_on_a_folder_without_metrics_is_an_error(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("steps", ["[3]", "[0,2]", "[4,2]", "[1,2,3]"])
def test_bad_profile_steps_are_rejected_naming_the_rule(steps):
    with pytest.raises(ConfigError, match=r"training.profile_steps=.*\[first, last\]"):
        load_config("tiny", [f"training.profile_steps={steps}"])
