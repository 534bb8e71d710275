"""Validation loss, perplexity and bits per byte of a trained workdir's newest checkpoint.

    python -m mhc_jax.evaluate --workdir DIR [--batches N] [--json out.json]

Multi-process: run it on every process with the launch flags (README "Multi-host"); process 0 prints.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax


def main(argv: list[str] | None = None) -> int:
    from mhc_jax.config import ConfigError
    from mhc_jax.data import load_tokenizer, make_eval_iterator
    from mhc_jax.distributed import add_launch_args, is_main_process, resolve_launch
    from mhc_jax.train.evaluation import evaluate_model, token_byte_lengths
    from mhc_jax.train.state import join_and_load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a workdir written by train.py")
    p.add_argument("--batches", type=int, default=0, help="eval batches (default: training.eval_batches)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    add_launch_args(p)
    args = p.parse_args(argv)
    try:
        cfg, model, step, mesh = join_and_load_model(args.workdir, resolve_launch(args), args.step)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with jax.set_mesh(mesh):
        out = evaluate_model(model, make_eval_iterator(cfg, mesh=mesh), args.batches or cfg.training.eval_batches,
                             token_byte_lengths(load_tokenizer(cfg.data.tokenizer)))
    out["step"] = step
    if not is_main_process():  # every process evaluated (the program is SPMD); process 0 reports
        return 0
    print(f"step {step}: eval loss {out['loss']:.4f}  perplexity {out['perplexity']:.3f}  "
          f"bits/byte {out['bits_per_byte']:.4f}  ({int(out['tokens'])} tokens, {out['batches']} batches)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
