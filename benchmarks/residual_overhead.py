"""Training-step time, MFU and activation memory of HC / mHC / mHC-lite relative to the plain residual.

    python benchmarks/residual_overhead.py [--quick] [--d-model 128 512 1024 --seq 64 256 128 --batch 12 4 2]

One table for the three shapes of issue 15 (d = 128 / 512 / 1024; the first is nanoGPT's CPU shape): for
each shape, times the shared jitted train step (mhc_jax.train.step.train_step) of every kind on the default
backend, interleaving the kinds over several rounds, and reports median step-time ratios to `plain`
measured in this one run, MFU (closed-form model FLOPs, mhc_jax.flops, over the matmul peak: the higher
of probes before and after the timing), and the compiled activation memory: bytes one block keeps from
forward to backward per token (outputs of the jitted jax.vjp closure of a block, compiled memory analysis;
with residual.recompute, the paper's selective recomputation, on and off). Paper reference: mHC costs 6.7%
extra training time at n = 4 with fused kernels, selective recomputation and pipeline overlap (GPUs).

Absolute times on a shared machine are noisy: quote the ratios, which come from interleaved rounds. The
machine's load average is recorded in the JSON. Then, as before, the compiled memory analysis of the
Sinkhorn backward (custom VJP keeps only the input; unrolled autodiff keeps every iterate).
Writes benchmarks/results/residual_overhead.json; `step_time` is the first shape's (the key earlier runs used).
"""

from __future__ import annotations

import argparse
import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx

from _common import (RESULTS, compile_seconds, interleaved_medians, load_average, repo_relative, settled_peak,
                     write_result)
from mhc_jax.config import Config
from mhc_jax.data import synthetic_batch
from mhc_jax.flops import model_flops_per_token
from mhc_jax.model import Transformer, count_params
from mhc_jax.model.memory import block_activation_bytes_per_token
from mhc_jax.residual import RESIDUAL_KINDS
from mhc_jax.sinkhorn import sinkhorn_knopp
from mhc_jax.train.metrics import measure_peak_flops, peak_flops_per_device
from mhc_jax.train.optimizer import make_optimizer
from mhc_jax.train.step import compiler_options, train_step

KINDS = tuple(RESIDUAL_KINDS)


def make_cfg(kind: str, d: int, layers: int, seq: int, batch: int, n: int, recompute: bool = True,
             impl: str = "xla", dtype: str = "auto", scan_unroll: int = 1) -> Config:
    heads = 4 if d <= 256 else d // 64  # nanoGPT's CPU shape has 4 heads of 32 at d = 128
    return Config().replace(
        model={"d_model": d, "n_layers": layers, "n_heads": heads, "n_kv_heads": heads,
               "d_ff": 4 * d, "max_seq_len": seq, "dtype": dtype, "scan_unroll": scan_unroll},
        residual={"kind": kind, "n_streams": n, "recompute": recompute, "impl": impl},
        data={"seq_len": seq, "batch_size": batch},
        optimizer={"warmup_steps": 0})


def step_time_ratios(args, d: int, seq: int, batch: int, peak: float) -> dict:
    steps, compile_s, params, flops = {}, {}, {}, {}
    for kind in args.kinds:
        cfg = make_cfg(kind, d, args.layers, seq, batch, args.n_streams, impl=args.impl, dtype=args.dtype,
                       scan_unroll=args.scan_unroll)
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        batch_ = jax.tree.map(jnp.asarray, synthetic_batch(cfg))
        steps[kind] = functools.partial(train_step, model, make_optimizer(cfg, model), batch_)
        compile_s[kind] = compile_seconds(steps[kind])
        params[kind], flops[kind] = count_params(model), model_flops_per_token(cfg)
    seconds = interleaved_medians(steps, args.rounds, args.steps)  # machine-load drift hits every kind alike
    return {kind: {"step_time_ratio": seconds[kind] / seconds["plain"], "step_s": seconds[kind],
                   "mfu": flops[kind] * batch * seq / seconds[kind] / peak, "params": params[kind],
                   "compile_s": compile_s[kind]} for kind in args.kinds}


def block_activation_bytes(kind: str, d: int, seq: int, n: int, recompute: bool) -> float:
    """Bytes one block keeps from forward to backward per token (mhc_jax.model.memory)."""
    return block_activation_bytes_per_token(make_cfg(kind, d, 2, seq, 1, n, recompute))


def activation_memory(d: int, seq: int, n: int) -> dict:
    plain = block_activation_bytes("plain", d, seq, n, True)
    out = {"plain": {"bytes_per_token": plain, "ratio": 1.0}}
    for kind in KINDS[1:]:
        on = block_activation_bytes(kind, d, seq, n, True)
        out[kind] = {"bytes_per_token": on, "ratio": on / plain}
        if kind == "mhc":  # what selective recomputation removes (hc and mhc_lite connections share the code)
            off = block_activation_bytes(kind, d, seq, n, False)
            out[kind].update(no_recompute_bytes_per_token=off, no_recompute_ratio=off / plain)
    return out


def sinkhorn_memory(args, seq: int, batch: int) -> dict:
    n, iters = args.n_streams, 20
    x = jnp.zeros((batch * seq, n, n), jnp.float32)

    def residual_bytes(recompute: bool) -> int:
        f = lambda y: sinkhorn_knopp(y, iters, recompute_backward=recompute)
        return jax.jit(lambda y: jax.vjp(f, y)[1]).lower(x).compile().memory_analysis().output_size_in_bytes

    n_sub = 2 * args.layers
    w = jnp.zeros((n_sub, n, n), jnp.float32)

    def stacked_temp_bytes(recompute: bool) -> int:
        # x_{l+1} = Sinkhorn(x_l + w_l) mixed into the next logits, like H_res feeding later sublayers.
        def loss(w_, x_):
            h = x_
            for layer in range(n_sub):
                h = jnp.einsum("bij,bjk->bik", sinkhorn_knopp(h + w_[layer], iters,
                                                              recompute_backward=recompute), h)
            return jnp.sum(h)
        compiled = jax.jit(jax.grad(loss)).lower(w, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    out = {"logits_shape": list(x.shape), "input_bytes": int(x.nbytes)}
    for name, recompute in (("custom_vjp", True), ("unrolled", False)):
        out[f"{name}_residual_bytes"] = int(residual_bytes(recompute))
        out[f"{name}_stacked_{n_sub}_temp_bytes"] = int(stacked_temp_bytes(recompute))
    out["residual_saving_x"] = out["unrolled_residual_bytes"] / out["custom_vjp_residual_bytes"]
    out["stacked_temp_saving_x"] = (out[f"unrolled_stacked_{n_sub}_temp_bytes"]
                                    / out[f"custom_vjp_stacked_{n_sub}_temp_bytes"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer timing steps and rounds (same shapes)")
    p.add_argument("--d-model", type=int, nargs="+", default=[128, 512, 1024], help="one or more widths")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, nargs="+", default=[64, 256, 128], help="per width (or one for all)")
    p.add_argument("--batch", type=int, nargs="+", default=[12, 4, 2], help="per width (or one for all)")
    p.add_argument("--n-streams", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="steps per timing round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=os.path.join(RESULTS, "residual_overhead.json"))
    p.add_argument("--impl", choices=["xla", "pallas"], default="xla", help="residual.impl of hc / mhc / mhc_lite")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="model.dtype")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="kinds to time (plain first)")
    p.add_argument("--scan-unroll", type=int, default=None,
                   help="model.scan_unroll (default: --layers, the whole stack unrolled: faster on CPU at these depths)")
    p.add_argument("--no-memory", action="store_true", help="skip the compiled memory analyses (timing only)")
    args = p.parse_args()
    if args.quick:
        args.steps, args.rounds = 2, 3
    args.scan_unroll = args.scan_unroll or args.layers
    widths = args.d_model
    per = lambda v: v * len(widths) if len(v) == 1 else v
    seqs, batches = per(args.seq), per(args.batch)
    if args.kinds[0] != "plain":
        raise SystemExit(f"--kinds {args.kinds}: the ratios are to plain, so list plain first")
    if not len(seqs) == len(batches) == len(widths):
        raise SystemExit(f"--seq {args.seq} and --batch {args.batch} need one value or one per --d-model {widths}")

    load_before = load_average()
    # CPU: the measured matmul peak; accelerators: the device table's dense bf16 peak (a 512^2 probe is no peak)
    peak = measure_peak_flops() if jax.default_backend() == "cpu" else peak_flops_per_device()
    shapes = []
    for d, seq, batch in zip(widths, seqs, batches):
        print(f"d={d} seq={seq} batch={batch}: timing {', '.join(args.kinds)} ...", flush=True)
        shapes.append({"d_model": d, "seq": seq, "batch": batch, "layers": args.layers,
                       "step_time": step_time_ratios(args, d, seq, batch, peak),
                       "activation_memory": {} if args.no_memory else activation_memory(d, seq, args.n_streams)})
    load_after = load_average()
    probes = []
    if jax.default_backend() == "cpu":
        peak, probes = settled_peak(peak, [s_["step_time"][kind] for s_ in shapes for kind in args.kinds])
    memory = {} if args.no_memory else sinkhorn_memory(args, seqs[0], batches[0])

    print(f"\ntrain step, backend={jax.default_backend()} layers={args.layers} n={args.n_streams}; step-time "
          f"ratios are medians over {args.rounds} interleaved rounds of {args.steps} steps; load average "
          f"{load_before} -> {load_after}; matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'shape':>18s} {'kind':9s} {'time/plain':>10s} {'MFU':>6s} {'act. mem/plain':>14s} "
          f"{'(no recompute)':>14s} {'act. KiB/token':>14s}")
    for s_ in shapes:
        name = f"d{s_['d_model']} T{s_['seq']} B{s_['batch']}"
        for kind in args.kinds:
            t, m = s_["step_time"][kind], s_["activation_memory"].get(kind, {})
            print(f"{name:>18s} {kind:9s} {t['step_time_ratio']:10.3f} {100 * t['mfu']:5.1f}% "
                  f"{m.get('ratio', float('nan')):14.2f} {m.get('no_recompute_ratio', float('nan')):14.2f} "
                  f"{m.get('bytes_per_token', float('nan')) / 1024:14.1f}")
    print("paper reference: mHC +6.7% step time at n=4 with fused kernels (GPU); activation memory is per block")
    print("\nSinkhorn backward memory (compiled memory analysis)")
    for key, value in memory.items():
        print(f"  {key:36s} {value if not isinstance(value, float) else round(value, 1)}")
    config = {**vars(args), "out": repo_relative(args.out)}
    path = write_result(args.out, {"config": config, "backend": jax.default_backend(),
                                   "device": jax.devices()[0].device_kind, "peak_flops": peak, "peak_probes": probes,
                                   "compiler_options": compiler_options(jax.default_backend()),
                                   "loadavg": {"before": load_before, "after": load_after},
                                   "step_time": shapes[0]["step_time"], "shapes": shapes,
                                   "sinkhorn_memory": memory})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
