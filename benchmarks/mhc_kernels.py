"""The Pallas mHC kernels (`residual.impl: pallas`, mhc_jax.residual.mhc_pallas) against the XLA path.

    python benchmarks/mhc_kernels.py [--d-model 1024 2048 4096] [--tokens 16384] [--dtype bfloat16]

For each width: the mHC coefficients (fused RMS projection + gates + Sinkhorn; an mHC connection's
`mappings`, parameters randomised) and the stream mixing (H_pre x, then H_res x + H_post^T y), each forward
and forward + backward (jax.vjp applied to a fixed cotangent), kernel vs XLA, on the default backend:
median seconds over interleaved rounds, the kernel/XLA ratio, and the bandwidth the kernel reaches on the
bytes it must move (streams read once, outputs written once). Every case first checks the kernel against
the XLA path (largest difference relative to the largest XLA value, outputs and gradients) and records it.

On CPU the kernels run in Pallas interpret mode: `--smoke` (tiny shape, checks only, no timing) is the CPU
use; interpret-mode timings mean nothing. Writes benchmarks/results/mhc_kernels.json (--out).
"""

from __future__ import annotations

import argparse
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from _common import RESULTS, format_table, interleaved_medians, repo_relative, write_result
from mhc_jax.config import Config
from mhc_jax.residual.base import pre_mix, res_post_mix
from mhc_jax.residual.mhc import ManifoldHyperConnection
from mhc_jax.residual.mhc_pallas import pre_mix_pallas, res_post_mix_pallas


def connection(d: int, n: int, impl: str, variant: str) -> ManifoldHyperConnection:
    cfg = Config().replace(model={"d_model": d, "n_heads": 1, "n_kv_heads": 1},
                           residual={"kind": "mhc", "n_streams": n, "impl": impl, "variant": variant})
    conn = ManifoldHyperConnection(cfg.residual, d, 0, norm_eps=cfg.model.norm_eps, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, var in nnx.iter_graph(conn):  # away from the init: gates and Sinkhorn off their fixed points
        if isinstance(var, nnx.Param):
            shape = np.shape(var[...])
            scale = 1.0 / np.sqrt(shape[0]) if len(shape) == 2 else 0.5
            var[...] = jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)
    return conn


def coefficient_fns(d: int, n: int, variant: str):
    """{impl: (params, x) -> (h_pre, h_post, h_res)} with the same parameters."""
    fns = {}
    for impl in ("xla", "pallas"):
        graphdef, params = nnx.split(connection(d, n, impl, variant))
        fns[impl] = (lambda p, x, g=graphdef: nnx.merge(g, p).mappings(x), params)
    return fns


def mixing_fn(fns):
    pre, post = fns

    def f(x, y, h_pre, h_post, h_res):
        return pre(x, h_pre), post(x, y, h_post, h_res, False)
    return f


def rel_err(got, want) -> float:
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    return max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))))
               / max(float(jnp.max(jnp.abs(w.astype(jnp.float32)))), 1e-30) for g, w in zip(got, want))


def vjp_call(f, args, ct):
    out, vjp = jax.vjp(f, *args)
    return out, vjp(ct)


def case(name: str, fns: dict, args: tuple, args_by_impl: dict | None, timed: bool, rounds: int, calls: int,
         bytes_moved: float, reference=None) -> list[dict]:
    """Forward and forward+backward of fns['xla'] vs fns['pallas'] on args: error, then timing.
    `reference`: forward outputs of higher precision (the XLA path on float32 streams), which both
    implementations' forward errors are also measured against."""
    rows = []
    arg = lambda impl: args_by_impl[impl] + args if args_by_impl else args
    outs = {impl: jax.jit(f)(*arg(impl)) for impl, f in fns.items()}
    rng = np.random.default_rng(1)
    ct = jax.tree.map(lambda o: jnp.asarray(rng.standard_normal(o.shape), o.dtype), outs["xla"])
    for mode in ("forward", "forward+backward"):
        if mode == "forward":
            jitted = {impl: jax.jit(f) for impl, f in fns.items()}
        else:
            jitted = {impl: jax.jit(functools.partial(vjp_call, f), static_argnums=()) for impl, f in fns.items()}
        call = (lambda impl: jitted[impl](*arg(impl))) if mode == "forward" else (
            lambda impl: jitted[impl](arg(impl), ct))
        res = {impl: call(impl) for impl in fns}
        # forward: the outputs; forward+backward: outputs and every gradient (parameters and inputs)
        err = rel_err(res["pallas"], res["xla"])
        row = {"case": name, "mode": mode, "rel_err": err}
        if reference is not None and mode == "forward":
            row.update({f"{impl}_rel_err_vs_f32_streams": rel_err(res[impl], reference) for impl in fns})
        if timed:
            sec = interleaved_medians({impl: functools.partial(call, impl) for impl in fns}, rounds, calls)
            row.update(xla_s=sec["xla"], pallas_s=sec["pallas"], ratio=sec["pallas"] / sec["xla"])
            if mode == "forward":  # the bytes the forward must move, over the kernel's time
                row["pallas_GBps"] = bytes_moved / sec["pallas"] / 1e9
        rows.append(row)
    return rows


def save(args, rows: list[dict]) -> str:
    return write_result(args.out, {"config": {**vars(args), "out": repo_relative(args.out)},
                                   "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                                   "jax": jax.__version__, "rows": rows})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per call (B * T)")
    p.add_argument("--n-streams", type=int, default=4)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="stream dtype")
    p.add_argument("--variant", choices=["paper", "deepseek_v4"], default="paper")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=10, help="calls per timing round")
    p.add_argument("--smoke", action="store_true", help="tiny shape, correctness only (the CPU use)")
    p.add_argument("--out", default=os.path.join(RESULTS, "mhc_kernels.json"))
    args = p.parse_args()
    timed = not args.smoke
    if args.smoke:
        args.d_model, args.tokens = [128], 64
    if jax.default_backend() == "cpu" and timed:
        raise SystemExit("on CPU the kernels run in Pallas interpret mode: use --smoke (checks only)")
    n, N, dt = args.n_streams, args.tokens, jnp.dtype(args.dtype)
    rows = []
    for d in args.d_model:
        rng = np.random.default_rng(d)
        x = jnp.asarray(rng.standard_normal((N, n, d)), dt)
        y = jnp.asarray(rng.standard_normal((N, d)), dt)
        coef = coefficient_fns(d, n, args.variant)
        stream_bytes = N * n * d * dt.itemsize
        rows += case(f"coefficients d={d}", {k: f for k, (f, _) in coef.items()}, (x,),
                     {k: (p_,) for k, (_, p_) in coef.items()}, timed, args.rounds, args.calls,
                     stream_bytes + N * (n * n + 2 * n) * 4,
                     reference=jax.jit(coef["xla"][0])(coef["xla"][1], x.astype(jnp.float32)))
        h_pre, h_post, h_res = jax.jit(coef["xla"][0])(coef["xla"][1], x)
        mix = {"xla": mixing_fn((pre_mix, res_post_mix)), "pallas": mixing_fn((pre_mix_pallas, res_post_mix_pallas))}
        # pre: read x, write C; res/post: read x and y, write nC
        rows += case(f"mixing d={d}", mix, (x, y, h_pre, h_post, h_res), None, timed, args.rounds, args.calls,
                     2 * stream_bytes + 2 * N * d * dt.itemsize + stream_bytes)
        print(f"d={d}: done", flush=True)
        save(args, rows)  # after every width, so a run cut short keeps what it measured

    header = ["case", "mode", "rel. err"] + (["XLA ms", "Pallas ms", "Pallas/XLA", "Pallas GB/s"] if timed else [])
    table = [[r["case"], r["mode"], f"{r['rel_err']:.1e}"] + (
        [1e3 * r["xla_s"], 1e3 * r["pallas_s"], r["ratio"], r.get("pallas_GBps", "")] if timed else []) for r in rows]
    device = jax.devices()[0].device_kind
    print(f"\nmHC Pallas kernels vs XLA: backend={jax.default_backend()} ({device}), jax {jax.__version__}, "
          f"n={n}, tokens={N}, {args.dtype} streams, variant={args.variant}")
    print(format_table(header, table))
    for r in rows:
        if "xla_rel_err_vs_f32_streams" in r:
            print(f"{r['case']}: error vs the XLA path on float32 streams (the same bf16 values): XLA "
                  f"{r['xla_rel_err_vs_f32_streams']:.1e}, Pallas {r['pallas_rel_err_vs_f32_streams']:.1e}")
    print(f"wrote {save(args, rows)}")


if __name__ == "__main__":
    main()
