"""INT8 (and fp16-stored weights) on the reference model: prompt adherence of `int8`, `fd+int8`,
`cache:3+int8` and the `fp16 weights` rows against fp32
(held-in and held-out, 95 % Wilson intervals, final-image PSNR against the fp32 image of the same path), the
calibration ablation (random inputs / whole-UNet inputs only / what each half sees under propagation),
and what each calibration method costs.

  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/int8_reference.py            # all of it
  ... --skip-ablation --skip-methods --splits held-in                       # the main table only
  ... --configs cache:3,cache:3+int8 --count 32 ...                         # some rows, fewer prompts

Re-runnable: artifacts copies per calibration source live under --work; INT8 graphs already made from
the same fp32 graph, calibration and options are kept, and generated images are cached by a key that
includes the INT8 variants' recipe keys, so after the reference model is replaced (v2) the same
command re-exports, re-quantizes and re-measures everything that changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image
from reference_quality import generate  # benchmarks/ is this script's folder, so it is on sys.path

from effdiff.artifacts import W16_TAG, Manifest
from effdiff.calib.capture import CaptureSettings, default_prompts
from effdiff.calib.quantize import QuantizeOptions, quantize_artifacts
from effdiff.compare import psnr
from effdiff.export.onnx import export_onnx
from effdiff.export.weights import store_weights_fp16
from effdiff.reference.judge import Adherence, AttributeClassifier
from effdiff.reference.scenes import REFERENCE_GUIDANCE, held_in_scenes, held_out_scenes
from effdiff.runtime.backends.ort import OrtBackend
from effdiff.runtime.memory import LEAN_OPTIONS
from effdiff.runtime.pipeline import Pipeline
from effdiff.runtime.propagation import KeySchedule

SOURCES = {
    "propagation": "(c) each half under propagation",
    "whole": "(b) whole-UNet inputs",
    "random": "(a) random",
}


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(next((ln for ln in text.splitlines() if ln.startswith("flags")), "").split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/vnni"


def machine() -> str:
    model = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    return (
        f"{model}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"flags: {cpu_flags()}, load average {psutil.getloadavg()[0]:.1f}"
    )


def copy_fp32(base: Path, dest: Path) -> None:
    """A folder with the base export's fp32 files and a manifest without INT8 variants."""
    if (dest / "manifest.json").exists():
        return
    ignore = shutil.ignore_patterns("calibration", "*.int8.onnx*", ".tmp-*", ".effdiff.lock")
    shutil.copytree(base, dest, ignore=ignore, dirs_exist_ok=True)
    data = json.loads((dest / "manifest.json").read_text())
    for graph in data["graphs"].values():
        graph["variants"].pop("int8", None)
    (dest / "manifest.json").write_text(json.dumps(data, indent=2))


def images_for(
    pipe: Pipeline, scenes: list, args: argparse.Namespace, propagation: str, cache: Path, key: str
) -> list[Image.Image]:
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache / f"{digest}.npz"
    if path.exists():
        with np.load(path) as data:
            return [Image.fromarray(a) for a in data["images"]]
    images = generate(pipe, scenes, args.seed, args.steps, args.guidance, propagation)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=np.stack([np.asarray(im) for im in images]))
    tmp.replace(path)
    return images


def mean_psnr(images: list[Image.Image], reference: list[Image.Image]) -> float:
    pairs = zip(images, reference, strict=True)
    return float(np.mean([min(psnr(np.asarray(a), np.asarray(b)), 99.0) for a, b in pairs]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/reference"))
    parser.add_argument("--work", type=Path, default=Path("artifacts/int8-reference"))
    parser.add_argument("--count", type=int, default=192)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=REFERENCE_GUIDANCE)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--method", default="percentile")
    parser.add_argument("--splits", default="held-in,held-out")
    parser.add_argument("--skip-ablation", action="store_true")
    parser.add_argument("--skip-methods", action="store_true")
    parser.add_argument("--configs", default="", help="only these rows of the main table (comma-separated)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(
        f"DDIM {args.steps}, guidance {args.guidance}, seed {args.seed}, "
        f"calibration samples {args.samples}\n",
        flush=True,
    )
    export_onnx("reference", args.artifacts, progress=False)
    settings = CaptureSettings(
        prompts=tuple(default_prompts()), samples=args.samples, steps=args.steps, guidance=args.guidance
    )
    calib_dir = args.work / "calibration"
    sources = ["propagation"] if args.skip_ablation else list(SOURCES)
    folders, reports = {}, {}
    for source in sources:
        folder = args.work / f"reference-{source}"
        copy_fp32(args.artifacts, folder)
        start = time.perf_counter()
        reports[source] = quantize_artifacts(
            folder, QuantizeOptions(method=args.method, source=source), settings, calib_dir, progress=False
        )
        print(f"[{source}: {time.perf_counter() - start:.0f} s]\n{reports[source].table()}\n", flush=True)
        folders[source] = folder

    print("### Per-graph relative L2 against fp32 on held-out captured inputs\n")
    graphs = [r.graph for r in reports["propagation"].results]
    print(f"| calibrated on | {' | '.join(graphs)} |")
    print("|---|" + "---|" * len(graphs))
    for source, rep in reports.items():
        rel = {r.graph: f"{r.worst_rel_l2:.4f}" for r in rep.results}
        print(f"| {SOURCES[source]} | {' | '.join(rel[g] for g in graphs)} |")
    print(flush=True)

    w16 = args.work / "reference-w16"
    copy_fp32(args.artifacts, w16)
    store_weights_fp16(w16, progress=False)  # kept when already made from the same fp32 graphs

    # the main comparison first, so a run cut short still has it; PSNR against the fp32 image of the
    # same path once that path has run (fd+int8 against fd is printed after the table)
    configs = [
        ("full", args.artifacts, "fp32", "none"),
        ("int8", folders["propagation"], "int8", "none"),
        ("fd+int8", folders["propagation"], "int8", "fd-ddim50"),
        ("fd", args.artifacts, "fp32", "fd-ddim50"),
        ("cache:3", args.artifacts, "fp32", "cache:3"),
        ("cache:3+int8", folders["propagation"], "int8", "cache:3"),
        # lean mode's sessions (effdiff.runtime.memory.LEAN_OPTIONS): its INT8 graphs keep their float
        # layers' fp16 weights, which puts the quantized convolutions on another kernel layout
        ("int8 lean", folders["propagation"], "int8", "none"),
        ("cache:3+int8 lean", folders["propagation"], "int8", "cache:3"),
        # fp32 graphs with fp16-stored weights (`effdiff-export fp16-weights`): folded to fp32 copies at
        # load with the default options, kept fp16 and cast at every call with lean ones
        ("fp16 weights", w16, "fp32", "none"),
        ("cache:3 fp16 weights", w16, "fp32", "cache:3"),
        ("cache:3 fp16 weights lean", w16, "fp32", "cache:3"),
    ]
    if not args.skip_ablation:
        configs += [
            ("fd+int8 (b) whole", folders["whole"], "int8", "fd-ddim50"),
            ("fd+int8 (a) random", folders["random"], "int8", "fd-ddim50"),
            ("int8 (a) random", folders["random"], "int8", "none"),
        ]
    if args.configs:
        configs = [c for c in configs if c[0] in args.configs.split(",")]
    clf = AttributeClassifier()
    splits = {"held-in": held_in_scenes(args.count), "held-out": held_out_scenes()}
    for split in [s for s in args.splits.split(",") if s]:
        scenes = splits[split]
        print(f"### {split}: {len(scenes)} prompts\n")
        print(
            "| config | kind [95 % CI] | colour [95 % CI] | mean (5 attributes) | PSNR dB vs fp32 same path |"
            " s/image |"
        )
        print("|---|---|---|---|---|---|")
        fp32_images: dict[str, list[Image.Image]] = {}
        int8_images: dict[str, list[Image.Image]] = {}
        for name, folder, precision, propagation in configs:
            manifest = Manifest.read(folder)
            graphs = ("unet_encoder", "unet_decoder", "unet")
            if KeySchedule.parse(propagation).caches:  # the keys of the graphs the path runs too
                graphs += KeySchedule.parse(propagation).graphs
            fp16_weights = "fp16 weights" in name
            tag = W16_TAG if fp16_weights else ""
            keys = [v.recipe_key for g in graphs for v in [manifest.choose(g, precision, "onnx", tag)]]
            key = json.dumps(
                [
                    split,
                    args.count,
                    args.seed,
                    args.steps,
                    args.guidance,
                    propagation,
                    precision,
                    keys,
                    manifest.source.content_hash,
                    *(["lean"] if name.endswith(" lean") else []),
                    *(["fp16 weights"] if fp16_weights else []),
                ]
            )
            lean = name.endswith(" lean")
            backend = OrtBackend(session_options=LEAN_OPTIONS if lean else None, fp16_weights=fp16_weights)
            pipe = Pipeline.load(folder, precision=precision, backend=backend, lean=lean)
            start = time.perf_counter()
            images = images_for(pipe, scenes, args, propagation, args.work / "images", key)
            per_image = (time.perf_counter() - start) / len(images)
            reference = precision == "fp32" and not fp16_weights
            if reference:
                fp32_images[propagation] = images
            elif name in ("int8", "fd+int8"):  # (not the lean rows)
                int8_images[name] = images
            adh = Adherence.of(clf.run(images)[0], scenes)
            ref = fp32_images.get(propagation)
            shown = f"{mean_psnr(images, ref):.1f}" if ref is not None and not reference else "—"
            cached = " (cached)" if per_image < 0.01 else ""
            print(
                f"| {name} | {adh.describe('kind')} | {adh.describe('colour')} | {adh.mean:.3f} | {shown} | "
                f"{per_image:.2f}{cached} |",
                flush=True,
            )
        if "fd+int8" in int8_images and "fd-ddim50" in fp32_images:
            db = mean_psnr(int8_images["fd+int8"], fp32_images["fd-ddim50"])
            print(f"\nfd+int8 against fd (fp32, same path): {db:.1f} dB")
        print()

    if args.skip_methods:
        return
    print("### What each calibration method costs (calibrated on (c), quantization only)\n")
    print(
        "| method | quantize s (3 graphs) | peak RSS GiB | unet_encoder rel L2 | unet_decoder rel L2 | "
        "unet rel L2 |"
    )
    print("|---|---|---|---|---|---|")
    for method in ("minmax", "percentile", "entropy"):
        folder = args.work / f"reference-method-{method}"
        copy_fp32(args.artifacts, folder)
        rep = quantize_artifacts(folder, QuantizeOptions(method=method), settings, calib_dir, progress=False)
        manifest = Manifest.read(folder)
        secs = sum(
            manifest.variant(g, "int8").stats.get("seconds", 0.0)
            for g in ("unet_encoder", "unet_decoder", "unet")
        )
        rss = max(
            manifest.variant(g, "int8").stats.get("peak_rss_gib", 0.0)
            for g in ("unet_encoder", "unet_decoder", "unet")
        )
        rel = {r.graph: f"{r.worst_rel_l2:.4f}" for r in rep.results}
        print(
            f"| {method} | {secs:.1f} | {rss:.2f} | {rel['unet_encoder']} | {rel['unet_decoder']} | "
            f"{rel['unet']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
