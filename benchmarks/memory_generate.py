"""Peak memory and time of whole generations: resident against lean, per precision, and memory budgets.

Each row is one fresh process that loads the pipeline, generates one image twice (the first call opens
the sessions; the second shows what a process that keeps generating pays per image), and reports the
process's peak RSS from the kernel's own high-water mark (getrusage ru_maxrss: nothing between two
samples is missed) beside the time of each call. Modes:
- `resident`: every graph opened once and kept, the runtime's default options (on the CPU: ONNX
  Runtime's defaults with the UNet graphs on one shared arena without the memory pattern, the text
  encoder and VAE on no arena; `--resident-options default` for ONNX Runtime's own defaults, an arena
  per session; `shared` for every graph on the shared arena with the memory pattern, the default
  before);
- `lean`: the runtime's leanest plan: one component in memory at a time, arena, memory pattern and
  weight pre-packing off, the VAE in tiles of a quarter of the latent side;
- `lean-unet`: the same with the UNet graphs kept open between generations (the text encoder and the
  VAE still load per phase), the plan a budget picks before reloading the UNet every image;
- `lean-per-call`: lean, with each UNet graph opened for each call and dropped after (PerCallGraph),
  so the encoder and decoder never hold their weights at once: for the fp32-w16 variants, whose
  memory-mapped weights open in milliseconds;
- `budget:2GiB`: `memory_budget`, which plans (the plan's line is recorded) or refuses up front.
Precisions: fp32, fp16, int8, and fp32-w16 / int8-w16 for the fp16-weights variants
(`effdiff-export fp16-weights`: fp32 compute, weights stored fp16 and kept fp16 by lean options).
`--unet-rows 1` runs the UNet's two guidance rows one at a time in the non-budget modes (a budget's
plan chooses that itself). `--lean-options` names the ONNX Runtime option set of the lean modes (from
benchmarks/memory.py; default: the runtime's own, which budgets use too).

  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory_generate.py --artifacts artifacts/sd15-arch-fused \
      --size 512 --precisions fp32,int8 --modes resident,lean,budget:1.5GiB,budget:2GiB
  (writes benchmarks/results/memory_generate_<artifacts>_<size>.json and prints a markdown table)
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from int8_reference import machine  # benchmarks/ is this script's folder, so it is on sys.path
from memory import OPTION_SETS, fresh_row

MODES = ("resident", "lean-unet", "lean", "lean-per-call")  # and budget:SIZE
W16_SUFFIX = "-w16"  # a precision such as fp32-w16 runs the `effdiff-export fp16-weights` variants


def measure_one(
    artifacts: Path,
    precision: str,
    mode: str,
    size: int,
    steps: int,
    schedule: str,
    unet_rows: int | None,
    lean_options: str | None,
    resident_options: str | None = None,
) -> dict:
    """In this process: load, generate twice; figures in GiB and seconds."""
    import psutil

    from effdiff.errors import EffdiffError
    from effdiff.runtime.backends import get_backend
    from effdiff.runtime.memory import LEAN_OPTIONS
    from effdiff.runtime.pipeline import Pipeline
    from effdiff.runtime.propagation import KeySchedule

    row: dict = {"precision": precision, "mode": mode, "size": size, "steps": steps, "schedule": schedule}
    row["unet_rows"] = unet_rows
    lean = mode in ("lean", "lean-unet", "lean-per-call")
    budget = mode.split(":", 1)[1] if mode.startswith("budget:") else None
    row["lean_options"] = lean_options if lean and lean_options else None
    row["resident_options"] = resident_options if mode == "resident" else None
    if lean:
        options = OPTION_SETS[lean_options] if lean_options else LEAN_OPTIONS
    elif mode == "resident" and resident_options:
        options = OPTION_SETS[resident_options]
    else:  # resident and budgets: the runtime's own options (a budget's plan sets its own)
        options = None
    w16 = precision.endswith(W16_SUFFIX)  # fp32-w16: the fp16-weights variants
    backend = get_backend("ort", session_options=options, fp16_weights=w16)
    pipe = Pipeline.load(
        artifacts,
        backend=backend,
        precision=precision.removesuffix(W16_SUFFIX),
        lean=lean,
        memory_budget=budget,
    )
    if mode == "lean-unet":
        pipe.graphs.resident = KeySchedule.parse(schedule).graphs
    if mode == "lean-per-call":
        pipe.graphs.per_call = KeySchedule.parse(schedule).graphs
    if budget is None:
        pipe.unet_rows = unet_rows
    row["baseline_gib"] = psutil.Process().memory_info().rss / 2**30
    latent_side = pipe.geometry.latent_size(size, size)[0]
    kwargs = {
        "steps": steps,
        "height": size,
        "width": size,
        "propagation": schedule,
        "noise_injection": None,
        "guidance_scale": 7.5,
        "vae_tile": latent_side // 4 if lean else None,
    }
    times = []
    try:
        for seed in (0, 1):
            start = time.perf_counter()
            result = pipe("a photo of a red bicycle", seed=seed, **kwargs)
            times.append(time.perf_counter() - start)
            row["memory_plan"] = result.info.get("memory_plan", "")
            timings = {k: round(v, 3) for k, v in result.timings.items()}
            row["second_timings" if "first_timings" in row else "first_timings"] = timings
    except EffdiffError as exc:
        row["refused"] = str(exc)
    row["first_s"], row["second_s"] = [*times, None, None][:2]
    row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    used = ("text_encoder", *KeySchedule.parse(schedule).graphs, "vae_decoder")
    row["disk_gib"] = sum(pipe.variants[g].size_bytes for g in used) / 2**30  # the graphs this run opens
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--size", type=int, default=512, help="image size in pixels")
    parser.add_argument(
        "--steps", type=int, default=4, help="DDIM steps (peak memory does not grow with them)"
    )
    parser.add_argument(
        "--schedule", default="uniform:1", help="UNet graphs run (uniform:1: encoder and decoder each step)"
    )
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--unet-rows", type=int, help="UNet rows per call (default: the whole batch)")
    parser.add_argument("--lean-options", choices=sorted(OPTION_SETS), help="option set of the lean modes")
    parser.add_argument(
        "--resident-options", choices=sorted(OPTION_SETS), help="option set of the resident mode"
    )
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: one row
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if args.one:
        row = measure_one(
            args.artifacts,
            args.precisions,
            args.modes,
            args.size,
            args.steps,
            args.schedule,
            args.unet_rows,
            args.lean_options,
            args.resident_options,
        )
        print(json.dumps(row))
        return
    bad = [m for m in args.modes.split(",") if m not in MODES and not m.startswith("budget:")]
    if bad:
        parser.error(f"unknown mode(s) {', '.join(bad)}: use {', '.join(MODES)} or budget:SIZE")
    print(f"machine: {machine()}", flush=True)
    rows = []
    for precision in args.precisions.split(","):
        for mode in args.modes.split(","):
            options = ["--size", str(args.size), "--steps", str(args.steps), "--schedule", args.schedule]
            options += ["--precisions", precision, "--modes", mode]
            options += ["--unet-rows", str(args.unet_rows)] if args.unet_rows else []
            options += ["--lean-options", args.lean_options] if args.lean_options else []
            options += ["--resident-options", args.resident_options] if args.resident_options else []
            row = fresh_row(__file__, args.artifacts, options, f"{precision} {mode}")
            if row is not None:
                rows.append(row)
    resident_s = {r["precision"]: r["second_s"] for r in rows if r["mode"] == "resident"}
    lines = [
        f"| precision | mode | peak RSS GiB | first generation s | second generation s | vs resident "
        f"(second) | plan ({args.size}x{args.size}, CFG, {args.steps} steps) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['precision']} | {r['mode']} | — | refused | — | — | {r['refused']} |")
            continue
        base = resident_s.get(r["precision"])
        ratio = f"{r['second_s'] / base:.2f}x" if base else "—"
        lines.append(
            f"| {r['precision']} | {r['mode']} | {r['peak_rss_gib']:.2f} | {r['first_s']:.1f} | "
            f"{r['second_s']:.1f} | {ratio} | {r['memory_plan'] or '—'} |"
        )
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"memory_generate_{args.artifacts.name}_{args.size}.json"
    out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
