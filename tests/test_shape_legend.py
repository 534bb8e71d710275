"""The shape legend (mhc_jax.model's docstring) declares each letter once, and every shape-suffixed name in
the package (`x_BTnC`, `engram_ids_BTEG`, ...) uses only declared letters."""

from __future__ import annotations

import os
import re

import mhc_jax.model

from conftest import REPO_ROOT

ENTRY = re.compile(r"(?:^|\s{2,})([A-Za-z1])  (?=\S)")  # "    B  batch rows      T  time: ..."
SHAPED_NAME = re.compile(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)*_((?=[a-z1]*[A-Z])[A-Za-z1]+)\b")  # a suffix with a capital


def legend_letters() -> list[str]:
    doc = mhc_jax.model.__doc__
    table = doc[doc.index("Shape legend"):]
    return [m.group(1) for line in table.splitlines()[1:] if line.startswith("    ") for m in ENTRY.finditer(line)]


def test_legend_declares_each_letter_once():
    letters = legend_letters()
    assert len(letters) >= 20, letters
    assert len(letters) == len(set(letters)), sorted(letters)


def test_every_shape_suffix_in_the_package_uses_declared_letters():
    declared = set(legend_letters())
    undeclared = []
    for folder, _, files in os.walk(os.path.join(REPO_ROOT, "mhc_jax")):
        for name in (f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            with open(path) as f:
                for i, line in enumerate(f, 1):
                    for m in SHAPED_NAME.finditer(line):
                        if not set(m.group(1)) <= declared:
                            undeclared.append(f"{os.path.relpath(path, REPO_ROOT)}:{i} {m.group(0)}")
    assert not undeclared, "shape letters missing from the legend in mhc_jax/model/__init__.py:\n" + \
        "\n".join(undeclared)
