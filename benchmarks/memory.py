"""Where the memory goes: per graph and variant, weights on disk, RSS added by creating its ONNX Runtime
session, the peak during creation, and the peak while it runs at a given size; then the effect of each
ONNX Runtime option that matters on memory and speed.

Every measurement runs in a fresh process, so one graph's allocations never hide another's.

  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory.py --artifacts artifacts/sd15-arch --size 512 \
      [--graphs unet_encoder,unet_decoder] [--variants fp32,int8] [--options default,lean]
  (SD1.5 architecture: ~1 minute per graph and option set on 2 cores; prints a markdown table and
   writes benchmarks/results/memory_<artifacts>_<size>.json)

`--variants fp32-w16 --options default,keep-fp16` measures the fp32 graph with its weights stored fp16
(the variant `effdiff-export fp16-weights` writes): folded back to fp32 copies at session creation
(ONNX Runtime's defaults), or kept fp16 and cast at every call.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from effdiff.artifacts import Manifest
from effdiff.runtime.backends.ort import CPU_DEFAULT_OPTIONS, KEEP_FP16_WEIGHTS
from effdiff.runtime.memory import LEAN_OPTIONS
from effdiff.specs import GraphSpec

# ONNX Runtime session options tried (`config:` entries are session config keys).
OPTION_SETS: dict[str, dict[str, object]] = {
    "default": {},
    "no-arena": {"enable_cpu_mem_arena": False},
    "no-mem-pattern": {"enable_mem_pattern": False},
    "no-prepack": {"config:session.disable_prepacking": "1"},
    "opt-basic": {"graph_optimization_level": "ORT_ENABLE_BASIC"},
    "lean": {
        "enable_cpu_mem_arena": False,
        "enable_mem_pattern": False,
        "config:session.disable_prepacking": "1",
    },
    # lean, but every graph on one arena shared by the sessions of the process, growing by what is asked
    "lean-shared": {
        "enable_mem_pattern": False,
        "config:session.disable_prepacking": "1",
        "shared_arena": True,
    },
    # the same with the memory pattern on (its planned blocks come from the shared arena)
    "shared-pattern": {
        "config:session.disable_prepacking": "1",
        "shared_arena": True,
        "enable_mem_pattern": True,
    },
    # ONNX Runtime's defaults, but every graph on the shared arena instead of an arena of its own each:
    # the runtime's CPU default before the memory pattern went off on that arena
    "shared": {"shared_arena": True, "enable_mem_pattern": True},
    # the same without the memory pattern (what a graph on the shared arena gets unless told otherwise):
    # blocks come from the arena as each tensor asks, not one block sized for the whole run's peak
    "shared-no-pattern": {"shared_arena": True},
    # lean, but with the memory pattern on: with no arena, its planned block comes from the system for
    # each run and goes back after it
    "lean-pattern": {
        "enable_cpu_mem_arena": False,
        "config:session.disable_prepacking": "1",
    },
    # neither an arena nor the memory pattern: every tensor from the system allocator and back
    "no-arena-no-pattern": {"enable_cpu_mem_arena": False, "enable_mem_pattern": False},
    # keep the fp16 weights of a `fp32-w16` graph fp16 in memory: no constant folding (which turns each
    # Cast of an fp16 initializer into an fp32 copy) and no layout optimizations (level 3 folds them
    # too, whatever optimizers are disabled); the Casts then run at every call
    "keep-fp16": {
        "graph_optimization_level": "ORT_ENABLE_EXTENDED",
        "config:optimization.disable_specified_optimizers": "ConstantFolding",
    },
    # constant folding turns the fp16 weights of INT8 graphs' float layers into fp32 copies at load
    "no-fold": {"config:optimization.disable_specified_optimizers": "ConstantFolding"},
}
OPTION_SETS["lean-no-fold"] = {**OPTION_SETS["lean"], **OPTION_SETS["no-fold"]}
OPTION_SETS["keep-fp16-no-arena"] = {
    **OPTION_SETS["keep-fp16"],
    "enable_cpu_mem_arena": False,
    "enable_mem_pattern": False,
}
# the runtime's own lean options (effdiff.runtime.memory.LEAN_OPTIONS), and the same with fp16-stored
# weights (INT8 graphs' float layers) folded into fp32 copies as ONNX Runtime does by default
OPTION_SETS["runtime-lean"] = dict(LEAN_OPTIONS)
# the runtime's CPU default (effdiff.runtime.backends.ort.CPU_DEFAULT_OPTIONS): UNet graphs on the
# shared arena without the memory pattern, the text encoder and VAE on no arena
OPTION_SETS["runtime-default"] = dict(CPU_DEFAULT_OPTIONS)
# the text encoder's and VAE's default (no arena) at lower optimization levels: without level 3's NCHWc
# layout (and the reorders around every chain of convolutions)
OPTION_SETS["no-arena-extended"] = {
    "enable_cpu_mem_arena": False,
    "graph_optimization_level": "ORT_ENABLE_EXTENDED",
}
OPTION_SETS["no-arena-basic"] = {
    "enable_cpu_mem_arena": False,
    "graph_optimization_level": "ORT_ENABLE_BASIC",
}
# A graph on no arena runs without buffer reuse unless told (effdiff.runtime.backends.ort), so
# `no-arena` above is without it; `no-arena-reuse` is with it (the runtime's default before)
OPTION_SETS["no-arena-reuse"] = {"enable_cpu_mem_arena": False, "enable_mem_reuse": True}
OPTION_SETS["runtime-default-reuse"] = {**CPU_DEFAULT_OPTIONS, "enable_mem_reuse": True}
OPTION_SETS["no-arena-no-pattern-reuse"] = {**OPTION_SETS["no-arena-no-pattern"], "enable_mem_reuse": True}
# ONNX Runtime's planner otherwise hands a dead tensor's buffer to a later tensor of the same size, and the
# buffer is held, unused, in between: without reuse every tensor gets its own allocation, returned when
# it dies (to the system with no arena, to the shared arena's free blocks on it)
OPTION_SETS["no-arena-no-reuse"] = {"enable_cpu_mem_arena": False, "enable_mem_reuse": False}
OPTION_SETS["no-arena-no-pattern-no-reuse"] = {
    **OPTION_SETS["no-arena-no-reuse"],
    "enable_mem_pattern": False,
}
OPTION_SETS["shared-no-reuse"] = {"shared_arena": True, "enable_mem_reuse": False}
OPTION_SETS["runtime-lean-fold-fp16"] = {**LEAN_OPTIONS, KEEP_FP16_WEIGHTS: False}


def session_options(option_set: str) -> dict[str, object]:
    """The option set's session options, with an optimization level's name turned into ONNX Runtime's."""
    import onnxruntime as ort

    options = dict(OPTION_SETS[option_set])
    if "graph_optimization_level" in options:
        options["graph_optimization_level"] = getattr(
            ort.GraphOptimizationLevel, str(options["graph_optimization_level"])
        )
    return options


def sample_feeds(manifest: Manifest, spec: GraphSpec, size: int, rows: int) -> dict:
    """Random inputs for one run of the graph at `size` pixels square and `rows` batch rows."""
    import numpy as np

    lat = size // manifest.geometry.vae_factor
    feeds = spec.sample_inputs(rows, lat, lat, np.random.default_rng(0), timesteps=np.full(rows, 501.0))
    if "input_ids" in feeds:
        feeds["input_ids"] = np.minimum(feeds["input_ids"], 400)
    return feeds


def measure_one(artifacts: Path, graph: str, variant: str, option_set: str, size: int, rows: int) -> dict:
    """In this process: create the session, then run it twice at the size; RSS figures in GiB."""
    from effdiff.profiling import PeakRSS
    from effdiff.runtime.backends.ort import OrtGraph

    manifest = Manifest.read(artifacts)
    var = manifest.variant(graph, variant)
    spec = manifest.spec(graph, var)
    path, disk = artifacts / var.file, var.size_bytes
    options = session_options(option_set)
    feeds = sample_feeds(manifest, spec, size, rows)
    with PeakRSS(0.002) as create:
        start = time.perf_counter()
        session = OrtGraph(path, spec, options=options)
        create_s = time.perf_counter() - start
    import psutil

    steady = psutil.Process().memory_info().rss
    times = []
    with PeakRSS(0.002) as running:
        for _ in range(2):
            start = time.perf_counter()
            session.run(feeds)
            times.append(time.perf_counter() - start)
    after = psutil.Process().memory_info().rss
    return {
        "graph": graph,
        "variant": variant,
        "options": option_set,
        "size": size,
        "rows": rows,
        "disk_gib": disk / 2**30,
        "base_gib": create.baseline_bytes / 2**30,
        "session_added_gib": (steady - create.baseline_bytes) / 2**30,
        "create_peak_added_gib": (create.peak_bytes - create.baseline_bytes) / 2**30,
        "run_peak_added_gib": (running.peak_bytes - create.baseline_bytes) / 2**30,
        "after_run_added_gib": (after - create.baseline_bytes) / 2**30,
        "create_s": create_s,
        "run_s": min(times),
    }


def fresh_row(script: str, artifacts: Path, options: list[str], label: str) -> dict | None:
    """One measurement in a fresh process (`script --one --artifacts ... OPTIONS`, which prints its row
    as JSON on its last line): the row, printed as it comes, or None with the failure printed."""
    cmd = [sys.executable, script, "--one", "--artifacts", str(artifacts), *options]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{label}: failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--size", type=int, default=512, help="image size in pixels")
    parser.add_argument("--rows", type=int, default=2, help="batch rows (2 = one image with CFG)")
    parser.add_argument(
        "--graphs", default="text_encoder,unet_encoder,unet_decoder,unet,unet_shallow,vae_decoder"
    )
    parser.add_argument("--variants", default="fp32", help="manifest variants (fp32, int8, fp32-w16 ...)")
    parser.add_argument("--options", default="default,lean")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if args.one:
        graph, variant, option_set = args.graphs, args.variants, args.options
        row = measure_one(args.artifacts, graph, variant, option_set, args.size, args.rows)
        print(json.dumps(row))
        return
    from effdiff.bench.device import describe, device_profile

    results = []
    print(f"machine: {describe(device_profile())}", flush=True)
    for variant in args.variants.split(","):
        for graph in args.graphs.split(","):
            for option_set in args.options.split(","):
                options = ["--size", str(args.size), "--rows", str(args.rows), "--graphs", graph]
                options += ["--variants", variant, "--options", option_set]
                row = fresh_row(__file__, args.artifacts, options, f"{graph} {variant} {option_set}")
                if row is not None:
                    results.append(row)
    lines = [
        f"| graph | variant | options | disk GiB | session added GiB | creation peak GiB | run peak GiB "
        f"({args.size}px, {args.rows} rows) | create s | run s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['graph']} | {r['variant']} | {r['options']} | {r['disk_gib']:.2f} | "
            f"{r['session_added_gib']:.2f} | {r['create_peak_added_gib']:.2f} | "
            f"{r['run_peak_added_gib']:.2f} | {r['create_s']:.1f} | {r['run_s']:.2f} |"
        )
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"memory_{args.artifacts.name}_{args.size}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
