"""Where a resident generation's peak falls: the process's RSS per phase (text encoder, UNet, VAE) of
two generations in one process, everything resident with the runtime's default options.

  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory_phases.py --artifacts artifacts/sd15-arch-fused \
      --precision int8 [--size 512 --steps 2]
  (prints one JSON line per generation: each phase's peak and the RSS after it, GiB)

RSS is sampled every 2 ms (effdiff.profiling.PeakRSS), so a peak shorter than that can be missed;
benchmarks/memory_generate.py gives the kernel's own high-water mark of whole generations.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
from int8_reference import machine  # benchmarks/ is this script's folder, so it is on sys.path

from effdiff.profiling import PeakRSS
from effdiff.runtime.pipeline import Pipeline


@contextlib.contextmanager
def phase(row: dict, name: str) -> Iterator[None]:
    """The process's peak RSS while the block runs, the RSS after it, and its seconds, written into
    `row` under the phase's name."""
    with PeakRSS(0.002) as rss:
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
    row[f"{name}_s"] = round(seconds, 1)
    row[f"{name}_peak_gib"] = round(rss.peak_bytes / 2**30, 3)
    row[f"after_{name}_gib"] = round(psutil.Process().memory_info().rss / 2**30, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps (the peak does not grow with them)")
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    pipe = Pipeline.load(args.artifacts, precision=args.precision)
    for generation in range(2):
        row: dict = {"precision": args.precision, "generation": generation}
        with phase(row, "text_encoder"):
            cond = pipe.encode_prompt("a photo of a red bicycle", guidance_scale=7.5)
        plan = pipe.plan(steps=args.steps, sampler="ddim", propagation="uniform:1")
        noise = pipe.initial_noise(1, args.size, args.size, seed=generation, latents=None)
        with phase(row, "unet"):
            latents = pipe.denoise(noise * plan.scheduler.init_noise_sigma, cond, plan, injection_noise=noise)
        with phase(row, "vae"):
            pipe.decode(latents)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
