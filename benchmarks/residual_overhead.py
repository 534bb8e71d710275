"""Training-step time of HC / mHC / mHC-lite relative to the plain residual, and Sinkhorn VJP memory.

    python benchmarks/residual_overhead.py [--quick]

Times the shared jitted train step (mhc_jax.train.step.train_step) at one config (default d=256,
4 layers, seq 256, batch 4, n=4) on the default backend, interleaving the kinds over several rounds and
reporting median step-time ratios to `plain` measured in this one run. Paper reference: mHC costs 6.7%
extra training time at n = 4 with fused kernels, selective recomputation and pipeline overlap; these are
unfused XLA ops, so expect more.

Then the compiled memory analysis of the Sinkhorn backward: bytes kept from forward to backward for the
batch's (B*T, n, n) logits (custom VJP: only the input; unrolled: every iterate), and the temporary memory
of a gradient through 2 * n_layers stacked projections (like the model's sublayers).
Writes benchmarks/results/residual_overhead.json.
"""

from __future__ import annotations

import argparse
import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx

from _common import RESULTS, compile_seconds, format_table, interleaved_medians, repo_relative, write_result
from mhc_jax.config import Config
from mhc_jax.data import synthetic_batch
from mhc_jax.model import Transformer, count_params
from mhc_jax.residual import RESIDUAL_KINDS
from mhc_jax.sinkhorn import sinkhorn_knopp
from mhc_jax.train.optimizer import make_optimizer
from mhc_jax.train.step import train_step

KINDS = tuple(RESIDUAL_KINDS)


def make_cfg(kind: str, d: int, layers: int, seq: int, batch: int, n: int) -> Config:
    return Config().replace(
        model={"d_model": d, "n_layers": layers, "n_heads": max(1, d // 64), "n_kv_heads": max(1, d // 64),
               "d_ff": 4 * d, "max_seq_len": seq},
        residual={"kind": kind, "n_streams": n},
        data={"seq_len": seq, "batch_size": batch},
        optimizer={"warmup_steps": 0})


def step_time_ratios(args) -> dict:
    steps, params, compile_s = {}, {}, {}
    for kind in KINDS:
        cfg = make_cfg(kind, args.d_model, args.layers, args.seq, args.batch, args.n_streams)
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        batch = jax.tree.map(jnp.asarray, synthetic_batch(cfg))
        steps[kind] = functools.partial(train_step, model, make_optimizer(cfg, model), batch)
        compile_s[kind] = compile_seconds(steps[kind])
        params[kind] = count_params(model)
    seconds = interleaved_medians(steps, args.rounds, args.steps)
    return {kind: {"step_time_ratio": seconds[kind] / seconds["plain"], "params": params[kind],
                   "compile_s": compile_s[kind]} for kind in KINDS}


def sinkhorn_memory(args) -> dict:
    n, iters = args.n_streams, 20
    x = jnp.zeros((args.batch * args.seq, n, n), jnp.float32)

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
    p.add_argument("--quick", action="store_true", help="smaller timing run (same config, fewer steps)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--n-streams", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="steps per timing round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=os.path.join(RESULTS, "residual_overhead.json"))
    args = p.parse_args()
    if args.quick:
        args.steps, args.rounds = 3, 3

    timing = step_time_ratios(args)
    memory = sinkhorn_memory(args)
    print(f"train step, backend={jax.default_backend()} d={args.d_model} layers={args.layers} seq={args.seq} "
          f"batch={args.batch} n={args.n_streams}; ratios are medians over {args.rounds} interleaved rounds")
    print(format_table(["kind", "step time / plain", "params"],
                       [[kind, r["step_time_ratio"], r["params"]] for kind, r in timing.items()]))
    print("paper reference: mHC +6.7% step time at n=4 with fused kernels")
    print("\nSinkhorn backward memory (compiled memory analysis)")
    for key, value in memory.items():
        print(f"  {key:36s} {value if not isinstance(value, float) else round(value, 1)}")
    print("  (residual bytes: what reverse mode keeps from forward to backward per call. The stacked temp\n"
          "   figure is whole-program scratch; XLA:CPU keeps every sublayer's recomputed iterates there.)")
    config = {**vars(args), "out": repo_relative(args.out)}
    path = write_result(args.out, {"config": config, "backend": jax.default_backend(), "step_time": timing,
                                   "sinkhorn_memory": memory})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
