"""Engram at scale on CPU, one run: sparse host-resident tables (engram.update=sparse) of 100k, 1M and 10M
rows per layer against the same model without Engram and against device placement (dense update) at 100k
rows; device bytes of the compiled step per table size; the fraction of the host row gather hidden by the
prefetch thread; and one 10M x 64 table (2.5 GB, plus moments) trained for a few steps.

Goals (issue 19): step time 10M / 100k rows <= 1.05 (cost independent of the table), Engram / no Engram
<= 1.15 at the default shape, compiled device bytes equal across table sizes.

Every step time is the trainer's whole step: next batch (rows fed by the prefetcher) -> jitted step ->
row-wise Adam on the host, synchronised, median over the timed steps. The cases are built first and then
stepped round-robin (one step of each per round), so load that changes during the run falls on all alike.
Host memory: every table size at once, then the 10M x 64 table alone (moments of untouched rows cost no RAM);
measured peak RSS of the whole run 6.1 GB.

    python benchmarks/engram_scale.py --quick
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import resource
import tempfile
import time
from typing import Any

import jax
import numpy as np

from mhc_jax.config import Config, load_config
from mhc_jax.data.tokenizer import ByteTokenizer
from mhc_jax.engram.host_tables import HostTables
from mhc_jax.engram.ids import EngramIds
from mhc_jax.engram.row_prefetch import RowPrefetcher
from mhc_jax.sharding import batch_shardings, global_batch, make_mesh
from mhc_jax.train.optimizer import engram_adam
from mhc_jax.train.state import init_train_state
from mhc_jax.train.step import make_sharded_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")
RESULTS = os.path.join(REPO, "benchmarks", "results", "engram_scale.json")
HEADS = 8  # (max_ngram - 1) * heads_per_ngram of the default config: rows per layer = 8 x table_size


def make_cfg(quick: bool, *, engram: bool = True, rows: int = 100_000, update: str = "sparse",
             layers: tuple[int, ...] = (1, 2), head_dim: int | None = None) -> Config:
    """configs/default.yaml (d=128, 4 layers, mHC n=4, B=16, T=128) with Engram at two layers."""
    over = ["training.steps=1000", "optimizer.warmup_steps=2", "mesh.data=1"]
    if quick:
        over += ["model.d_model=64", "model.d_ff=192", "data.batch_size=8", "data.seq_len=64"]
    cfg = load_config(os.path.join(REPO, "configs", "default.yaml"), over)
    e = {"enabled": engram, "layers": list(layers), "table_size": rows // HEADS,
         "placement": "host" if update == "sparse" else "device", "update": update}
    if head_dim is not None:
        e["head_dim"] = head_dim
    return cfg.replace(engram=e)


def host_batches(cfg: Config, n: int) -> list[dict[str, np.ndarray]]:
    """`n` distinct batches of corpus windows (one document per row) with their Engram ids."""
    with open(CORPUS, encoding="utf-8") as f:
        tokens = np.asarray(ByteTokenizer().encode(f.read()), np.int32)
    B, T = cfg.data.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(0)
    ids = EngramIds(cfg.engram, ByteTokenizer()) if cfg.engram.enabled else None
    out = []
    for _ in range(n):
        starts = rng.integers(0, tokens.size - T - 1, B)
        rows = np.stack([tokens[s:s + T + 1] for s in starts])
        batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:], "segment_ids": np.ones((B, T), np.int32),
                 "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)), "loss_mask": np.ones((B, T), np.float32)}
        if ids is not None:
            batch["engram_ids"] = ids(batch["inputs"], batch["segment_ids"])
        out.append(batch)
    return out


class Cycle:
    def __init__(self, items: list):
        self.items, self.i = items, 0

    def __iter__(self) -> "Cycle":
        return self

    def __next__(self) -> Any:
        item = self.items[self.i % len(self.items)]
        self.i += 1
        return item


def memory_bytes(compiled: Any) -> dict[str, int]:
    m = compiled.memory_analysis()
    return {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
            "temp": int(m.temp_size_in_bytes), "argument_plus_temp": int(m.argument_size_in_bytes + m.temp_size_in_bytes)}


class Case:
    """One configuration, built and compiled, stepped one whole trainer step at a time (`step()`): next
    batch (rows fed by the prefetcher, which then starts the following gather) -> jitted step -> row-wise
    Adam on the host, synchronised. The wait for the gather started during this step is charged to it, so
    a gather the step did not hide costs this case, not the next one stepped."""

    def __init__(self, cfg: Config, batches: list[dict], prefetch: bool = True):
        self.mesh = make_mesh(cfg.mesh, jax.devices()[:1])
        with jax.set_mesh(self.mesh):
            t0 = time.perf_counter()
            graphdef, self.state, shardings = init_train_state(cfg, self.mesh)
            self.tables = (HostTables(cfg.engram, engram_adam(cfg), seed=cfg.training.seed)
                           if cfg.engram.sparse else None)
            self.init_s = time.perf_counter() - t0
            to_device = lambda b: global_batch(b, batch_shardings(b, self.mesh))  # noqa: E731
            self.rows = (None if self.tables is None else
                         RowPrefetcher(Cycle(batches), self.tables, cfg.engram_row_bucket, to_device, prefetch=prefetch))
            self.data = self.rows if self.rows is not None else (to_device(b) for b in Cycle(batches))
            self.batch = next(self.data)
            step = make_sharded_step(graphdef, shardings, batch_shardings(self.batch, self.mesh),
                                     platform=jax.default_backend())
            lowered = step.lower(self.state, self.batch)
            self.compiled = lowered.compile()
        self.sha1 = hashlib.sha1(lowered.as_text().encode()).hexdigest()[:12]
        cost = self.compiled.cost_analysis()
        cost = (cost[0] if isinstance(cost, list) else cost) or {}
        # XLA counts a scanned layer loop's body once: compare FLOPs of unrolled programs only.
        self.cost = {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
                     "scanned": bool(cfg.model.scan_layers and not cfg.engram.enabled)}
        self.cfg, self.times, self.apply_s, self.steps, self.waited_s = cfg, [], [], 0, 0.0
        self.loss = float("nan")

    def step(self, timed: bool) -> None:
        with jax.set_mesh(self.mesh):
            t0 = time.perf_counter()
            if self.steps:
                self.batch = next(self.data)
            self.state, metrics = self.compiled(self.state, self.batch)
            if self.rows is not None:
                jax.block_until_ready(metrics["engram_row_grads"])
                t1 = time.perf_counter()
                self.rows.apply(metrics)
                if timed:
                    self.apply_s.append(time.perf_counter() - t1)
                if self.rows._pending is not None:
                    t2 = time.perf_counter()
                    self.rows._pending.exception()  # the next gather done (or failed: raised by next())
                    self.waited_s += time.perf_counter() - t2
            jax.block_until_ready(metrics["loss"])
            if timed:
                self.times.append(time.perf_counter() - t0)
            self.loss = float(metrics["loss"])
            self.steps += 1

    def result(self) -> dict[str, Any]:
        out = {"step_s": float(np.median(self.times)), "step_s_all": [float(t) for t in self.times],
               "loss": self.loss, "init_s": self.init_s, "device_bytes": memory_bytes(self.compiled),
               "program_sha1": self.sha1, "xla_cost": self.cost}
        if self.rows is not None:
            rows, tables = self.rows, self.tables
            out.update({"gather_ms_per_step": 1e3 * rows.gather_s / rows.steps,
                        "gather_hidden_fraction": 1.0 - min(rows.gather_s, rows.exposed_s + self.waited_s)
                                                  / max(rows.gather_s, 1e-12),
                        "row_adam_ms_per_step": 1e3 * float(np.median(self.apply_s)),
                        "rows_per_layer": tables.n_rows, "host_table_bytes": tables.nbytes,
                        "unique_rows_per_layer": [int(u.size) for u in rows.feed.unique],
                        "row_bucket": self.cfg.engram_row_bucket})
        return out

    def close(self) -> None:
        if self.rows is not None:
            self.rows.close()
        del self.state, self.tables, self.rows, self.compiled
        gc.collect()


def run_interleaved(cases: dict[str, Case], warmup: int, steps: int) -> dict[str, dict[str, Any]]:
    """Steps the cases round-robin, one step each per round, so that load changing during the run (a
    shared machine) falls on every case alike; per-case medians over the timed rounds."""
    for i in range(warmup + steps):
        for case in cases.values():
            case.step(timed=i >= warmup)
    return {name: case.result() for name, case in cases.items()}


def run_case(cfg: Config, batches: list[dict], warmup: int, steps: int) -> dict[str, Any]:
    """One case alone (the big-table run)."""
    case = Case(cfg, batches)
    out = run_interleaved({"case": case}, warmup, steps)["case"]
    case.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, small tables, few steps")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per case (default 10; quick 5)")
    args = parser.parse_args()
    q = args.quick
    # Sparse steps of every table size lower to the same program: the persistent cache compiles it once.
    jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "mhc_jax_engram_scale_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    warmup, steps = (2, 5) if q else (2, 10)
    if args.steps:
        warmup, steps = 1, args.steps
    sizes = (10_000, 100_000, 1_000_000) if q else (100_000, 1_000_000, 10_000_000)
    batches = host_batches(make_cfg(q), 8)
    plain = [{k: v for k, v in b.items() if k != "engram_ids"} for b in batches]

    # Every case built first, then stepped round-robin (run_interleaved): ratios from one stretch of time.
    # The hashed ids depend on the primes, so each table size hashes its own batches.
    built = {"no_engram": Case(make_cfg(q, engram=False), plain),
             # Engram blocks are never stacked, so the Engram models run unrolled: the same baseline unrolled
             "no_engram_unrolled": Case(make_cfg(q, engram=False).replace(model={"scan_layers": False}), plain),
             f"device_dense_{sizes[0]}": Case(make_cfg(q, rows=sizes[0], update="dense"), batches)}
    for rows in sizes:
        cfg = make_cfg(q, rows=rows)
        built[f"sparse_{rows}"] = Case(cfg, host_batches(cfg, 8))
    # The prefetch's effect: the middle table size again with the gather on the critical path.
    cfg = make_cfg(q, rows=sizes[1])
    built[f"sparse_{sizes[1]}_no_prefetch"] = Case(cfg, host_batches(cfg, 8), prefetch=False)
    cases: dict[str, Any] = run_interleaved(built, warmup, steps)
    for case in built.values():
        case.close()
    del built
    print(f"no Engram: {cases['no_engram']['step_s'] * 1e3:.0f} ms/step", flush=True)
    for rows in sizes:
        c = cases[f"sparse_{rows}"]
        print(f"sparse {rows:>10,} rows/layer: {c['step_s'] * 1e3:.0f} ms/step, device arg+temp "
              f"{c['device_bytes']['argument_plus_temp']:,} B, gather {c['gather_ms_per_step']:.1f} ms/step "
              f"({100 * c['gather_hidden_fraction']:.0f}% hidden), row Adam {c['row_adam_ms_per_step']:.1f} ms/step",
              flush=True)
    # Item 5: one table of 10M rows x 64 dims trains (quick: 1M x 64).
    big = sizes[-1]
    cfg64 = make_cfg(q, rows=big, layers=(1,), head_dim=64)
    cases[f"scale_{big}x64"] = run_case(cfg64, host_batches(cfg64, 8), 1, 5 if q else 8)
    print(f"one table {big:,} x 64 ({cases[f'scale_{big}x64']['host_table_bytes'] / 1e9:.2f} GB with moments): "
          f"{cases[f'scale_{big}x64']['step_s'] * 1e3:.0f} ms/step, loss {cases[f'scale_{big}x64']['loss']:.3f}")

    base, small, large = cases["no_engram"], cases[f"sparse_{sizes[0]}"], cases[f"sparse_{sizes[-1]}"]
    ratios = {
        "step_time_largest_over_smallest_table": large["step_s"] / small["step_s"],
        "step_time_engram_sparse_over_no_engram": small["step_s"] / base["step_s"],
        "step_time_engram_sparse_over_no_engram_unrolled": small["step_s"] / cases["no_engram_unrolled"]["step_s"],
        "flops_engram_over_no_engram_unrolled":
            small["xla_cost"]["flops"] / max(cases["no_engram_unrolled"]["xla_cost"]["flops"], 1.0),
        "step_time_engram_sparse_over_device_dense": small["step_s"] / cases[f"device_dense_{sizes[0]}"]["step_s"],
        "device_bytes_equal_across_table_sizes": len({cases[f"sparse_{r}"]["device_bytes"]["argument_plus_temp"]
                                                      for r in sizes}) == 1,
        "same_compiled_program_across_table_sizes": len({cases[f"sparse_{r}"]["program_sha1"] for r in sizes}) == 1,
        "gather_hidden_fraction_largest_table": large["gather_hidden_fraction"],
        "step_time_middle_table_without_over_with_prefetch":
            cases[f"sparse_{sizes[1]}_no_prefetch"]["step_s"] / cases[f"sparse_{sizes[1]}"]["step_s"],
    }
    goals = {"largest_over_smallest_le_1.05": ratios["step_time_largest_over_smallest_table"] <= 1.05,
             "engram_over_no_engram_le_1.15": ratios["step_time_engram_sparse_over_no_engram"] <= 1.15,
             "device_bytes_equal": ratios["device_bytes_equal_across_table_sizes"]}
    cfg = make_cfg(q)
    result = {"device": jax.devices()[0].device_kind, "quick": q, "cpu_count": os.cpu_count(),
              "model": {"d_model": cfg.model.d_model, "n_layers": cfg.model.n_layers, "residual": cfg.residual.kind,
                        "batch": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "engram_layers": list(cfg.engram.layers),
                        "head_dim": cfg.engram.head_dim, "ids_per_position": HEADS},
              "timed_steps": steps, "ratios": ratios, "goals_met": goals, "cases": cases,
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
    print(f"{'ratio':<48} {'value':>8}")
    for k, v in ratios.items():
        print(f"{k:<48} {v!s:>8}" if isinstance(v, bool) else f"{k:<48} {v:>8.3f}")
    print("goals met:", goals)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS.replace(".json", "_quick.json") if q else RESULTS, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {os.path.relpath(RESULTS.replace('.json', '_quick.json') if q else RESULTS, REPO)}")


if __name__ == "__main__":
    main()
