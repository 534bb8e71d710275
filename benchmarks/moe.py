"""DeepSeekMoE: train-step time and MFU against a dense model of equal active parameters, and the load balance
with and without the aux-loss-free bias update.

    python benchmarks/moe.py [--quick] [--balance-steps 300]

1. Step time: the shared jitted train step (mhc_jax.train.step.train_step) of a dense model (SwiGLU width
   d_ff) and of MoE models whose active feed-forward has the same width (1 shared + k routed experts of
   width d_ff / (1 + k)), dropless (grouped matmul) and with capacity factor 1.25; interleaved rounds, median
   step times as ratios to dense measured in this one run, MFU from active FLOPs (the dense model's closed
   form, mhc_jax.flops, plus the router's 2 C n_routed per token and MoE layer, x 3 for training) over a
   matmul peak measured at start-up. Absolute times on a shared machine are noisy; the load average is recorded.
2. Load balance: a small MoE model (8 routed experts, top-2, 1 shared) trains `--balance-steps` steps on the
   embedded corpus with the bias update at gamma = 1e-2 and at DeepSeek-V3's 1e-3 (V3 trains ~5 orders of
   magnitude more steps, so its gamma barely moves the bias in 300), and without it; per step and MoE
   layer, the max/mean expert load. Plotted to benchmarks/results/plots/moe_load_balance.png.
3. One grouped matmul, forward + backward, at equal FLOPs and 1 / 4 / 16 / 64 groups: jax.lax.ragged_dot
   (XLA:CPU computes every group as a full dense matmul) against mhc_jax.grouped_matmul (the tiled loop the
   dropless MoE runs off TPU).
Writes benchmarks/results/moe.json.
"""

from __future__ import annotations

import argparse
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from _common import (RESULTS, compile_seconds, format_table, interleaved_medians, load_average, repo_relative,
                     write_result)
from mhc_jax.config import Config
from mhc_jax.data import synthetic_batch
from mhc_jax.data.pipeline import make_train_iterator
from mhc_jax.flops import model_flops_per_token
from mhc_jax.grouped_matmul import grouped_matmul
from mhc_jax.model import Transformer, count_params
from mhc_jax.model.moe import moe_blocks
from mhc_jax.train.metrics import measure_peak_flops
from mhc_jax.train.optimizer import make_optimizer
from mhc_jax.train.step import train_step


def make_cfg(d: int, layers: int, seq: int, batch: int, **model) -> Config:
    return Config().replace(
        model={"d_model": d, "n_layers": layers, "n_heads": 4, "n_kv_heads": 4, "d_ff": 4 * d, "max_seq_len": seq,
               **model},
        data={"seq_len": seq, "batch_size": batch, "corpus_max_mb": 2.0}, optimizer={"warmup_steps": 10},
        training={"steps": 1000})


def active_flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token counting active parameters: the dense model of the same active width plus
    the router (every MoE layer's C x n_routed projection)."""
    m = cfg.model
    if m.ffn == "dense":
        return model_flops_per_token(cfg)
    width = (m.n_shared_experts + m.experts_per_token) * m.moe_d_ff
    dense = model_flops_per_token(cfg.replace(model={"ffn": "dense", "d_ff": width}))
    return dense + 3.0 * 2.0 * m.d_model * m.n_routed_experts * len(moe_blocks(cfg.model))


def step_times(args, peak: float) -> dict:
    d, k = args.d_model, args.experts_per_token
    variants = {
        "dense": make_cfg(d, args.layers, args.seq, args.batch),
        "moe_dropless": make_cfg(d, args.layers, args.seq, args.batch, ffn="moe", n_routed_experts=args.experts,
                                 experts_per_token=k, moe_d_ff=4 * d // (1 + k), n_shared_experts=1),
    }
    variants["moe_capacity_1.25"] = variants["moe_dropless"].replace(model={"capacity_factor": 1.25})
    steps, out = {}, {}
    for name, cfg in variants.items():
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        batch = jax.tree.map(jnp.asarray, synthetic_batch(cfg))
        steps[name] = functools.partial(train_step, model, make_optimizer(cfg, model), batch)
        out[name] = {"compile_s": compile_seconds(steps[name]), "params": count_params(model),
                     "active_flops_per_token": active_flops_per_token(cfg)}
    seconds = interleaved_medians(steps, args.rounds, args.steps)
    tokens = args.batch * args.seq
    for name in variants:
        out[name].update(step_s=seconds[name], step_time_ratio=seconds[name] / seconds["dense"],
                         mfu=out[name]["active_flops_per_token"] * tokens / seconds[name] / peak)
    return out


def grouped_matmul_scaling(rows: int = 4096, d: int = 128, groups: tuple[int, ...] = (1, 4, 16, 64)) -> dict:
    """Seconds of one forward + backward of `rows` x d by (g, d, d) with the rows split evenly over g groups,
    for jax.lax.ragged_dot and mhc_jax.grouped_matmul: the FLOPs do not depend on g, so a time growing with g
    shows a lowering that computes every group as a full dense matmul (XLA:CPU's ragged_dot does)."""
    x = jnp.ones((rows, d), jnp.float32)
    out = {"ragged_dot": {}, "grouped_matmul": {}}
    for g in groups:
        w, sizes = jnp.ones((g, d, d), jnp.float32), jnp.full((g,), rows // g, jnp.int32)
        for name, fn in (("ragged_dot", jax.lax.ragged_dot), ("grouped_matmul", grouped_matmul)):
            f = jax.jit(jax.grad(lambda x, w, fn=fn: jnp.sum(fn(x, w, sizes) ** 2), argnums=(0, 1)))
            out[name][str(g)] = interleaved_medians({"f": lambda: f(x, w)}, 3, 3)["f"]
    return out


def load_balance(args) -> dict:
    base = dict(ffn="moe", n_routed_experts=8, experts_per_token=2, moe_d_ff=args.balance_d_model, n_shared_experts=1)
    variants = {"bias_update_1e-2": dict(bias_update_rate=1e-2), "bias_update_1e-3": dict(bias_update_rate=1e-3),
                "no_balancing": dict(bias_update_rate=0.0)}
    out = {}
    for name, extra in variants.items():
        cfg = make_cfg(args.balance_d_model, 2, 64, 8, **base, **extra)
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        optimizer = make_optimizer(cfg, model)
        data = make_train_iterator(cfg)
        ratios, losses = [], []
        for _ in range(args.balance_steps):
            m = train_step(model, optimizer, jax.tree.map(jnp.asarray, next(data)))
            load = np.asarray(m["moe_load_LI"])
            ratios.append((load.max(axis=1) / load.mean(axis=1)).tolist())
            losses.append(float(m["loss"]))
        r = np.asarray(ratios)
        last = r[-args.balance_steps // 5:]
        out[name] = {"max_over_mean_per_step": ratios, "loss_per_step": losses,
                     "max_over_mean_last_fifth_mean": last.mean(axis=0).tolist(),
                     "final_loss_last_fifth_mean": float(np.mean(losses[-args.balance_steps // 5:]))}
    return out


def plot(balance: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (name, res), color in zip(balance.items(), ("tab:green", "tab:red", "tab:blue")):
        r = np.asarray(res["max_over_mean_per_step"])
        for layer in range(r.shape[1]):
            ax.plot(r[:, layer], color=color, alpha=0.8, linestyle=("-", "--", ":")[layer % 3],
                    label=f"{name}, MoE layer {layer}")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set(xlabel="step", ylabel="max / mean expert load", title="DeepSeekMoE load balance")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer timing rounds and balance steps")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--experts", type=int, default=16, help="routed experts")
    p.add_argument("--experts-per-token", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="steps per timing round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--balance-steps", type=int, default=300)
    p.add_argument("--balance-d-model", type=int, default=64)
    p.add_argument("--out", default=os.path.join(RESULTS, "moe.json"))
    args = p.parse_args()
    if args.quick:
        args.steps, args.rounds, args.balance_steps = 2, 3, 40

    load_before = load_average()
    peak = measure_peak_flops()
    times = step_times(args, peak)
    print(format_table(["variant", "params", "step_time_ratio", "mfu %", "compile_s"],
                       [[n, r["params"], r["step_time_ratio"], 100 * r["mfu"], r["compile_s"]] for n, r in times.items()]))
    grouped = grouped_matmul_scaling()
    print(format_table(["groups (same FLOPs)", "ragged_dot fwd+bwd s", "grouped_matmul fwd+bwd s"],
                       [[g, t, grouped["grouped_matmul"][g]] for g, t in grouped["ragged_dot"].items()]))
    balance = load_balance(args)
    print(format_table(["balancing", "max/mean load per layer (last fifth)", "loss (last fifth)"],
                       [[n, " ".join(f"{v:.2f}" for v in r["max_over_mean_last_fifth_mean"]),
                         r["final_loss_last_fifth_mean"]] for n, r in balance.items()]))
    plot_path = os.path.join(os.path.dirname(args.out), "plots", "moe_load_balance.png")
    plot(balance, plot_path)
    result = {"backend": jax.default_backend(), "peak_flops_measured": peak, "load_average_before": load_before,
              "load_average_after": load_average(), "quick": args.quick,
              "shape": {"d_model": args.d_model, "layers": args.layers, "seq": args.seq, "batch": args.batch,
                        "routed_experts": args.experts, "experts_per_token": args.experts_per_token},
              "step_time": times, "fwd_bwd_seconds_by_groups": grouped, "load_balance": balance, "plot": repo_relative(plot_path)}
    print("wrote", write_result(args.out, result))


if __name__ == "__main__":
    main()
