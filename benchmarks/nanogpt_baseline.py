"""nanoGPT's CPU baseline on Tiny Shakespeare, trained by train.py's loop with plain and mHC residuals.

    python benchmarks/nanogpt_baseline.py [--steps 2000] [--kinds plain mhc]

nanoGPT README ("I only have a macbook"): character-level Tiny Shakespeare, 4 layers, 4 heads, 128 dims,
context 64, batch 12, 2000 iterations, lr 1e-3 (warmup 100, cosine to 1e-4), beta2 0.99, no dropout:
val loss ~1.88. Here the same shape and schedule run through `mhc_jax.train.loop.run` (the code behind
train.py) once per residual kind, one after the other in this process, on the byte tokenizer (Tiny
Shakespeare is ASCII, so bytes are characters). Differences from nanoGPT that matter for the number:
RoPE / RMSNorm / SwiGLU (d_ff 344 keeps the MLP at nanoGPT's 4*128*128*2 weights), and the validation
split is 2% of the documents by hash (nanoGPT: the last 10% of the file). Val loss is the mean over
`--eval-batches` batches (nanoGPT: 20) after the last step.

Reports, per kind: final val loss, wall time of the whole run (compile, evals, checkpoints included),
median step time and tokens/s, MFU (closed-form model FLOPs, mhc_jax.flops) against the matmul peak (the
higher of probes before and after the runs), and the ratio of mHC to plain measured in this one run. Writes
benchmarks/results/nanogpt_baseline.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import jax

from _common import HERE, RESULTS, format_table, repo_relative, settled_peak, write_result
from mhc_jax.config import Config, load_config
from mhc_jax.flops import model_flops_per_token
from mhc_jax.model import expected_param_count
from mhc_jax.residual import RESIDUAL_KINDS
from mhc_jax.train.loop import run
from mhc_jax.train.metrics import measure_peak_flops, read_metrics

DEFAULT_CORPUS = os.path.join(HERE, "..", "..", "shared", "data", "tinyshakespeare.txt")
NANOGPT_VAL_LOSS = 1.88  # nanoGPT README, CPU baseline at iteration 2000


def make_cfg(kind: str, corpus: str, steps: int, eval_batches: int, peak: float) -> Config:
    tiny = os.path.join(HERE, "..", "configs", "tiny.yaml")
    return load_config(tiny).replace(
        # scan_unroll: the 4 blocks unrolled in the scan (0.80x step time on CPU; README "mHC speed")
        model={"d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "d_ff": 344, "max_seq_len": 64,
               "scan_unroll": 4},
        residual={"kind": kind, "n_streams": 4},
        data={"dataset": f"text:{os.path.abspath(corpus)}", "tokenizer": "byte", "seq_len": 64, "batch_size": 12},
        optimizer={"lr": 1e-3, "b2": 0.99, "warmup_steps": 100, "schedule": "cosine", "min_lr_ratio": 0.1,
                   "weight_decay": 0.1, "clip_norm": 1.0},
        # eval_every a multiple of log_every: each eval follows a log row, so no timing window holds it
        training={"steps": steps, "log_every": 50, "eval_every": max(steps // 200, 1) * 50, "eval_batches": eval_batches,
                  "diagnostics_every": 0, "sample_tokens": 200, "sample_prompt": "ROMEO:", "peak_flops": peak},
        checkpoint={"every": steps, "keep": 1, "async_save": False})


def train_one(cfg: Config, workdir: str) -> dict:
    t0 = time.perf_counter()
    result = run(cfg, workdir, progress=False)
    wall = time.perf_counter() - t0
    log_every = cfg.training.log_every
    train = [r for r in read_metrics(workdir, "train") if r["step"] > log_every]  # window 1 holds the compile
    evals = read_metrics(workdir, "eval")
    step_time = statistics.median(r["step_time"] for r in train)
    return {
        "val_loss": result.eval["loss"], "val_bits_per_byte": result.eval["bits_per_byte"],
        "train_loss": result.train_loss, "wall_s": wall, "median_step_s": step_time,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
        "mfu": statistics.median(r["mfu"] for r in train),
        "params": expected_param_count(cfg),
        "flops_per_token": model_flops_per_token(cfg),
        "eval_curve": [(r["step"], r["loss"]) for r in evals], "sample": result.sample}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help="Tiny Shakespeare text file")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--kinds", nargs="+", default=["plain", "mhc"], choices=tuple(RESIDUAL_KINDS))
    p.add_argument("--workdir", default="", help="where runs are written (default: a temporary folder)")
    p.add_argument("--out", default=os.path.join(RESULTS, "nanogpt_baseline.json"))
    args = p.parse_args()
    if not os.path.isfile(args.corpus):
        raise SystemExit(f"--corpus {args.corpus!r} does not exist; pass the path of tinyshakespeare.txt")

    peak = measure_peak_flops()
    root = args.workdir or tempfile.mkdtemp(prefix="nanogpt_baseline_")
    runs = {}
    for kind in args.kinds:
        workdir = os.path.join(root, kind)
        shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, never a resume
        print(f"training {kind} for {args.steps} steps in {workdir} ...", flush=True)
        runs[kind] = train_one(make_cfg(kind, args.corpus, args.steps, args.eval_batches, peak), workdir)
        print(f"  {kind}: val loss {runs[kind]['val_loss']:.4f} in {runs[kind]['wall_s']:.0f} s", flush=True)

    peak, probes = settled_peak(peak, list(runs.values()))
    print(f"\nnanoGPT CPU baseline shape, {args.steps} steps, backend={jax.default_backend()}, "
          f"{jax.device_count()} device(s), measured matmul peak {peak / 1e9:.1f} GFLOP/s per device (the "
          f"higher of {probes[0] / 1e9:.1f} before and {probes[1] / 1e9:.1f} after the runs)")
    print(format_table(["kind", "val loss", "bpb", "wall s", "ms/step", "tok/s", "MFU", "params"],
                       [[kind, f"{r['val_loss']:.4f}", r["val_bits_per_byte"], f"{r['wall_s']:.0f}",
                         f"{1e3 * r['median_step_s']:.1f}", f"{r['tokens_per_s']:.0f}", f"{100 * r['mfu']:.2f}%",
                         r["params"]] for kind, r in runs.items()]))
    ratios = {}
    if "plain" in runs:
        for kind, r in runs.items():
            if kind != "plain":
                ratios[kind] = {"step_time_ratio": r["median_step_s"] / runs["plain"]["median_step_s"],
                                "wall_ratio": r["wall_s"] / runs["plain"]["wall_s"],
                                "val_loss_delta": r["val_loss"] - runs["plain"]["val_loss"]}
                print(f"{kind} / plain: step time {ratios[kind]['step_time_ratio']:.2f}x, wall "
                      f"{ratios[kind]['wall_ratio']:.2f}x, val loss {ratios[kind]['val_loss_delta']:+.4f}")
    print(f"nanoGPT reference: val loss ~{NANOGPT_VAL_LOSS} at 2000 iterations")
    for kind, r in runs.items():
        print(f"\n--- {kind} sample ---\n{r['sample']}")
    config = {**vars(args), "corpus": repo_relative(args.corpus), "out": repo_relative(args.out),
              "workdir": repo_relative(args.workdir) if args.workdir else ""}
    path = write_result(args.out, {"config": config, "backend": jax.default_backend(), "devices": jax.device_count(),
                                   "peak_flops": peak, "peak_probes": probes, "nanogpt_val_loss": NANOGPT_VAL_LOSS,
                                   "runs": runs, "ratios_to_plain": ratios})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
