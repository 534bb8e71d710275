"""TPU ahead-of-time compile time of the 27B train step at 12 / 30 / 60 layers, scanned vs unrolled.

    python benchmarks/scan_compile.py [--quick] [--topology v4:2x2x1] [--width 128] [--depths 12,30,60]
                                      [--unrolled-depths 30] [--set data.seq_len=256 ...]

Compiles `mhc_jax.train.step.make_sharded_step` for `configs/paper/mhc_27b.yaml` (its block structure: MLA
attention, DeepSeekMoE feed-forward after one dense block, mHC with n = 4 streams, remat full, bf16) on a
small TPU topology from this CPU host (libtpu, no TPU), with a per-device batch small enough to fit (grad_accum
1, FSDP over every device), at several depths, with `model.scan_layers` on and off. The scanned program holds
two block bodies (the dense block, one MoE block in the scan) whatever the depth; the unrolled one holds one
per layer. Times are lower + compile seconds on this host; the results are the ratios in one run (unrolled /
scanned at the same depth; scanned deepest / scanned 12) and, independent of the host's load, the size of
the compiled program (HLO lines) per row.
`--width D` shrinks the model's width only (d_model D, 4 heads of D / 4, d_ff 3D; MLA ranks, experts, depth,
mHC and remat as in the file) so a CPU host finishes; `--set KEY=VALUE` adds any other override (recorded).
`--quick`: a check of the script (width 128, seq 256, vocab 2048, depths 4 and 8; ~6 CPU-minutes).
A small warm-up compile on the topology (not recorded) comes first so libtpu's start-up is in no row. The JSON records
the host (CPU count, load average before and after), the JAX / libtpu versions and every override.
Writes benchmarks/results/scan_compile.json (--out to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from importlib import metadata

# Compile-only: no TPU is opened, so another process's libtpu (another AOT job on this host) does not matter.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from mhc_jax.aot import compile_train_step, for_tpu, tpu_topology  # noqa: E402
from mhc_jax.config import load_config  # noqa: E402

CONFIG = "configs/paper/mhc_27b.yaml"
OVERRIDES = ["data.batch_size=8", "training.grad_accum=1", "mesh.fsdp=-1", "mesh.tensor=1"]


def width_overrides(width: int) -> list[str]:
    if width <= 0:
        return []
    return [f"model.d_model={width}", "model.n_heads=4", "model.n_kv_heads=4", f"model.head_dim={width // 4}",
            f"model.d_ff={3 * width}"]


QUICK = ["data.seq_len=256", "model.vocab_size=2048"]


def compile_seconds(layers: int, scan: bool, devices, extra: list[str]) -> dict[str, float]:
    cfg = for_tpu(load_config(CONFIG, [f"model.n_layers={layers}", f"model.scan_layers={str(scan).lower()}",
                                       *OVERRIDES, *extra]))
    compiled, _, times = compile_train_step(cfg, devices)
    return {"lower_s": times["lower"], "compile_s": times["compile"], "total_s": times["lower"] + times["compile"],
            "hlo_lines": len(compiled.as_text().splitlines())}


def _warm_up(devices) -> None:
    """One small sharded program compiled for the topology (the TPU compiler's start-up)."""
    mesh = Mesh(np.array(devices), ("d",))
    x = jax.ShapeDtypeStruct((8 * len(devices), 128), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("d")))
    jax.jit(lambda a: jnp.tanh(a @ a.T).sum()).lower(x).compile()


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _host() -> dict:
    versions = {}
    for name in ("jax", "jaxlib", "libtpu"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpus": os.cpu_count(), "machine": platform.machine(), "load_average_1m": os.getloadavg()[0],
            **versions}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few-minute check: width 128, seq 256, depths 4, 8")
    p.add_argument("--topology", default="v4:2x2x1")
    p.add_argument("--width", type=int, default=0, help="d_model override (0 = the config's width)")
    p.add_argument("--depths", default="12,30,60", help="depths compiled scanned (comma-separated)")
    p.add_argument("--unrolled-depths", default="30", help="depths also compiled unrolled (the 27B file's is 30)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="further config overrides, recorded in the JSON (e.g. data.seq_len=512)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "scan_compile.json"))
    args = p.parse_args()
    devices = list(tpu_topology(args.topology).devices)
    depths, unrolled = _ints(args.depths), _ints(args.unrolled_depths)
    if args.quick:
        args.width, depths, unrolled, args.set = args.width or 128, (4, 8), (4, 8), QUICK + args.set
    extra = width_overrides(args.width) + args.set
    host = _host()
    _warm_up(devices)  # libtpu's and JAX's start-up costs land in no row
    rows: list[dict] = []
    for layers in depths:
        row: dict = {"layers": layers}
        rows.append(row)
        for scan in (True, False):
            if not scan and layers not in unrolled:
                continue
            row["scanned" if scan else "unrolled"] = compile_seconds(layers, scan, devices, extra)
            _write(args.out, args, len(devices), rows, extra, host)  # partial results survive an interruption
        line = f"{layers:3d} layers: scanned {row['scanned']['total_s']:7.1f} s"
        if "unrolled" in row:
            row["unrolled_over_scanned"] = row["unrolled"]["total_s"] / row["scanned"]["total_s"]
            line += f"  unrolled {row['unrolled']['total_s']:7.1f} s  ratio {row['unrolled_over_scanned']:.1f}x"
        print(line, flush=True)
    host["load_average_1m_after"] = os.getloadavg()[0]
    result = _write(args.out, args, len(devices), rows, extra, host)
    print(f"scanned {depths[-1]}/{depths[0]} layers: {result['scanned_growth_deepest_over_shallowest']:.2f}x; "
          f"wrote {os.path.relpath(args.out)}")


def _write(path: str, args: argparse.Namespace, n_devices: int, rows: list[dict], extra: list[str],
           host: dict) -> dict:
    scanned = [r["scanned"]["total_s"] for r in rows if "scanned" in r]
    result = {"config": CONFIG, "topology": args.topology, "devices": n_devices, "overrides": OVERRIDES + extra,
              "width_override": args.width or None, "host": host, "rows": rows,
              "scanned_growth_deepest_over_shallowest": scanned[-1] / scanned[0] if scanned else None,
              "note": "lower + compile seconds on the CPU host in `host`; compare ratios within this run, "
                      "not times across runs; hlo_lines (the compiled program's size) does not depend on load"}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
