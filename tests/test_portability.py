"""The checkout runs anywhere: no committed source, config, notebook or result names a machine's folders."""

from __future__ import annotations

import os
import re

from conftest import REPO_ROOT

# Home and work folders of the machines this project was developed on; /tmp is fine in a usage example
# (train.py, README) but not in a recorded result.
MACHINE_PATH = re.compile(r"""["'\s(=:](/work/|/home/|/Users/|/root/)""")
RESULT_PATH = re.compile(r"""["'\s(=:](/work/|/home/|/Users/|/root/|/tmp/)""")
CHECKED = (".py", ".json", ".yaml", ".toml", ".ipynb")


def test_no_absolute_machine_paths_in_committed_files():
    hits = []
    for folder, dirs, files in os.walk(REPO_ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "workdir", "runs")]
        for name in files:
            if not name.endswith(CHECKED) or name == os.path.basename(__file__):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8", errors="replace") as f:
                for i, line in enumerate(f, 1):
                    if (RESULT_PATH if name.endswith(".json") else MACHINE_PATH).search(line):
                        hits.append(f"{os.path.relpath(path, REPO_ROOT)}:{i}: {line.strip()[:120]}")
    assert not hits, "absolute machine paths (use paths relative to the repository):\n" + "\n".join(hits)
