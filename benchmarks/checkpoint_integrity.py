"""What the checkpoint integrity checksums cost: save and restore of the whole train state (model +
AdamW moments) with and without them, on the default backend.

    python benchmarks/checkpoint_integrity.py [--quick] [--config configs/default.yaml]

`save` is a synchronous Orbax save of the state (what an async save waits for before training goes on is
the device->host copy; the checksum is one extra jitted reduction over the state on the devices, 8 bytes
per array to the host). `restore` reads the state back onto the same shardings; verified restore
recomputes and compares the checksums. Ratios are medians over `--repeats` runs, measured in one run.
Writes benchmarks/results/checkpoint_integrity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import jax
import orbax.checkpoint as ocp
from flax import nnx

from mhc_jax.config import load_config
from mhc_jax.sharding import make_mesh
from mhc_jax.train.checkpoint import Checkpointer, abstract_like, tree_checksums
from mhc_jax.train.state import init_train_state


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small model and fewer repeats")
    p.add_argument("--config", default="default", help="config whose model is checkpointed")
    p.add_argument("--repeats", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "checkpoint_integrity.json"))
    args = p.parse_args()
    overrides = ["model.d_model=128", "model.n_layers=2", "engram.enabled=false"] if args.quick else []
    cfg = load_config(args.config, overrides + ["checkpoint.async_save=false", "checkpoint.keep=1000"])
    repeats = args.repeats or (3 if args.quick else 5)
    mesh = make_mesh(cfg.mesh)
    root = tempfile.mkdtemp(prefix="ckpt_integrity_")
    try:
        with jax.set_mesh(mesh):
            _, state, shardings = init_train_state(cfg, mesh)
            pure = nnx.to_pure_dict(state)
            target = abstract_like(pure, nnx.to_pure_dict(shardings))
            n_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(pure))
            tree_checksums(pure)  # compile once
            checksum_s = _median_time(lambda: tree_checksums(pure), repeats)
            ckpt = Checkpointer(os.path.join(root, "c"), cfg.checkpoint)
            counter = iter(range(1, 10**6))

            def plain_save():
                ckpt.manager.save(next(counter), args=ocp.args.Composite(
                    state=ocp.args.StandardSave(pure), meta=ocp.args.JsonSave({})), force=True)

            def checked_save():
                ckpt.save(next(counter), pure, None, {}, force=True)

            plain_save(), checked_save()  # warm up both paths
            save_plain_s = _median_time(plain_save, repeats)
            save_checked_s = _median_time(checked_save, repeats)
            last = ckpt.latest_step()

            def plain_restore():
                out = ckpt.manager.restore(last, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
                jax.block_until_ready(out["state"])

            def checked_restore():
                jax.block_until_ready(ckpt.restore(target, last)[0])

            plain_restore(), checked_restore()
            restore_plain_s = _median_time(plain_restore, repeats)
            restore_checked_s = _median_time(checked_restore, repeats)
            ckpt.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "config": args.config, "quick": args.quick, "backend": jax.default_backend(), "devices": jax.device_count(),
        "state_mib": n_bytes / 2**20, "arrays": len(jax.tree.leaves(pure)), "repeats": repeats,
        "checksum_over_plain_save": checksum_s / save_plain_s,
        "save_checked_over_plain": save_checked_s / save_plain_s,
        "restore_checked_over_plain": restore_checked_s / restore_plain_s,
        "checksum_gib_per_s": n_bytes / 2**30 / checksum_s,
    }
    print(f"{'state':>10} {'arrays':>7} {'checksum/save':>14} {'save x':>8} {'restore x':>10} {'GiB/s':>7}")
    print(f"{result['state_mib']:>8.1f}Mi {result['arrays']:>7} {result['checksum_over_plain_save']:>14.3f} "
          f"{result['save_checked_over_plain']:>8.3f} {result['restore_checked_over_plain']:>10.3f} "
          f"{result['checksum_gib_per_s']:>7.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
