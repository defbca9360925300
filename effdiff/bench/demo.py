"""`effdiff demo`: export the reference model, generate with each configuration, write a report folder.

Offline, a few minutes on 2 CPU cores: the bench harness measures the configurations (and the peers
when diffusers is installed) on a handful of prompts, seen and unseen in training, each prompt in a
call of its own, as an app on a device generates one image per request.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from effdiff.bench.harness import BenchReport, BenchSettings, parse_configs, run_bench
from effdiff.bench.report import write_report
from effdiff.reference.scenes import DEMO_SCENES, REFERENCE_GUIDANCE


def run_demo(
    out: Path,
    steps: int = 50,
    guidance: float = REFERENCE_GUIDANCE,
    peers: tuple[str, ...] = ("diffusers", "deepcache"),
    repeat: int = 3,
    log: Callable[[str], None] = print,
) -> tuple[BenchReport, list[Path]]:
    from effdiff.export.onnx import export_onnx

    out = Path(out)
    artifacts = out / "artifacts"
    log(f"exporting the reference model to {artifacts} (validated; resumes if interrupted)")
    export = export_onnx("reference", artifacts, log=lambda _m: None)
    log(export.table())
    settings = BenchSettings(
        prompts=[s.prompt for s in DEMO_SCENES],
        steps=steps,
        guidance=guidance,
        repeat=repeat,
        warmup=1,
        one_at_a_time=True,
    )
    configs = parse_configs(["full", "fd", "cache:3"], settings.sampler, steps)
    report = run_bench(artifacts, configs, settings, peers=peers, scenes=list(DEMO_SCENES))
    written = write_report(report, out / "report")
    return report, written
