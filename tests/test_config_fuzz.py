"""Fuzzing the config loader (hypothesis): every random override list or YAML file either loads into a
valid Config or raises the project's ConfigError; never another exception."""

import dataclasses
import typing

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mhc_jax.config import Config, ConfigError, load_config, to_dict

SECTIONS = {f.name: [g.name for g in dataclasses.fields(typing.get_type_hints(Config)[f.name])]
            for f in dataclasses.fields(Config)}
KEYS = [f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks]

# Value texts a user could type: YAML scalars of every kind, lists, edge numbers, and random text.
edge_values = st.sampled_from(["0", "-1", "1", "2", "3", "1e400", "-1e400", ".nan", ".inf", "-.inf", "1e-3",
                               "1.5", "true", "false", "null", "~", "yes", "[]", "[1, 2]", "[[1]]", "{a: 1}",
                               "'quoted'", "plain", "2024-01-01", "!!python/object:os.system", "&a [*a]",
                               "0x10", "0o7", "1_000", "", " ", "[1, 'x']", "[-1]", "9" * 40, "'", "[", "{"])
values = st.one_of(edge_values, st.integers(-10**20, 10**20).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=20))
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(list(SECTIONS)).map(lambda s: s + ".nope"),
                 st.text(max_size=15))
overrides = st.lists(st.tuples(keys, values).map(lambda kv: f"{kv[0]}={kv[1]}") | st.text(max_size=20), max_size=6)

CASES = {"overrides": 0, "files": 0}


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides)
def test_random_overrides_load_or_raise_config_error(items):
    CASES["overrides"] += 1
    try:
        cfg = load_config("tiny", items)
    except ConfigError:
        return
    assert isinstance(cfg, Config)
    assert load_config(None, [f"{s}.{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                              for s, sec in to_dict(cfg).items() for k, v in sec.items()
                              if not isinstance(v, str)]) is not None  # what loads is valid again


yaml_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**30), st.floats(), st.text(max_size=10),
                      st.lists(st.integers(-3, 5), max_size=3))
yaml_docs = st.one_of(
    st.dictionaries(st.sampled_from(list(SECTIONS) + ["base", "extra", "1"]),
                    st.one_of(yaml_leaf, st.dictionaries(st.sampled_from(KEYS + ["x"]).map(lambda k: k.split(".")[-1]),
                                                         yaml_leaf, max_size=4)), max_size=4)
    .map(lambda d: yaml.safe_dump(d).encode()),
    st.text(max_size=80).map(str.encode),
    st.binary(max_size=40),  # mostly not UTF-8
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(yaml_docs)
def test_random_yaml_files_load_or_raise_config_error(tmp_path, data):
    CASES["files"] += 1
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(data)
    try:
        cfg = load_config(str(path))
    except ConfigError:
        return
    assert isinstance(cfg, Config)


def test_fuzz_case_counts():
    """Runs after the two fuzz tests (file order): reports how many cases ran (the README quotes them)."""
    print(f"config fuzz cases: {CASES['overrides']} override lists, {CASES['files']} YAML files")
