"""Validation loss, perplexity and bits per byte of a trained workdir's newest checkpoint.

    python -m mhc_jax.evaluate --workdir DIR [--batches N] [--json out.json]
"""

from __future__ import annotations

import argparse

import jax

from mhc_jax.cli import entry_point, exit_process, write_json
from mhc_jax.data.pipeline import load_tokenizer, make_eval_iterator
from mhc_jax.distributed import add_launch_args, is_main_process, resolve_launch
from mhc_jax.errors import ConfigError
from mhc_jax.train import sparse_rows
from mhc_jax.train.evaluation import evaluate_model, token_byte_lengths
from mhc_jax.train.state import join_and_load_model


@entry_point
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a workdir written by train.py")
    p.add_argument("--batches", type=int, default=0, help="eval batches (default: training.eval_batches)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    add_launch_args(p)
    args = p.parse_args(argv)
    if args.batches < 0:
        raise ConfigError(f"--batches={args.batches} is not allowed: must be >= 1 (0 = training.eval_batches)")
    cfg, model, step, mesh = join_and_load_model(args.workdir, resolve_launch(args), args.step)
    with jax.set_mesh(mesh):
        tables = sparse_rows.tables_from_workdir(args.workdir, cfg, step)  # engram.update=sparse only
        batches = (make_eval_iterator(cfg, mesh=mesh) if tables is None
                   else sparse_rows.with_rows(cfg, mesh, tables, make_eval_iterator(cfg)))
        out = evaluate_model(model, batches, args.batches or cfg.training.eval_batches,
                             token_byte_lengths(load_tokenizer(cfg.data.tokenizer)))
    out["step"] = step
    if not is_main_process():  # every process evaluated (the program is SPMD); process 0 reports
        return 0
    print(f"step {step}: eval loss {out['loss']:.4f}  perplexity {out['perplexity']:.3f}  "
          f"bits/byte {out['bits_per_byte']:.4f}  ({int(out['tokens'])} tokens, {out['batches']} batches)")
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    exit_process(main())
