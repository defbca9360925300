"""ONNX Runtime's spinning threads between graphs that take turns: the runtime's default (sessions other
than the whole UNet stop spinning when run() returns) against ONNX Runtime's own default (every
session's threads spin on after each run), in one process, interleaved over repeats. `--compare arena`
instead sets the runtime's CPU default (the UNet graphs on one shared arena, given back when each phase
ends) against ONNX Runtime's (an arena per session); `--compare pattern` sets it against the default
before (every graph on the shared arena, memory pattern on).

  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/spinning.py --artifacts artifacts/reference [--compare arena]
  [--compare pattern]

Each repeat generates the demo's six prompts one at a time (DDIM 50, the reference model's guidance)
with every schedule under both settings, in turn; the table gives the median seconds per prompt and the
ratio within each repeat. Run it on an idle machine: the effect is contention between sessions.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from int8_reference import machine  # benchmarks/ is this script's folder, so it is on sys.path

from effdiff.reference.scenes import DEMO_SCENES, REFERENCE_GUIDANCE
from effdiff.runtime.backends.ort import CPU_DEFAULT_OPTIONS, SHARED_ARENA, OrtBackend
from effdiff.runtime.pipeline import Pipeline

# setting -> session options (None: the runtime's defaults); the first is each ratio's baseline
COMPARISONS: dict[str, dict[str, dict[str, object] | None]] = {
    "spinning": {
        "spin on between runs (ORT default)": {
            **CPU_DEFAULT_OPTIONS,
            "config:session.force_spinning_stop": "0",
        },
        "stop after run (effdiff default)": None,
    },
    "arena": {"an arena per session (ORT default)": {}, "one shared arena (effdiff default)": None},
    "pattern": {
        "every graph on the shared arena, memory pattern on (before)": {
            SHARED_ARENA: True,
            "enable_mem_pattern": True,
        },
        "UNet on the shared arena, no pattern; no arena for the rest (effdiff default)": None,
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/reference"))
    parser.add_argument("--schedules", default="none,fd-ddim50,cache:3")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="spinning")
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    settings = COMPARISONS[args.compare]
    pipes = {
        name: Pipeline.load(args.artifacts, backend=OrtBackend(session_options=opts))
        for name, opts in settings.items()
    }
    schedules = args.schedules.split(",")
    prompts = [s.prompt for s in DEMO_SCENES]

    def run(pipe: Pipeline, schedule: str) -> float:
        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            pipe(prompt, steps=args.steps, guidance_scale=REFERENCE_GUIDANCE, seed=i, propagation=schedule)
        return (time.perf_counter() - start) / len(prompts)

    for pipe in pipes.values():  # warm-up: every session opened and run once
        for schedule in schedules:
            run(pipe, schedule)
    seconds: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeat):
        for schedule in schedules:
            for name, pipe in pipes.items():
                seconds.setdefault((name, schedule), []).append(run(pipe, schedule))
    print("\n| schedule | setting | s per prompt (median, min-max) | speed-up (per repeat) |")
    print("|---|---|---|---|")
    base_name = next(iter(settings))
    for schedule in schedules:
        base = np.asarray(seconds[(base_name, schedule)])
        for name in settings:
            s = np.asarray(seconds[(name, schedule)])
            ratio = base / s
            print(
                f"| {schedule} | {name} | {np.median(s):.3f} ({s.min():.3f}-{s.max():.3f}) | "
                f"{np.median(ratio):.2f}x ({ratio.min():.2f}-{ratio.max():.2f}) |"
            )
    print(f"\nload at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
