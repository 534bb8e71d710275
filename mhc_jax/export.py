"""Portable checkpoints: a trained workdir as `safetensors` + the resolved config + the tokenizer.

    python -m mhc_jax.export --workdir W --out DIR [--step N]

DIR then holds
    model.safetensors   every variable of the model (mHC / HC coefficients and Engram tables included;
                        host-resident Engram tables are copied from host memory like any other array),
                        named by its attribute path joined with dots (names below), in its stored dtype;
                        the file's metadata repeats the format name, version and checkpoint step.
    config.yaml         the run's resolved config (every field; `python -m mhc_jax.config` documents them),
                        with `data.tokenizer` pointing into DIR.
    tokenizer.model     the SentencePiece model, when the run used one (the byte tokenizer needs no file).
    export.json         format, version, step, tokenizer, and each tensor's name, shape, dtype and logical
                        axes (the names of its dimensions in mhc_jax.sharding's rules table).

Tensor names (i = block index, j = stream or n-gram head index):
    embed_VC                              token embedding (padded vocab, d_model)
    head_CV                               output head (d_model, padded vocab), absent with tied embeddings
    final_norm.scale                      final RMSNorm
    blocks.i.attn_norm.scale, blocks.i.mlp_norm.scale
    blocks.i.attn.{wq_CHD, wk_CKD, wv_CKD, wo_HDC}
    blocks.i.attn.{wq_CHD | wdq_Cq, q_norm.scale, wuq_qHD; wdkv_Cc, kv_norm.scale, wkr_Cd, wuk_cHo, wuv_cHv,
                   wo_HvC}             with model.attention=mla (mhc_jax.model.mla: Y/P query/KV latents, O/I
                                          query-key dims without/with RoPE, v value dims)
    blocks.i.mlp.{w_gate_CF, w_up_CF, w_down_FC}
    mtp.k.*                               multi-token prediction module k + 1 (model.mtp_depth): hidden_norm,
                                          embed_norm, w_hidden_CC, w_embed_CC, block.*, out_norm
    blocks.i.{attn_res, mlp_res}.*        residual connection of each sublayer; mHC: `phi` (n*C, n^2+2n),
                                          columns [pre (n) | post (n) | res (n^2, row-major)], the fused
                                          dynamic projection; `bias` (n^2+2n) the static coefficients; the
                                          gates `alpha_pre`, `alpha_post`, `alpha_res` of H_pre, H_post, H_res
                                          (mhc.md Eqs. 7-8); HC / mHC-lite: their own coefficients likewise
    collapse.*                            the n-stream -> 1 read-out, when it has weights
    blocks.i.engram.*                     Engram: `table` (hashed n-gram rows), `key_projs.j`, `value_proj`,
                                          norms and the causal `conv`. Sparse host tables (engram.update=
                                          sparse) are exported under the same `table` names (their Adam
                                          moments are training state, not exported); `load` puts them back
                                          into host RAM (`Exported.engram_tables`)
The letters in a name are its dimensions (C model width, H/K query/KV heads, D head dim, F MLP width,
V vocabulary). `load(DIR)` rebuilds the model from these files alone: its logits equal the original's bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from mhc_jax.cli import entry_point, exit_process
from mhc_jax.config import Config, load_config, save_config
from mhc_jax.data.tokenizer import load_tokenizer
from mhc_jax.errors import CheckpointError, MhcJaxError
from mhc_jax.model import Transformer
from mhc_jax.sharding import make_mesh, train_state_shardings_of
from mhc_jax.train.sparse_rows import host_tables, tables_from_workdir
from mhc_jax.train.state import load_model_from_workdir

FORMAT = "mhc-jax-safetensors"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.model"
MANIFEST_FILE = "export.json"


@dataclasses.dataclass
class Exported:
    """What `load` returns: the config, the rebuilt model, its tokenizer and the checkpoint step."""
    cfg: Config
    model: Any  # mhc_jax.model.Transformer
    tokenizer: Any
    step: int
    engram_tables: Any = None  # engram.update=sparse: mhc_jax.engram.host_tables.HostTables (zero moments)


def tensor_name(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def host_table_name(layer: int) -> str:
    """The tensor name of a sparse host table: the dense table's name."""
    return f"blocks.{layer}.engram.table"


def model_tensors(model: nnx.Module, engram_tables: Any = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """(name -> host numpy array, name -> {shape, dtype, axes}) for every variable of `model`, and the
    tables of `engram_tables` (HostTables, engram.update=sparse) under the dense tables' names."""
    tensors, info = {}, {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        name = tensor_name(path)
        value = np.asarray(jax.device_get(var.get_value()))  # host-memory arrays too
        tensors[name] = np.array(value, order="C")  # (ascontiguousarray would make scalars 1-d)
        axes = var.get_metadata().get("axes")
        info[name] = {"shape": list(value.shape), "dtype": str(value.dtype), "kind": type(var).__name__,
                      "axes": None if axes is None else list(axes)}
    if getattr(engram_tables, "process_count", 1) > 1:
        raise CheckpointError("exporting sparse Engram tables needs every row on one process: run the export "
                              "as one process (`python -m mhc_jax.export --workdir ...` reads every range)")
    for layer, table in zip(getattr(engram_tables, "layers", ()), getattr(engram_tables, "tables", ())):
        name = host_table_name(layer)
        tensors[name] = table  # float32, C-contiguous: written without a copy
        info[name] = {"shape": list(table.shape), "dtype": str(table.dtype), "kind": "Param",
                      "axes": ["engram_rows", "engram_mem"]}
    return tensors, info


def export_model(cfg: Config, model: nnx.Module, out: str, step: int = 0, engram_tables: Any = None) -> str:
    """Writes `model` (built from `cfg`; with engram.update=sparse also its host `engram_tables`) into the
    folder `out` (created; files replaced). Returns `out`."""
    from safetensors.numpy import save_file

    if cfg.engram.sparse and engram_tables is None:
        raise CheckpointError("engram.update=sparse keeps the Engram tables outside the model: pass "
                              "engram_tables (mhc_jax.train.sparse_rows.tables_from_workdir)")
    os.makedirs(out, exist_ok=True)
    tensors, info = model_tensors(model, engram_tables)
    tmp = os.path.join(out, WEIGHTS_FILE + ".tmp")
    save_file(tensors, tmp, metadata={"format": FORMAT, "version": str(VERSION), "step": str(step)})
    os.replace(tmp, os.path.join(out, WEIGHTS_FILE))  # never a half-written weights file under its name
    tokenizer = cfg.data.tokenizer
    if tokenizer != "byte":
        if not os.path.isfile(tokenizer):
            raise CheckpointError(f"the run's tokenizer {tokenizer!r} does not exist; it must be exported with "
                                  "the model (pass the config override data.tokenizer=PATH)")
        shutil.copyfile(tokenizer, os.path.join(out, TOKENIZER_FILE))
        tokenizer = TOKENIZER_FILE
    save_config(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=tokenizer)),
                os.path.join(out, CONFIG_FILE))
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "weights": WEIGHTS_FILE,
                "config": CONFIG_FILE, "tokenizer": tokenizer, "tensors": info}
    with open(os.path.join(out, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=1)
    return out


def export_workdir(workdir: str, out: str, step: int | None = None) -> str:
    """The newest (or `step`) checkpoint of a train.py workdir, exported into `out`."""
    cfg, model, step = load_model_from_workdir(workdir, step=step)
    return export_model(cfg, model, out, step, tables_from_workdir(workdir, cfg, step))


def read_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist: {directory!r} is not a folder written by "
                              "`python -m mhc_jax.export`")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path} is format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                              f"this mhc_jax reads {FORMAT!r} version {VERSION}")
    return manifest


def load(directory: str, mesh: Mesh | None = None) -> Exported:
    """Rebuilds the exported model on `mesh` (default: the config's mesh over all devices)."""
    from safetensors.numpy import load_file

    manifest = read_manifest(directory)
    tok = manifest["tokenizer"]
    tok_path = tok if tok == "byte" else os.path.join(directory, tok)
    cfg = load_config(os.path.join(directory, CONFIG_FILE), [f"data.tokenizer={tok_path}"])
    tensors = load_file(os.path.join(directory, manifest["weights"]))
    mesh = mesh or make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        shardings = train_state_shardings_of(state, mesh, cfg)
        flat = dict(nnx.to_flat_state(state))
        host_names = [host_table_name(layer) for layer in cfg.engram.layers] if cfg.engram.sparse else []
        expected = {tensor_name(p) for p in flat} | set(host_names)
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or extra:
            raise CheckpointError(f"{directory}/{manifest['weights']} does not match the config's model: "
                                  f"missing {missing[:8]}, unexpected {extra[:8]}")
        sharding_of = {tensor_name(tuple(getattr(k, "key", k) for k in path)): s for path, s in
                       jax.tree_util.tree_flatten_with_path(shardings)[0]}

        def fill(path: tuple[Any, ...], var: nnx.Variable) -> Any:
            name = tensor_name(path)
            want = var.get_value()
            value = tensors[name]
            if tuple(value.shape) != tuple(want.shape) or value.dtype != want.dtype:
                raise CheckpointError(f"tensor {name}: file has {value.shape} {value.dtype}, the config's "
                                      f"model needs {tuple(want.shape)} {want.dtype}")
            return jax.device_put(value, sharding_of[name])

        pure = _unflatten({tensor_name(p): fill(p, v) for p, v in flat.items()})
        nnx.replace_by_pure_dict(state, pure)
        model = nnx.merge(graphdef, state)
    tables = None
    if host_names:  # sparse: the tables go back into host RAM, with zero moments
        tables = host_tables(cfg, initialise=False)
        for i, name in enumerate(host_names):
            whole = (tables.n_rows[i], tables.dim)
            if tensors[name].shape != whole or tensors[name].dtype != np.float32:
                raise CheckpointError(f"tensor {name}: file has {tensors[name].shape} {tensors[name].dtype}, the "
                                      f"config's host table needs {whole} float32")
            table = tensors.pop(name)  # several processes: each keeps its own row range
            tables.tables[i][:tables.hi[i] - tables.lo[i]] = table[tables.lo[i]:tables.hi[i]]
    return Exported(cfg=cfg, model=model, tokenizer=load_tokenizer(cfg.data.tokenizer),
                    step=int(manifest.get("step", 0)), engram_tables=tables)


def _unflatten(flat: dict[str, Any]) -> dict:
    """{"a.0.b": x} -> {"a": {0: {"b": x}}} (integer path parts back to ints, as nnx.List keys are)."""
    out: dict = {}
    for name, value in flat.items():
        node = out
        parts = [int(p) if p.isdigit() else p for p in name.split(".")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


@entry_point
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a workdir written by train.py")
    p.add_argument("--out", required=True, help="folder to write (created; its files are replaced)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    args = p.parse_args(argv)
    out = export_workdir(args.workdir, args.out, args.step)
    manifest = read_manifest(out)
    n = sum(int(np.prod(t["shape"])) for t in manifest["tensors"].values())
    print(f"exported step {manifest['step']}: {len(manifest['tensors'])} tensors, {n:,} values -> "
          f"{os.path.join(out, WEIGHTS_FILE)} (+ {CONFIG_FILE}, {MANIFEST_FILE}"
          f"{', ' + TOKENIZER_FILE if manifest['tokenizer'] != 'byte' else ''})")
    return 0


if __name__ == "__main__":
    exit_process(main())
