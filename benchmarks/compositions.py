"""Every composition on one speed/quality plot, on the reference model: schedules (full, fd, cache:3),
INT8 and retrieval start, alone and combined, beside diffusers and DeepCache, in one interleaved run.

  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compositions.py --work runs/compositions

Steps (each skipped when its output exists): export the reference model into WORK/artifacts (with the
cache recipe's graphs); INT8 variants of every UNet graph (`effdiff-export int8`'s library call, 64
calibration samples); two KBs from the training prompts outside the evaluation scenes x `--seeds`, one
on whole-UNet trajectories (the `kb` and `kb+fd` rows) and one on `cache:3` trajectories (the
`kb+cache:3` rows); then `run_bench` with every configuration and both peers on `--count` of the
held-in evaluation scenes (prompts no KB and no calibration set holds), one call per prompt as a
device app generates (`--batched`: all in one call), report in WORK/report (`speed_quality.png` is the
plot). A few prompts cannot judge a 3-point adherence difference: the 192-prompt figures are in
`kb_reference.py` and `int8_reference.py`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from effdiff.bench.harness import BenchSettings, parse_configs, run_bench
from effdiff.bench.report import markdown, write_report
from effdiff.calib.capture import CaptureSettings, default_prompts
from effdiff.calib.quantize import QuantizeOptions, quantize_artifacts
from effdiff.export.onnx import export_onnx
from effdiff.kb.build import IndexOptions, build_kb
from effdiff.kb.store import BuildSettings
from effdiff.reference.scenes import REFERENCE_GUIDANCE, disjoint_scenes, held_in_scenes

CONFIGS = "full,fd,cache:3,int8,fd+int8,cache:3+int8,kb,kb+fd,kb+cache:3,kb+int8,kb+fd+int8,kb+cache:3+int8"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/compositions"))
    parser.add_argument("--configs", default=CONFIGS)
    parser.add_argument("--seeds", default="0,1", help="KB seeds (the bench starts each image from one)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--count", type=int, default=6, help="held-in evaluation scenes timed")
    parser.add_argument("--batched", action="store_true", help="every prompt in one call")
    args = parser.parse_args()
    flags = sorted(set(Path("/proc/cpuinfo").read_text().split()) & {"avx2", "avx512f", "avx512_vnni"})
    print(f"CPU flags: {' '.join(flags)}; {os.cpu_count()} cores; load {os.getloadavg()[0]:.1f}", flush=True)
    artifacts = args.work / "artifacts"
    export_onnx("reference", artifacts, progress=False)
    capture = CaptureSettings(tuple(default_prompts()), samples=64, guidance=REFERENCE_GUIDANCE)
    print(quantize_artifacts(artifacts, QuantizeOptions(), capture, progress=False).table(), flush=True)
    # One KB per schedule: a KB's keys are latents of its own schedule's trajectories, and the
    # cache recipe's step-10 latent lies outside the adaptive thresholds of whole-UNet keys.
    kbs = {"none": args.work / "kb", "cache:3": args.work / "kb-cache3"}
    for propagation, kb in kbs.items():
        if (kb / "kb.json").exists():
            continue
        settings = BuildSettings(
            steps=50,
            guidance=REFERENCE_GUIDANCE,
            key_step=10,
            value_steps=(15, 20, 25, 30, 35, 40),
            seeds=tuple(int(s) for s in args.seeds.split(",")),
            propagation=propagation,
        )
        prompts = [s.prompt for s in disjoint_scenes()]
        build_kb(artifacts, prompts, kb, settings, IndexOptions("PCA128,PQ16"), resume=True, batch=32)
    # The demo's scenes would not do: three of them are KB prompts, whose own trajectories (same
    # prompt, same seed) a lookup finds, which flatters every `kb` row.
    scenes = held_in_scenes()[: args.count]
    bench = BenchSettings(
        prompts=[s.prompt for s in scenes],
        guidance=REFERENCE_GUIDANCE,
        repeat=args.repeat,
        warmup=1,
        one_at_a_time=not args.batched,
    )
    configs = parse_configs(args.configs.split(","), bench.sampler, bench.steps, list(kbs.values()))
    peers = () if args.no_peers else ("diffusers", "deepcache")
    report = run_bench(artifacts, configs, bench, peers=peers, scenes=scenes)
    write_report(report, args.work / "report")
    print(markdown(report))
    print(f"load at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
