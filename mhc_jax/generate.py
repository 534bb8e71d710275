"""Text generation from a trained workdir (the library is mhc_jax.sampling):

    python -m mhc_jax.generate --workdir DIR --prompt "def main(" --max-new-tokens 200 --temperature 0.8

Engram ids of each new token are computed on the host by the same `EngramIds` the input pipeline uses, so
generation sees exactly the ids training saw. A new token's n-grams reach back at most max_ngram - 1 tokens,
so each decode step hashes only the last max_ngram tokens (O(1) per token, not the whole history). With
sparse host tables (engram.update=sparse) the new token's rows are gathered from the `HostTables`.
"""

from __future__ import annotations

import argparse
import sys

import jax

from mhc_jax.cli import entry_point, exit_process
from mhc_jax.data.tokenizer import load_tokenizer
from mhc_jax.distributed import add_launch_args, is_main_process, resolve_launch
# Re-exported: the sampling library used to live here.
from mhc_jax.sampling import (EngramIdFn, check_sampling, filter_logits, fit_prompt, generate,  # noqa: F401
                              generate_text, sample_token, unbounded_context)
from mhc_jax.train.sparse_rows import tables_from_workdir
from mhc_jax.train.state import join_and_load_model


@entry_point
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a workdir written by train.py")
    p.add_argument("--prompt", default="", help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    add_launch_args(p)
    args = p.parse_args(argv)
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)  # before loading anything
    cfg, model, step, mesh = join_and_load_model(args.workdir, resolve_launch(args), args.step)
    tables = tables_from_workdir(args.workdir, cfg, step)  # engram.update=sparse: tables in host RAM
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if not unbounded_context(cfg):  # max_new_tokens fits the context at all
        fit_prompt([tokenizer.bos_id], args.max_new_tokens, cfg.model.max_seq_len)
    with jax.set_mesh(mesh):  # every process generates (the parameters are sharded over all of them)
        text = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed, engram_tables=tables)
    if not is_main_process():
        return 0
    print(f"[checkpoint step {step}]")
    print(args.prompt + text)
    n_new = len(tokenizer.encode(text))
    if n_new < args.max_new_tokens:
        print(f"[stopped at the end-of-text token after {n_new} of {args.max_new_tokens} tokens]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    exit_process(main())
