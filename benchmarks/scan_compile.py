"""TPU ahead-of-time compile time of the 27B train step at 12 / 30 / 60 layers, scanned vs unrolled.

    python benchmarks/scan_compile.py [--quick] [--topology v4:2x2x2] [--width 256] [--unrolled-max 30]
                                      [--set data.seq_len=512 ...]

Compiles `mhc_jax.train.step.make_sharded_step` for `configs/paper/mhc_27b.yaml` (d_model 2560, mHC n = 4,
remat full, bf16) on a small TPU topology from this CPU host (libtpu, no TPU), with a per-device batch
small enough to fit (8 sequences of 4096, grad_accum 1, 8-way FSDP), at several depths, with
`model.scan_layers` on and off. The compiled program holds one block body per scanned run instead of one
per layer, so its compile time should be flat in depth. Times are lower + compile seconds on this host;
the ratios (unrolled / scanned at the same depth, and scanned 60 / scanned 12) are the result.
`--quick` compiles 12 and 30 layers only. `--width D` shrinks the model's width only (d_model D, 4 heads of
D / 4, d_ff 3D; depth, sequence, vocabulary, mHC and remat as in the file) so a loaded CPU host finishes;
`--unrolled-max N` compiles the unrolled program only up to N layers (the scanned one at every depth);
`--set KEY=VALUE` adds any other override (recorded in the JSON).
A warm-up compile (2 layers, not recorded) comes first so libtpu's start-up is in no row.
Writes benchmarks/results/scan_compile.json.
"""

from __future__ import annotations

import argparse
import json
import os

from mhc_jax.aot import compile_train_step, for_tpu, tpu_topology
from mhc_jax.config import load_config

CONFIG = "configs/paper/mhc_27b.yaml"
OVERRIDES = ["data.batch_size=8", "training.grad_accum=1", "mesh.fsdp=-1", "mesh.tensor=1"]


def width_overrides(width: int) -> list[str]:
    if width <= 0:
        return []
    return [f"model.d_model={width}", "model.n_heads=4", "model.n_kv_heads=4", f"model.head_dim={width // 4}",
            f"model.d_ff={3 * width}"]


def compile_seconds(layers: int, scan: bool, devices, extra: list[str]) -> dict[str, float]:
    cfg = for_tpu(load_config(CONFIG, [f"model.n_layers={layers}", f"model.scan_layers={str(scan).lower()}",
                                       *OVERRIDES, *extra]))
    _, _, times = compile_train_step(cfg, devices)
    return {"lower_s": times["lower"], "compile_s": times["compile"], "total_s": times["lower"] + times["compile"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="12 and 30 layers only")
    p.add_argument("--topology", default="v4:2x2x2")
    p.add_argument("--width", type=int, default=0, help="d_model override (0 = the config's width)")
    p.add_argument("--unrolled-max", type=int, default=60, help="deepest unrolled program compiled")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="further config overrides, recorded in the JSON (e.g. data.seq_len=512)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "scan_compile.json"))
    args = p.parse_args()
    devices = list(tpu_topology(args.topology).devices)
    depths = (12, 30) if args.quick else (12, 30, 60)
    extra = width_overrides(args.width) + args.set
    compile_seconds(2, True, devices, extra)  # warm-up: libtpu and JAX start-up costs land in no row
    rows: list[dict] = []
    for layers in depths:
        row: dict = {"layers": layers}
        rows.append(row)
        for scan in (True, False):
            if not scan and layers > args.unrolled_max:
                continue
            row["scanned" if scan else "unrolled"] = compile_seconds(layers, scan, devices, extra)
            _write(args.out, args, len(devices), rows, extra)  # partial results survive an interruption
        line = f"{layers:3d} layers: scanned {row['scanned']['total_s']:7.1f} s"
        if "unrolled" in row:
            row["unrolled_over_scanned"] = row["unrolled"]["total_s"] / row["scanned"]["total_s"]
            line += f"  unrolled {row['unrolled']['total_s']:7.1f} s  ratio {row['unrolled_over_scanned']:.1f}x"
        print(line, flush=True)
    result = _write(args.out, args, len(devices), rows, extra)
    print(f"scanned {depths[-1]}/{depths[0]} layers: {result['scanned_growth_deepest_over_12']:.2f}x; wrote "
          f"{os.path.relpath(args.out)}")


def _write(path: str, args: argparse.Namespace, n_devices: int, rows: list[dict], extra: list[str]) -> dict:
    scanned = [r["scanned"]["total_s"] for r in rows if "scanned" in r]
    result = {"config": CONFIG, "topology": args.topology, "devices": n_devices, "overrides": OVERRIDES + extra,
              "width_override": args.width or None, "rows": rows,
              "scanned_growth_deepest_over_12": scanned[-1] / scanned[0] if scanned else None,
              "note": "lower + compile seconds on the CPU host that ran it (shared, loaded); compare ratios "
                      "within this run, not times"}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
