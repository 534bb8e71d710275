"""Input-pipeline throughput on one CPU core, with and without Engram hashing, against the rate at which the
training step consumes tokens.

    python benchmarks/pipeline_throughput.py [--quick] [--config configs/default.yaml]

The pipeline runs pinned to one core (no read threads, no prefetch thread, no worker processes), from the
default corpus through tokenizing, packing, batching and (optionally) Engram ids; the train step
(mhc_jax.train.step.train_step, the config's model) then runs on the default backend with every core. The
pipeline must never be the bottleneck: `ratio` = pipeline tokens/s / train-step tokens/s must stay > 1
(more read threads or `data.worker_count` processes scale the pipeline further).
Writes benchmarks/results/pipeline_throughput.json.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
from flax import nnx

from _common import REPO, RESULTS, compile_seconds, format_table, seconds_per_call, write_result
from mhc_jax.config import Config, load_config
from mhc_jax.data.pipeline import make_train_iterator
from mhc_jax.model import Transformer
from mhc_jax.train.optimizer import make_optimizer
from mhc_jax.train.step import train_step


def pipeline_tokens_per_s(cfg: Config, batches: int) -> float:
    it = make_train_iterator(cfg)
    for _ in range(3):  # opens the source, fills the read buffer
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * cfg.data.batch_size * cfg.data.seq_len / (time.perf_counter() - t0)


def step_tokens_per_s(cfg: Config, steps: int) -> tuple[float, float]:
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    batch = jax.tree.map(jax.numpy.asarray, next(make_train_iterator(cfg)))
    step = functools.partial(train_step, model, make_optimizer(cfg, model), batch,
                             grad_accum=cfg.training.grad_accum)
    compile_s = compile_seconds(step)
    return cfg.data.batch_size * cfg.data.seq_len / seconds_per_call(step, steps), compile_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer batches and steps")
    p.add_argument("--config", default=None, help="default: configs/default.yaml, else tiny.yaml at d_model 128")
    p.add_argument("--out", default=os.path.join(RESULTS, "pipeline_throughput.json"))
    args = p.parse_args()
    here = REPO
    path = args.config or os.path.join(here, "configs", "default.yaml")
    overrides = [] if os.path.isfile(path) else ["model.d_model=128"]
    path = path if os.path.isfile(path) else os.path.join(here, "configs", "tiny.yaml")
    cfg = load_config(path, overrides)
    single = cfg.replace(data={"read_threads": 1, "prefetch": 0, "worker_count": 0})
    batches, steps = (50, 5) if args.quick else (300, 20)

    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        rates = {"pipeline_no_engram": pipeline_tokens_per_s(single.replace(engram={"enabled": False}), batches)}
        engram_layers = list(cfg.engram.layers) if cfg.engram.enabled else [min(1, cfg.model.n_layers - 1)]
        rates["pipeline_engram"] = pipeline_tokens_per_s(
            single.replace(engram={"enabled": True, "layers": engram_layers}), batches)
    finally:
        os.sched_setaffinity(0, cores)
    rates["train_step"], compile_s = step_tokens_per_s(cfg, steps)

    result = {"config": os.path.relpath(path, here), "overrides": overrides,
              "batch_size": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "engram_in_step": cfg.engram.enabled,
              "backend": jax.default_backend(), "devices": len(jax.devices()), "pipeline_cores": 1,
              "tokens_per_s": rates, "train_step_compile_s": compile_s,
              "ratio_pipeline_over_step": rates["pipeline_engram" if cfg.engram.enabled else "pipeline_no_engram"]
              / rates["train_step"],
              "engram_hashing_cost": rates["pipeline_no_engram"] / rates["pipeline_engram"]}
    print(format_table(["stage", "tokens/s"], [[name, f"{rate:,.0f}"] for name, rate in rates.items()]))
    print(f"pipeline (1 core) / train step ({result['backend']}): {result['ratio_pipeline_over_step']:.1f}x; "
          f"Engram hashing slows the pipeline {result['engram_hashing_cost']:.2f}x")
    print(f"wrote {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
