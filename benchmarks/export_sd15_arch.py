"""Export the SD1.5 architecture (random weights, 860 M-parameter UNet): time and peak RSS per graph.

Shows that an SD1.5-size model exports and validates on a 24 GB, 2-core machine, one graph at a time.
Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/export_sd15_arch.py --out artifacts/sd15-arch
(about 15-25 minutes on 2 CPU cores; not run in CI)
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import psutil

from effdiff.export.onnx import ExportRecipe, export_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("artifacts/sd15-arch"))
    parser.add_argument("--size", type=int, default=256, help="image size validated (pixels)")
    parser.add_argument("--attention", default="standard", choices=["standard", "fused"])
    args = parser.parse_args()
    start = time.perf_counter()
    report = export_onnx(
        "sd15-arch",
        args.out,
        ExportRecipe(height=args.size, width=args.size, attention=args.attention),
        log=print,
    )
    total = time.perf_counter() - start
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    )
    print(
        f"{'graph':<14} {'export+validate s':>18} {'peak RSS GiB':>13} {'size MiB':>9} {'worst rel L2':>13}"
    )
    for res in report.results:
        variant = report.manifest.variants(res.graph).get("fp32")
        size = variant.size_bytes / 2**20 if variant else 0.0
        worst = max(c.rel_l2 for c in res.comparisons)
        print(f"{res.graph:<14} {res.seconds:>18.1f} {res.peak_rss_gib:>13.2f} {size:>9.0f} {worst:>13.2e}")
    print(
        f"total {total:.0f} s (includes building the random-weight model on first run); all within "
        f"tolerance: {report.passed}"
    )


if __name__ == "__main__":
    main()
