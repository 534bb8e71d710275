"""A user who clones the project alone can run the README's test command: no test reads files beside the
checkout except through conftest's `shakespeare_path` fixture (which skips when they are absent), and CI
runs the real-text tests from a copy of the checkout with nothing beside it."""

import os
import re

from conftest import REPO_ROOT, SHAKESPEARE, stdlib_prose

TESTS = os.path.join(REPO_ROOT, "tests")


def test_only_conftest_names_files_beside_the_checkout():
    offenders = []
    for name in sorted(os.listdir(TESTS)):
        if not name.endswith(".py") or name in ("conftest.py", os.path.basename(__file__)):
            continue
        with open(os.path.join(TESTS, name), encoding="utf-8") as f:
            text = f.read()
        if re.search(r"tinyshakespeare\.txt|[\"'/]shared[\"'/]|\bSHAKESPEARE\b", text):
            offenders.append(name)
    assert not offenders, f"{offenders} read ../shared directly: use conftest's stdlib_prose / prose_path, " \
                          "or the shakespeare_path fixture (it skips when the file is absent)"


def test_shakespeare_fixture_skips_with_a_reason_instead_of_failing():
    with open(os.path.join(TESTS, "conftest.py"), encoding="utf-8") as f:
        conftest = f.read()
    body = conftest.split("def shakespeare_path", 1)[1]
    assert "pytest.skip(" in body and "pytest.fail(" not in body
    assert SHAKESPEARE.endswith(os.path.join("shared", "data", "tinyshakespeare.txt"))


def test_stdlib_prose_is_real_english_text_present_offline():
    text = stdlib_prose()
    assert len(text) > 300_000
    words = re.findall(r"[a-z]+", text.lower())
    # Frequent English function words: prose, not code.
    assert {"the", "of", "is", "and", "a"} <= {w for w in words[:2000]}
    assert stdlib_prose(1000) == text[:1000]


def test_ci_runs_real_text_tests_from_a_bare_copy_of_the_checkout():
    with open(os.path.join(REPO_ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    assert "git clone" in ci and "mktemp -d" in ci
    bare_job = ci.split("git clone", 1)[1]
    for name in ("test_datasets.py", "test_data_pipeline.py", "test_tokenizer.py", "test_train.py"):
        assert f"tests/{name}" in bare_job
