"""Writes the notebooks in this folder (outputs stripped) from their plain-text sources: the jupytext
percent-format scripts beside them (`01_quickstart.py` -> `01_quickstart.ipynb`).

    python notebooks/_build.py

Edit the `.py` sources (any editor; `jupytext` opens them as notebooks too), never the `.ipynb`:
tests/test_notebooks.py checks that each notebook is exactly what its source builds. In a source, cells
start at lines `# %% [markdown]` (a markdown cell: its lines are comments) or `# %%` (a code cell); the
YAML header before the first cell is jupytext's and is not a cell.
"""

from __future__ import annotations

import glob
import os

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))


def sources() -> list[str]:
    """The notebook sources, NN_name.py, in order."""
    return sorted(glob.glob(os.path.join(HERE, "[0-9][0-9]_*.py")))


def cells(source: str) -> list:
    out = []
    for chunk in source.split("\n# %%")[1:]:
        kind, _, body = chunk.partition("\n")
        body = body.strip("\n")
        if kind.strip() == "[markdown]":
            text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())
            out.append(nbformat.v4.new_markdown_cell(text))
        else:
            out.append(nbformat.v4.new_code_cell(body))
    return out


def build(source_path: str) -> nbformat.NotebookNode:
    """The notebook (no outputs, stable cell ids) that the percent-format source at `source_path` describes."""
    name = os.path.basename(source_path)
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"},
                   "accelerator": "GPU", "colab": {"provenance": []}}
    with open(source_path, encoding="utf-8") as f:
        nb.cells = cells(f.read())
    for i, c in enumerate(nb.cells):
        c.id = f"{name[:2]}-{i:02d}"  # stable ids: rebuilding gives the same file
    nbformat.validate(nb)
    return nb


def write(source_path: str) -> str:
    path = source_path[:-3] + ".ipynb"
    with open(path, "w", encoding="utf-8") as f:
        nbformat.write(build(source_path), f)
    return path


if __name__ == "__main__":
    for src in sources():
        print(write(src))
