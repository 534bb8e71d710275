"""The config schema: YAML loading, base inheritance, overrides, and clear errors for bad input."""

import os

import pytest

from mhc_jax.config import Config, ConfigError, load_config, parse_override, save_config, to_dict


def test_defaults_validate_and_round_trip_through_yaml(tmp_path):
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    path = tmp_path / "c.yaml"
    save_config(cfg, str(path))
    assert load_config(str(path)) == cfg


def test_base_config_is_extended_and_overridden(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {d_model: 64, n_heads: 4}\nresidual: {kind: mhc}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel: {n_layers: 3}\n")
    cfg = load_config(str(tmp_path / "child.yaml"), ["model.n_layers=5", "optimizer.lr=3e-4"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.residual.kind) == (64, 5, "mhc")
    assert cfg.optimizer.lr == pytest.approx(3e-4)


def test_override_values_are_parsed_as_yaml():
    assert parse_override("engram.layers=[0, 2]") == {"engram": {"layers": [0, 2]}}
    assert parse_override("model.tie_embeddings=false") == {"model": {"tie_embeddings": False}}
    cfg = load_config(None, ["engram.enabled=true", "engram.layers=[0,2]"])
    assert cfg.engram.layers == (0, 2)


def test_every_shipped_config_loads():
    config_dir = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
    names = [os.path.join(root, f) for root, _, files in os.walk(config_dir) for f in files if f.endswith(".yaml")]
    assert names
    for name in names:
        load_config(name)


@pytest.mark.parametrize("overrides, message", [
    (["model.d_modle=3"], "unknown key model.d_modle"),
    (["modle.d_model=3"], "unknown key modle"),
    (["model.d_model=abc"], "model.d_model='abc' has the wrong type: expected an integer"),
    (["model.d_model=1.5"], "expected an integer"),
    (["model.tie_embeddings=3"], "expected true or false"),
    (["model.n_heads=3"], "model.n_heads=3 is not allowed: must divide model.d_model=128"),
    (["model.n_kv_heads=3"], "model.n_kv_heads=3 is not allowed: must divide model.n_heads=4"),
    (["residual.n_streams=0"], "residual.n_streams=0 is not allowed: must be >= 1"),
    (["model.scan_unroll=0"], "model.scan_unroll=0 is not allowed: must be >= 1"),
    (["residual.kind=mhx"], "residual.kind='mhx' is not allowed: must be one of 'plain', 'hc', 'mhc', 'mhc_lite'"),
    (["engram.enabled=true", "engram.layers=[7]"], "engram.layers=(7,) is not allowed: block indices must be in [0, model.n_layers=4)"),
    (["data.seq_len=1024"], "data.seq_len=1024 is not allowed: must be <= model.max_seq_len=256"),
    (["training.grad_accum=3"], "training.grad_accum=3 is not allowed: must divide data.batch_size=16"),
    (["optimizer.b2=1.0"], "optimizer.b2=1.0 is not allowed: must be in [0, 1)"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "at most one axis may be -1"),
    (["data.dataset=imagenet"], "data.dataset='imagenet' is not allowed"),
    (["model.n_layers"], "must look like section.key=value"),
    (["optimizer.lr=1e400"], "optimizer.lr=inf is not allowed: must be a finite number"),
    (["optimizer.lr=.nan"], "optimizer.lr=nan is not allowed: must be a finite number"),
    (["engram.shard_axis=rows"], "engram.shard_axis='rows' is not allowed: must be 'auto' or one of ('dcn_data'"),
])
def test_bad_config_fails_at_load_with_a_message_naming_key_and_value(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_missing_config_file_lists_the_available_ones():
    with pytest.raises(ConfigError, match="does not exist; give a path or one of: .*tiny"):
        load_config("no_such_config.yaml")


def test_cyclic_base_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(str(tmp_path / "a.yaml"))


def test_replace_returns_a_validated_copy():
    cfg = load_config(None)
    assert cfg.replace(model={"n_layers": 2}).model.n_layers == 2
    assert to_dict(cfg)["model"]["n_layers"] == cfg.model.n_layers
    with pytest.raises(ConfigError):
        cfg.replace(model={"n_layers": 0})


def test_duplicate_keys_and_a_base_that_is_not_a_path_are_refused(tmp_path):
    (tmp_path / "dup.yaml").write_text("model: {d_model: 64}\ntraining:\n  steps: 2\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"key 'steps' appears twice in one mapping \(lines 3 and 4"):
        load_config(str(tmp_path / "dup.yaml"))
    (tmp_path / "base.yaml").write_text("base: 3\n")
    with pytest.raises(ConfigError, match="base=3 in .* is not allowed: must be the path"):
        load_config(str(tmp_path / "base.yaml"))
    (tmp_path / "bytes.yaml").write_bytes(b"model: {d_model: \xff}\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(tmp_path / "bytes.yaml"))
