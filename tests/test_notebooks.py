"""The notebooks in notebooks/ are built from plain-text (jupytext percent-format) sources, state their run
time up front, pick their size from the backend, run top to bottom (smoke settings) and are committed
without outputs."""

from __future__ import annotations

import glob
import importlib.util
import os
import re

import nbformat
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO_ROOT, "notebooks", "*.ipynb")))
NAMES = [os.path.basename(p) for p in NOTEBOOKS]
EXPECTED = ["01_quickstart.ipynb", "02_mhc_stability.ipynb", "03_engram.ipynb"]


def test_expected_notebooks_exist() -> None:
    assert NAMES == EXPECTED


def _build_module():
    spec = importlib.util.spec_from_file_location("notebooks_build", os.path.join(REPO_ROOT, "notebooks", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_notebook_is_exactly_what_its_percent_format_source_builds() -> None:
    build = _build_module()
    assert [os.path.basename(p)[:-3] + ".ipynb" for p in build.sources()] == EXPECTED
    for src in build.sources():
        built = build.build(src)
        committed = nbformat.read(src[:-3] + ".ipynb", as_version=4)
        assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in built.cells], (
            f"{os.path.basename(src)[:-3]}.ipynb is stale: edit the .py source and run python notebooks/_build.py")
        assert built.cells[0].cell_type == "markdown"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_states_its_run_time_and_sizes_itself_by_backend(name: str) -> None:
    nb = nbformat.read(os.path.join(REPO_ROOT, "notebooks", name), as_version=4)
    intro, setup = nb.cells[0].source, nb.cells[1].source
    assert "**Run time.**" in intro
    minutes = {m.group(1): int(m.group(2)) for m in re.finditer(r"\| (smoke|cpu|full): [^|]*\| (\d+) min \|", intro)}
    assert set(minutes) == {"smoke", "cpu", "full"} and minutes["cpu"] <= 5, minutes  # CPU: a few minutes
    assert f"RUN_MINUTES = {{\"smoke\": {minutes['smoke']}, \"cpu\": {minutes['cpu']}, \"full\": {minutes['full']}}}" in setup
    assert 'jax.default_backend() == "cpu"' in setup and "print(f\"{SIZE} settings" in setup


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_outputs(name: str) -> None:
    nb = nbformat.read(os.path.join(REPO_ROOT, "notebooks", name), as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{name}: cells {dirty} hold outputs or execution counts; strip them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes_without_error(name: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient import NotebookClient

    # The kernel inherits this environment: smoke sizes, CPU, and one device like a user's machine (the
    # test process itself has 8 fake devices, which the notebooks' batch sizes need not divide).
    monkeypatch.setenv("MHC_JAX_SMOKE", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "")
    nb = nbformat.read(os.path.join(REPO_ROOT, "notebooks", name), as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    ran = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in ran), "not every code cell ran"
