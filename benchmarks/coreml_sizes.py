"""CoreML package sizes, fp16 against N-bit palettized, for a model's graphs, one graph at a time.

Conversion runs on Linux (prediction needs macOS). Writes a graph-free artifacts folder for the model
(tokenizer, scheduler, manifest), converts each graph with `effdiff-export coreml`'s library function,
and prints per graph: package size fp16 and palettized, conversion seconds, peak RSS.

  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/coreml_sizes.py --model sd15-arch --out artifacts/sd15-coreml \
      --graphs text_encoder,vae_decoder,unet_encoder,unet_decoder --palettize 6 --mode uniform
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from effdiff.bench.device import describe, device_profile
from effdiff.export.coreml import COREML_GRAPHS, CoreMLRecipe, export_coreml
from effdiff.export.onnx import write_source_manifest
from effdiff.profiling import PeakRSS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-arch")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--graphs", default=",".join(COREML_GRAPHS))
    parser.add_argument("--palettize", type=int, default=6)
    parser.add_argument("--mode", default="kmeans", help="kmeans (needs scikit-learn) or uniform: same size")
    args = parser.parse_args()
    print(f"device: {describe(device_profile(None))}", flush=True)
    write_source_manifest(args.model, args.out)
    print("| graph | fp16 MiB | palettized MiB | ratio | seconds (both packages) | peak RSS GiB |")
    print("|---|---|---|---|---|---|")
    for graph in args.graphs.split(","):
        recipe = CoreMLRecipe(palettize=args.palettize, palette_mode=args.mode, graphs=(graph,))
        start = time.perf_counter()
        with PeakRSS() as mem:
            report = export_coreml(args.out, recipe, progress=False)
        fp16, pal = (r.size_mib for r in report.results)
        print(
            f"| {graph} | {fp16:.1f} | {pal:.1f} | {pal / fp16:.3f} | {time.perf_counter() - start:.0f} | "
            f"{mem.peak_gib:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
