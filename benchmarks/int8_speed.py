"""INT8 UNet graphs: size on disk, session creation (time, peak RSS) and time per call, fp32 against
static INT8 (TensorRT layout and ONNX Runtime CPU layout) and dynamic INT8, on this machine's CPU.

  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/int8_speed.py --artifacts artifacts/sd15-arch \
      --work artifacts/int8-sd15-arch                                       # SD1.5 architecture, 256x256
  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/int8_speed.py --artifacts artifacts/reference \
      --work artifacts/int8-reference --steps 50 --propagation fd-ddim50 --samples 64 --chunk 8

Each INT8 kind is made in the artifacts folder from the same calibration set, then its INT8 files are
copied to WORK/KIND (the artifacts folder keeps the last kind's). Each (kind, graph) is measured in a
fresh process: session creation time and peak RSS, then `--warmup` untimed and `--repeat` timed calls
at 2 rows (one image with CFG) at the export size, 2 threads. Kinds run one after another, so compare
ratios from one run only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from int8_reference import machine  # benchmarks/ is this script's folder, so it is on sys.path

from effdiff.artifacts import MANIFEST, Manifest
from effdiff.calib.capture import CaptureSettings, default_guidance, default_prompts
from effdiff.calib.quantize import QuantizeOptions, quantize_artifacts

KINDS = {
    "static": QuantizeOptions(method="minmax"),
    "static-fp32w": QuantizeOptions(method="minmax", float_weights="fp32"),  # float layers stored fp32
    "static-cpu": QuantizeOptions(method="minmax", target="cpu"),
    "dynamic": QuantizeOptions(mode="dynamic"),
}

MEASURE = textwrap.dedent(
    """
    import json, statistics, sys, time
    import numpy as np
    from effdiff.artifacts import Manifest
    from effdiff.profiling import PeakRSS
    from effdiff.runtime.backends.ort import OrtBackend
    folder, graph, variant = sys.argv[1:4]
    warmup, repeat = int(sys.argv[4]), int(sys.argv[5])
    m = Manifest.read(folder)
    v = m.variant(graph, variant)
    spec = m.spec(graph, v)
    h, w = m.export_size
    feeds = spec.sample_inputs(2, h, w, np.random.default_rng(0), timesteps=np.array([500.0]))
    with PeakRSS() as mem:
        t = time.perf_counter()
        g = OrtBackend(["CPUExecutionProvider"], threads=2).open(f"{folder}/{v.file}", spec)
        create = time.perf_counter() - t
    for _ in range(warmup):
        g.run(feeds)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        g.run(feeds)
        times.append(time.perf_counter() - t)
    out = {"create_s": create, "rss_gib": mem.peak_bytes / 2**30, "median": statistics.median(times)}
    print(json.dumps({**out, "min": min(times), "max": max(times)}))
    """
)


def quantize_kind(
    base: Path, dest: Path, options: QuantizeOptions, settings: CaptureSettings, calib_dir: Path
) -> None:
    """Quantize in the base folder (onnx refuses hard-linked external data), then copy the INT8 files
    and the manifest to `dest`, which the measurement reads. Kept when `dest` holds INT8 made from the
    base's current fp32 graphs with the same options."""
    base_manifest = Manifest.read(base)
    if (dest / MANIFEST).exists():
        old = Manifest.read(dest)
        same = all(
            "int8" in old.variants(g)
            and old.variant(g, "int8").meta.get("source_sha256")
            == base_manifest.variant(g, "fp32").files[base_manifest.variant(g, "fp32").file].sha256
            and old.variant(g, "int8").meta.get("mode") == options.mode
            and (
                options.mode == "dynamic"
                or old.variant(g, "int8").meta.get("target", "tensorrt") == options.target
            )
            for g in options.graphs
        )
        if same:
            print(f"{dest.name}: kept", flush=True)
            return
    report = quantize_artifacts(base, options, settings, calib_dir, progress=False)
    print(f"\n{dest.name}:\n{report.table()}", flush=True)
    dest.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.read(base)
    for graph in options.graphs:
        for name in manifest.variant(graph, "int8").files:
            shutil.copy2(base / name, dest / name)
    manifest.write(dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--kinds", default="dynamic,static-cpu,static")
    parser.add_argument("--graphs", default="unet_encoder,unet_decoder,unet")
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--propagation", default="0,3,6")
    parser.add_argument("--chunk", type=int, default=2, help="prompts per capture run (memory)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    graphs = tuple(args.graphs.split(","))
    kinds = args.kinds.split(",")
    print(f"machine: {machine()}", flush=True)
    settings = CaptureSettings(
        prompts=tuple(default_prompts()),
        samples=args.samples,
        per_prompt=min(8, max(1, args.samples // 2)),
        steps=args.steps,
        propagation=args.propagation,
        guidance=default_guidance(args.artifacts),
        chunk=args.chunk,
    )
    folders = {"fp32": args.artifacts}
    for kind in kinds:
        folders[kind] = args.work / kind
        options = dataclasses.replace(KINDS[kind], graphs=graphs)
        quantize_kind(args.artifacts, folders[kind], options, settings, args.work / "calibration")

    print(
        "\n| graph | variant | MiB on disk | smaller | session create s | peak RSS at creation GiB | s/call "
        "median (min-max) | speed-up vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    for graph in graphs:
        base = None
        for kind, folder in folders.items():
            variant = "fp32" if kind == "fp32" else "int8"
            size = Manifest.read(folder).variant(graph, variant).size_bytes
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    MEASURE,
                    str(folder),
                    graph,
                    variant,
                    str(args.warmup),
                    str(args.repeat),
                ],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            if proc.returncode != 0:
                print(f"| {graph} | {kind} | failed: {proc.stderr.strip().splitlines()[-1:]} |", flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            base = (size, r["median"]) if kind == "fp32" else base
            ratio = f"{base[0] / size:.2f}x" if base else "—"
            speed = f"{base[1] / r['median']:.2f}x" if base else "—"
            print(
                f"| {graph} | {kind} | {size / 2**20:.0f} | {ratio} | {r['create_s']:.1f} | "
                f"{r['rss_gib']:.2f} | "
                f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f}) | {speed} |",
                flush=True,
            )
    print(f"\nmachine after: {machine()}")


if __name__ == "__main__":
    main()
