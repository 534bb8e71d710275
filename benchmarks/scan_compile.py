"""TPU ahead-of-time compile time of the 27B train step at 12 / 30 / 60 layers, scanned vs unrolled.

    python benchmarks/scan_compile.py [--quick] [--topology v4:2x2x2]

Compiles `mhc_jax.train.step.make_sharded_step` for `configs/paper/mhc_27b.yaml` (d_model 2560, mHC n = 4,
remat full, bf16) on a small TPU topology from this CPU host (libtpu, no TPU), with a per-device batch
small enough to fit (8 sequences of 4096, grad_accum 1, 8-way FSDP), at several depths, with
`model.scan_layers` on and off. The compiled program holds one block body per scanned run instead of one
per layer, so its compile time should be flat in depth. Times are lower + compile seconds on this host;
the ratios (unrolled / scanned at the same depth, and scanned 60 / scanned 12) are the result.
`--quick` compiles 12 and 30 layers only. Writes benchmarks/results/scan_compile.json.
"""

from __future__ import annotations

import argparse
import json
import os

from mhc_jax.aot import compile_train_step, for_tpu, tpu_topology
from mhc_jax.config import load_config

CONFIG = "configs/paper/mhc_27b.yaml"


def compile_seconds(layers: int, scan: bool, devices) -> float:
    cfg = for_tpu(load_config(CONFIG, [f"model.n_layers={layers}", f"model.scan_layers={str(scan).lower()}",
                                       "data.batch_size=8", "training.grad_accum=1", "mesh.fsdp=-1",
                                       "mesh.tensor=1"]))
    _, _, times = compile_train_step(cfg, devices)
    return times["lower"] + times["compile"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="12 and 30 layers only")
    p.add_argument("--topology", default="v4:2x2x2")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "scan_compile.json"))
    args = p.parse_args()
    devices = list(tpu_topology(args.topology).devices)
    depths = (12, 30) if args.quick else (12, 30, 60)
    rows: list[dict] = []
    for layers in depths:
        row: dict = {"layers": layers}
        rows.append(row)
        for scan in (True, False):
            row["scanned_s" if scan else "unrolled_s"] = compile_seconds(layers, scan, devices)
            _write(args.out, args.topology, len(devices), rows)  # partial results survive an interruption
        row["unrolled_over_scanned"] = row["unrolled_s"] / row["scanned_s"]
        print(f"{layers:3d} layers: scanned {row['scanned_s']:7.1f} s  unrolled {row['unrolled_s']:7.1f} s  "
              f"ratio {row['unrolled_over_scanned']:.1f}x", flush=True)
    result = _write(args.out, args.topology, len(devices), rows)
    print(f"scanned {depths[-1]}/{depths[0]} layers: {result['scanned_growth_deepest_over_12']:.2f}x; wrote "
          f"{os.path.relpath(args.out)}")


def _write(path: str, topology: str, n_devices: int, rows: list[dict]) -> dict:
    scanned = [r["scanned_s"] for r in rows if "scanned_s" in r]
    result = {"config": CONFIG, "topology": topology, "devices": n_devices,
              "overrides": ["data.batch_size=8", "training.grad_accum=1", "mesh.fsdp=-1", "mesh.tensor=1"],
              "rows": rows, "scanned_growth_deepest_over_12": scanned[-1] / scanned[0] if scanned else None,
              "note": "lower + compile seconds on the CPU host that ran it; compare ratios, not times"}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
