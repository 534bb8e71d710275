#!/usr/bin/env python
"""Train a decoder-only LM (plain / HC / mHC residual, optional Engram memory).

    python train.py                                    # the embedded default: mHC + Engram, ~5 min on CPU
    python train.py --config configs/tiny.yaml --workdir /tmp/run model.n_layers=2 residual.kind=plain

Re-running with the same --workdir resumes from its newest checkpoint. Overrides are section.key=value.
"""

from __future__ import annotations

import argparse
import hashlib
import os

from mhc_jax.cli import entry_point, exit_process


@entry_point
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/default.yaml", help="YAML config (a path or a name in configs/)")
    p.add_argument("--workdir", default=None, help="checkpoints, metrics and config go here "
                   "(default: workdir/<config name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. residual.kind=plain")
    from mhc_jax.distributed import add_launch_args
    add_launch_args(p)
    args = p.parse_intermixed_args(argv)  # overrides may come before, between or after the flags

    from mhc_jax.config import load_config
    from mhc_jax.distributed import is_main_process, maybe_initialize_distributed, resolve_launch

    maybe_initialize_distributed(resolve_launch(args))  # before anything touches the devices
    cfg = load_config(args.config, args.overrides)
    name = os.path.splitext(os.path.basename(args.config))[0]
    workdir = args.workdir or os.path.join("workdir", name)

    import jax

    from mhc_jax.data.pipeline import tokenized
    from mhc_jax.train.loop import run

    result = run(cfg, workdir, progress=not args.no_progress)
    if result.status == "preempted":
        return 143
    if result.status == "nothing_to_train":  # run() said so in one line
        return 0
    # Every process ran the whole program, the sample included; a digest shows that they all agree.
    digest = hashlib.sha256(result.sample.encode()).hexdigest()[:16]
    work = tokenized()  # this process's share of the data: it reads and packs only its rows
    done = (f"finished at step {result.step}, sample digest {digest}, tokenized {work['documents']} documents "
            f"({work['tokens']} tokens)")
    if not is_main_process():
        print(f"process {jax.process_index()}: {done}")
        return 0
    print()
    print(f"finished at step {result.step}: train loss {result.train_loss:.4f}", end="")
    if result.eval:
        print(f", eval loss {result.eval['loss']:.4f}, bits/byte {result.eval['bits_per_byte']:.4f}")
    else:
        print()
    if result.sample:
        print("--- sample " + "-" * 60)
        print(result.sample)
        print("-" * 71)
    if jax.process_count() > 1:
        print(f"process 0: {done}")
    print(f"checkpoints: {os.path.join(workdir, 'checkpoints')}")
    print(f"metrics:     {os.path.join(workdir, 'metrics.jsonl')} (TensorBoard: {os.path.join(workdir, 'tensorboard')})")
    if result.plots:
        print(f"plots:       {', '.join(result.plots)}")
    print(f"generate:    python -m mhc_jax.generate --workdir {workdir} --prompt \"def \"")
    return 0


if __name__ == "__main__":
    exit_process(main())
