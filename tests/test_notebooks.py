"""The notebooks in notebooks/ run top to bottom (smoke settings) and are committed without outputs."""

from __future__ import annotations

import glob
import os

import nbformat
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO_ROOT, "notebooks", "*.ipynb")))
NAMES = [os.path.basename(p) for p in NOTEBOOKS]
EXPECTED = ["01_quickstart.ipynb", "02_mhc_stability.ipynb", "03_engram.ipynb"]


def test_expected_notebooks_exist() -> None:
    assert NAMES == EXPECTED


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
