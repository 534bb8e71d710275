"""The README is the manual: its config reference is generated from the schema, and its test command is
the one CI runs."""

import dataclasses
import os
import re
import typing

from mhc_jax.config import Config, field_docs, reference_markdown

from conftest import REPO_ROOT


def _read(name: str) -> str:
    with open(os.path.join(REPO_ROOT, name)) as f:
        return f.read()


def test_readme_config_reference_matches_the_schema():
    readme = _read("README.md")
    m = re.search(r"<!-- config-reference:start -->\n(.*?)<!-- config-reference:end -->", readme, re.S)
    assert m, "README.md lacks the config-reference markers"
    assert m.group(1) == reference_markdown(), (
        "README config reference is stale: regenerate it with `python -m mhc_jax.config`")


def test_every_config_field_has_a_description_in_the_reference():
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        docs = field_docs(hints[section.name])
        assert list(docs) == [f.name for f in dataclasses.fields(hints[section.name])]
        missing = [name for name, doc in docs.items() if not doc]
        assert not missing, f"config fields of '{section.name}' without a comment (the comment is the doc): {missing}"
    assert "| `model.d_model` | int | `128` | C: residual stream width |" in reference_markdown()


def test_ci_runs_the_readme_test_command():
    readme, ci = _read("README.md"), _read(".ci/run")
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    test_cmd = next(b.strip() for b in blocks if "pytest" in b)
    assert test_cmd in ci, f"README's test command {test_cmd!r} is not what .ci/run runs"
    main_cmd = next(b.strip() for b in blocks if "train.py" in b)
    assert main_cmd == "pip install -e . && python train.py"
