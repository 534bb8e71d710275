"""Portable checkpoints: a trained workdir exported as safetensors + config + tokenizer, and rebuilt from
those files alone with bit-identical logits (mHC coefficients, Engram tables on the host included)."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from mhc_jax.config import load_config
from mhc_jax.data.tokenizer import train_sentencepiece
from mhc_jax.engram.ids import EngramIds
from mhc_jax.engram.layer import host_memory_supported
from mhc_jax.errors import CheckpointError
from mhc_jax.export import Exported, export_model, load, main, model_tensors
from mhc_jax.model import Transformer
from mhc_jax.sharding import make_mesh
from mhc_jax.sampling import generate
from mhc_jax.train.loop import run
from mhc_jax.train.sparse_rows import tables_from_workdir
from mhc_jax.train.state import load_model_from_workdir

from conftest import PROSE_FILE, stdlib_prose

MHC_ENGRAM = ["residual.kind=mhc", "residual.n_streams=2", "engram.enabled=true", "engram.layers=[1]",
              "engram.table_size=509", "engram.heads_per_ngram=2", "training.steps=2", "training.eval_every=2", "training.eval_batches=1", "training.sample_tokens=0",
              "training.diagnostics_every=0", "checkpoint.every=2", "data.batch_size=8", f"data.dataset=text:{PROSE_FILE}"]


def logits_of(model, tokenizer, text: str) -> np.ndarray:
    ids = np.asarray([[tokenizer.bos_id] + tokenizer.encode(text)], np.int32)
    engram = None
    if model.cfg.engram.enabled:
        engram = jnp.asarray(EngramIds(model.cfg.engram, tokenizer)(ids))
    return np.asarray(nnx.jit(lambda m, t, e: m(t, engram_ids_BTEG=e))(model, jnp.asarray(ids), engram))


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    placement = "host" if host_memory_supported() else "device"
    workdir = str(tmp_path_factory.mktemp("run"))
    # update=dense: the offloaded dense table, a model parameter (sparse host tables: the test below)
    run(load_config("tiny", MHC_ENGRAM + [f"engram.placement={placement}", "engram.update=dense"]), workdir, progress=False)
    return workdir


def test_export_then_load_gives_bitwise_equal_logits(trained_workdir, tmp_path):
    out = str(tmp_path / "export")
    assert main(["--workdir", trained_workdir, "--out", out]) == 0
    cfg, original, step = load_model_from_workdir(trained_workdir)
    loaded = load(out)
    assert isinstance(loaded, Exported) and loaded.step == step == 2
    text = "def main(argv):\n    return 0\n"
    chex.assert_trees_all_equal(logits_of(loaded.model, loaded.tokenizer, text),
                                logits_of(original, loaded.tokenizer, text))
    # Every variable comes back with its value, dtype and placement (host-resident tables stay on the host).
    a, b = nnx.state(original), nnx.state(loaded.model)
    chex.assert_trees_all_equal(jax.device_get(a), jax.device_get(b))
    kinds = lambda s: [x.sharding.memory_kind for x in jax.tree.leaves(s)]  # noqa: E731
    assert kinds(a) == kinds(b)


def test_sparse_host_tables_export_under_the_table_names_and_load_back_bitwise(tmp_path):
    """engram.update=sparse: the host tables (not model parameters) are written as blocks.i.engram.table
    and `load` returns them in host RAM: tables, every model variable and greedy generation are bitwise
    the original's."""
    workdir, out = str(tmp_path / "run"), str(tmp_path / "export")
    run(load_config("tiny", MHC_ENGRAM + ["engram.placement=host", "engram.update=sparse"]), workdir, progress=False)
    assert main(["--workdir", workdir, "--out", out]) == 0
    cfg, original, step = load_model_from_workdir(workdir)
    tables = tables_from_workdir(workdir, cfg, step)
    assert cfg.engram.sparse and tables is not None and tables.count == step == 2
    loaded = load(out)
    assert loaded.engram_tables is not None and loaded.engram_tables.layers == tables.layers == (1,)
    for got, want in zip(loaded.engram_tables.tables, tables.tables):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(load_file(os.path.join(out, "model.safetensors"))["blocks.1.engram.table"],
                                  tables.tables[0])
    manifest = json.load(open(os.path.join(out, "export.json")))
    assert manifest["tensors"]["blocks.1.engram.table"]["axes"] == ["engram_rows", "engram_mem"]
    chex.assert_trees_all_equal(jax.device_get(nnx.state(original)), jax.device_get(nnx.state(loaded.model)))
    ids = EngramIds(cfg.engram, loaded.tokenizer)
    prompt = [loaded.tokenizer.bos_id] + loaded.tokenizer.encode("def f(x):")
    assert (generate(loaded.model, prompt, 8, engram_ids=ids, engram_tables=loaded.engram_tables)
            == generate(original, prompt, 8, engram_ids=ids, engram_tables=tables))
    with pytest.raises(CheckpointError, match="pass engram_tables"):
        export_model(cfg, original, str(tmp_path / "no_tables"))


def test_safetensors_file_holds_every_mhc_and_engram_tensor_under_documented_names(trained_workdir, tmp_path):
    out = str(tmp_path / "export")
    main(["--workdir", trained_workdir, "--out", out])
    tensors = load_file(os.path.join(out, "model.safetensors"))
    _, model, _ = load_model_from_workdir(trained_workdir)
    expected, info = model_tensors(model)
    assert set(tensors) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)
    names = set(tensors)
    assert {"embed_VC", "final_norm.scale", "blocks.0.attn.wq_CHD", "blocks.1.mlp.w_down_FC"} <= names
    for i in (0, 1):  # mHC coefficients of both sublayers of every block
        for sub in ("attn_res", "mlp_res"):
            assert {f"blocks.{i}.{sub}.{p}" for p in ("phi", "bias", "alpha_pre", "alpha_post", "alpha_res")} <= names
    assert "blocks.1.engram.table" in names and "blocks.0.engram.table" not in names
    assert tensors["blocks.1.engram.table"].shape[0] >= 2 * 2 * 509  # 2 n-gram orders x 2 heads, primes > 509
    manifest = json.load(open(os.path.join(out, "export.json")))
    assert manifest["tensors"]["blocks.1.engram.table"]["axes"] == ["engram_rows", "engram_mem"]
    assert manifest["tensors"] == info and manifest["tokenizer"] == "byte"
    saved = load_config(os.path.join(out, "config.yaml"))
    assert (saved.residual.kind, saved.engram.layers) == ("mhc", (1,)) or saved.engram.layers == [1]


def test_sentencepiece_tokenizer_travels_with_the_export(tmp_path):
    spm = tmp_path / "tok" / "prose.model"
    tok = train_sentencepiece(stdlib_prose(300_000).split("\n\n"), 400, spm)
    cfg = load_config("tiny", [f"data.tokenizer={spm}", "model.vocab_size=400", "residual.kind=mhc",
                               "residual.n_streams=2"])
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        model = Transformer(cfg, rngs=nnx.Rngs(7))
    out = str(tmp_path / "export")
    export_model(cfg, model, out, step=0)
    os.remove(spm)  # the export must not need the original file
    loaded = load(out, mesh=mesh)
    assert loaded.tokenizer.encode("The assert statement") == tok.encode("The assert statement")
    assert loaded.cfg.data.tokenizer == os.path.join(out, "tokenizer.model")
    chex.assert_trees_all_equal(logits_of(loaded.model, tok, "print('hi')"), logits_of(model, tok, "print('hi')"))


def test_loading_into_a_different_model_names_the_mismatch(trained_workdir, tmp_path):
    out = str(tmp_path / "export")
    main(["--workdir", trained_workdir, "--out", out])
    cfg_path = os.path.join(out, "config.yaml")
    text = open(cfg_path).read()
    with open(cfg_path, "w") as f:
        f.write(text.replace("n_layers: 2", "n_layers: 3"))
    with pytest.raises(CheckpointError, match=r"missing \['blocks\.2\."):
        load(out)


def test_a_folder_without_an_export_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(CheckpointError, match=r"export\.json does not exist.*python -m mhc_jax\.export"):
        load(str(tmp_path))
    assert main(["--workdir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err
