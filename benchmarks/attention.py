"""Attention forward + backward time and compiled temporary memory against sequence length, dense (xla)
vs blockwise (chunked), causal and with a sliding window.

    python benchmarks/attention.py [--quick]

For each T in 512 .. 16384 it compiles `jax.grad` of one attention call (mhc_jax.model.attention.attend;
batch 1, 2 query heads sharing 1 KV head, head dim 64, float32, the default backend) and records the compiled
temporary bytes (`memory_analysis().temp_size_in_bytes`). It then times the call (median of --repeats runs),
except where the compiled program needs more than --max-run-gib of temporaries (dense attention at long T:
its T x T scores), which is reported as not run. Ratios compare the two implementations at each T, measured
in this one run. Writes benchmarks/results/attention.json and the plot benchmarks/results/plots/attention.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from mhc_jax.model.attention import attend

IMPLS = ("xla", "chunked")
HERE = os.path.dirname(os.path.abspath(__file__))


def make_inputs(T: int, heads: int, kv_heads: int, head_dim: int) -> tuple[jax.Array, ...]:
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (1, T, heads, head_dim), jnp.float32)
    k = jax.random.normal(ks[1], (1, T, kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(ks[2], (1, T, kv_heads, head_dim), jnp.float32)
    w = jax.random.normal(ks[3], (1, T, heads, head_dim), jnp.float32)  # a fixed output cotangent
    seg = jnp.ones((1, T), jnp.int32)
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    return q, k, v, w, seg, pos


def measure(impl: str, T: int, window: int, args: argparse.Namespace) -> dict:
    q, k, v, w, seg, pos = make_inputs(T, args.heads, args.kv_heads, args.head_dim)

    def loss(q, k, v):
        return jnp.sum(attend(q, k, v, seg, pos, impl=impl, window=window, block=args.block) * w)

    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    t0 = time.perf_counter()
    compiled = fwd_bwd.lower(q, k, v).compile()
    compile_s = time.perf_counter() - t0
    temp = int(compiled.memory_analysis().temp_size_in_bytes)
    row = {"impl": impl, "T": T, "window": window, "temp_bytes": temp, "compile_s": compile_s, "time_s": None}
    if temp > args.max_run_gib * 2**30:
        row["skipped"] = f"temporaries {temp / 2**30:.1f} GiB > --max-run-gib {args.max_run_gib}"
        return row
    if T <= 4096:
        jax.block_until_ready(compiled(q, k, v))  # warm-up (already compiled; long runs need none)
    times = []
    for _ in range(args.repeats if T <= 4096 else 1):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - t0)
    row["time_s"] = statistics.median(times)
    return row


def plot(rows: list[dict], path: str, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl in IMPLS:
        for window in sorted({r["window"] for r in rows}):
            sel = [r for r in rows if r["impl"] == impl and r["window"] == window]
            label = f"{impl}" + (f", window {window}" if window else ", causal")
            style = "-" if impl == "chunked" else "--"
            marker = "o" if window == 0 else "s"
            timed = [r for r in sel if r["time_s"] is not None]
            ax_t.plot([r["T"] for r in timed], [r["time_s"] * 1e3 for r in timed], style, marker=marker, label=label)
            ax_m.plot([r["T"] for r in sel], [r["temp_bytes"] / 2**20 for r in sel], style, marker=marker, label=label)
    for ax, ylabel in ((ax_t, "forward + backward time (ms)"), (ax_m, "compiled temporary memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"attention fwd+bwd on {jax.default_backend()} (B=1, {args.heads} heads / {args.kv_heads} KV heads, "
                 f"D={args.head_dim}, float32)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="T up to 2048, one timed run each")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--window", type=int, default=1024, help="the sliding window of the windowed runs")
    p.add_argument("--block", type=int, default=512, help="chunked block length")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-run-gib", type=float, default=1.5, help="do not run programs needing more temporaries")
    p.add_argument("--out", default=os.path.join(HERE, "results", "attention.json"))
    p.add_argument("--plot", default=os.path.join(HERE, "results", "plots", "attention.png"))
    args = p.parse_args()
    if args.quick:
        args.lengths, args.repeats = [T for T in args.lengths if T <= 2048], 1

    rows = []
    for T in args.lengths:
        for window in (0, args.window):
            for impl in IMPLS:
                rows.append(measure(impl, T, window, args))
                r = rows[-1]
                took = "not run" if r["time_s"] is None else f"{r['time_s'] * 1e3:9.1f} ms"
                print(f"  {impl:8s} T={T:6d} window={window:5d} temp={r['temp_bytes'] / 2**20:9.1f} MiB time={took}",
                      flush=True)

    def find(impl, T, window):
        return next(r for r in rows if (r["impl"], r["T"], r["window"]) == (impl, T, window))

    ratios = []
    print(f"\nbackend={jax.default_backend()} heads={args.heads}/{args.kv_heads} D={args.head_dim} block={args.block}; "
          "ratios are xla / chunked in this run (> 1: chunked better)")
    print(f"{'T':>6s} {'window':>6s} {'time xla/chunked':>17s} {'temp xla/chunked':>17s} {'chunked temp MiB':>17s}")
    for T in args.lengths:
        for window in (0, args.window):
            x, c = find("xla", T, window), find("chunked", T, window)
            time_ratio = x["time_s"] / c["time_s"] if x["time_s"] and c["time_s"] else None
            entry = {"T": T, "window": window, "time_xla_over_chunked": time_ratio,
                     "temp_xla_over_chunked": x["temp_bytes"] / c["temp_bytes"]}
            ratios.append(entry)
            print(f"{T:6d} {window:6d} {'not run' if time_ratio is None else f'{time_ratio:.2f}':>17s} "
                  f"{entry['temp_xla_over_chunked']:17.1f} {c['temp_bytes'] / 2**20:17.1f}")
    chunked_causal = [find("chunked", T, 0) for T in args.lengths]
    growth = [b["temp_bytes"] / a["temp_bytes"] for a, b in zip(chunked_causal, chunked_causal[1:])]
    print("chunked temp growth per doubling of T: " + ", ".join(f"{g:.2f}" for g in growth) + " (linear: <= 2)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "plot")}
    with open(args.out, "w") as f:
        json.dump({"config": config, "backend": jax.default_backend(), "rows": rows, "ratios": ratios,
                   "chunked_temp_growth_per_doubling": growth, "plot": os.path.relpath(args.plot, HERE)}, f, indent=2)
    plot(rows, args.plot, args)
    print(f"\nwrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
