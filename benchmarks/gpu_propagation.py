"""Encoder propagation with parallel decoding on a GPU, through the `torch` backend, beside diffusers and
DeepCache in the same run.

SD1.5 architecture (random weights), 512x512, DDIM 50 steps, CFG 7.5, fp16: the whole-UNet path against
fd-ddim50 with the decoder batched 1, 4, 8 and 16 steps per call. Per row: end-to-end latency (median,
min over timed runs after warm-up), latency per component (the torch backend synchronises the GPU after
every graph call, so each graph's time is its work, not its launch), GPU memory through NVML (peak minus
the level before the run, sampled every 2 ms: `effdiff.profiling.GpuMemory`), and PSNR of the image
against the whole-UNet path.

On a CUDA machine (torch with CUDA, diffusers, DeepCache; nvidia-ml-py for memory):
  HF_HUB_OFFLINE=1 python benchmarks/gpu_propagation.py --model sd15-arch --work /tmp/effdiff-gpu
Smoke check on a CPU at a tiny size (what runs on the project's CPU machines):
  HF_HUB_OFFLINE=1 python benchmarks/gpu_propagation.py --model tiny-sd1 --size 64 --steps 10 \
      --device cpu --precision fp32 --batches 1,4 --repeat 1 --warmup 0
No artifacts folder is needed: `--model` writes a graph-free one (tokenizer, scheduler, manifest) under
--work, since the torch backend builds its graphs from the model; `--artifacts` uses an existing export.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from effdiff.bench.device import describe, device_profile
from effdiff.compare import psnr
from effdiff.profiling import GpuMemory
from effdiff.runtime.backends.torch_backend import TorchBackend
from effdiff.runtime.pipeline import Pipeline
from effdiff.runtime.propagation import KeySchedule

PROMPT = "a photo of a cat on a red background"
COMPONENTS = ("text_encoder", "unet_encoder", "unet_decoder", "unet", "vae_decoder", "overhead")


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_runs(
    fn: Any, device: str, warmup: int, repeat: int
) -> tuple[list[float], list[Any], float | None, float | None]:
    """Wall seconds per timed run (GPU synchronised before and after), their results, and GPU memory:
    NVML peak minus the level before the runs, and PyTorch's own peak allocation above what was
    allocated before (the one figure when nvidia-ml-py is missing; it misses cuDNN/cuBLAS workspaces)."""
    import torch

    for _ in range(warmup):
        fn()
    gpu = GpuMemory()
    seconds, results = [], []
    cuda = device.startswith("cuda")
    if cuda:
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()

    def all_runs() -> None:
        for _ in range(repeat):
            synchronize(device)
            start = time.perf_counter()
            results.append(fn())
            synchronize(device)
            seconds.append(time.perf_counter() - start)

    gpu.measure(all_runs)
    torch_peak = (torch.cuda.max_memory_allocated() - allocated) / 2**20 if cuda else None
    return seconds, results, gpu.peak_mib, torch_peak


def effdiff_rows(
    args: argparse.Namespace, artifacts: Path, latents: np.ndarray
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The effdiff rows, and the whole-UNet image (the reference of every PSNR)."""
    backend = TorchBackend(
        args.device, args.compile, args.cuda_graphs, synchronize=True, threads=args.threads
    )
    gpu = GpuMemory()
    before = gpu.used_mib() if gpu.available else None
    start = time.perf_counter()
    pipe = Pipeline.load(artifacts, backend=backend, precision=args.precision)
    for graph in ("text_encoder", "unet", "unet_encoder", "unet_decoder", "vae_decoder"):
        pipe.open_graph(graph)
    synchronize(args.device)
    load_s = time.perf_counter() - start
    loaded_mib = gpu.used_mib() - before if before is not None else None
    configs = [("none", 1)] + [("fd-ddim50" if args.steps == 50 else "uniform:5", b) for b in args.batches]
    rows, reference = [], None
    for schedule, batch in configs:

        def once(schedule: str = schedule, batch: int = batch, pipe: Pipeline = pipe) -> Any:
            return pipe(
                PROMPT,
                steps=args.steps,
                guidance_scale=7.5,
                latents=latents,
                height=args.size,
                width=args.size,
                propagation=KeySchedule.parse(schedule),
                max_decoder_batch=batch,
            )

        seconds, results, peak, torch_peak = timed_runs(once, args.device, args.warmup, args.repeat)
        image = np.asarray(results[-1].images[0])
        reference = image if reference is None else reference
        comps = {c: statistics.median(r.timings[c] for r in results) for c in COMPONENTS}
        unet = sum(comps[c] for c in ("unet_encoder", "unet_decoder", "unet"))
        rows.append(
            {
                "config": "whole UNet" if schedule == "none" else f"{schedule}, decoder batch {batch}",
                "median_s": statistics.median(seconds),
                "min_s": min(seconds),
                "unet_s": unet,
                "components": comps,
                "gpu_peak_mib": peak,
                "torch_peak_mib": torch_peak,
                "psnr_db": min(psnr(image, reference), 99.0),
                "load_s": load_s,
                "loaded_mib": loaded_mib,
            }
        )
        print(f"{rows[-1]['config']}: {rows[-1]['median_s']:.3f} s", flush=True)
    del pipe, backend
    gc.collect()
    assert reference is not None
    return rows, reference


def peer_rows(
    args: argparse.Namespace, source: Path, latents: np.ndarray, reference: Any
) -> list[dict[str, Any]]:
    """diffusers' StableDiffusionPipeline on the same model, device, dtype, steps and latents; then with
    DeepCache (interval 3, branch 0)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    rows = []
    for peer in ("diffusers", "deepcache"):
        pipe = StableDiffusionPipeline.from_pretrained(
            source, safety_checker=None, local_files_only=True, torch_dtype=dtype
        ).to(args.device)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipe.tokenizer.model_max_length = min(pipe.tokenizer.model_max_length, 77)
        if peer == "deepcache":
            from DeepCache import DeepCacheSDHelper

            helper = DeepCacheSDHelper(pipe=pipe)
            helper.set_params(cache_interval=3, cache_branch_id=0)
            helper.enable()
        noise = torch.from_numpy(latents).to(args.device, dtype)

        def once(pipe: Any = pipe, noise: Any = noise) -> Any:
            with torch.inference_mode():
                return pipe(
                    PROMPT,
                    num_inference_steps=args.steps,
                    guidance_scale=7.5,
                    latents=noise,
                    height=args.size,
                    width=args.size,
                    output_type="np",
                ).images[0]

        seconds, results, peak, torch_peak = timed_runs(once, args.device, args.warmup, args.repeat)
        image = (np.asarray(results[-1], np.float64) * 255).round()
        rows.append(
            {
                "config": peer,
                "median_s": statistics.median(seconds),
                "min_s": min(seconds),
                "gpu_peak_mib": peak,
                "torch_peak_mib": torch_peak,
                "psnr_db": min(psnr(image, reference), 99.0),
            }
        )
        print(f"{peer}: {rows[-1]['median_s']:.3f} s", flush=True)
        del pipe
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(args: argparse.Namespace, rows: list[dict[str, Any]], device: dict[str, Any]) -> str:
    base = rows[0]["median_s"]
    diff = next((r["median_s"] for r in rows if r["config"] == "diffusers"), None)
    lines = [
        f"- device: {describe(device)}",
        f"- model {args.model or args.artifacts}, {args.size}x{args.size}, DDIM {args.steps}, CFG 7.5, "
        f"{args.precision}, torch backend on {args.device}"
        + (", torch.compile" if args.compile else "")
        + (", CUDA graphs" if args.cuda_graphs else "")
        + f"; {args.repeat} timed runs after {args.warmup} warm-up",
        "",
        "| config | end-to-end s (median / min) | vs whole UNet | vs diffusers | UNet s "
        "| GPU MiB NVML (peak - base) | GPU MiB torch (peak - base) | PSNR dB vs whole UNet |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['median_s']:.3f} / {r['min_s']:.3f} | {base / r['median_s']:.2f}x | "
            f"{fmt(diff / r['median_s'] if diff else None, '.2f')}x | {fmt(r.get('unet_s'), '.3f')} | "
            f"{fmt(r['gpu_peak_mib'], '.0f')} | {fmt(r['torch_peak_mib'], '.0f')} | {r['psnr_db']:.1f} |"
        )
    ours = [r for r in rows if "components" in r]
    lines += ["", "| config | " + " | ".join(COMPONENTS) + " |", "|---|" + "---|" * len(COMPONENTS)]
    for r in ours:
        lines.append(
            f"| {r['config']} | " + " | ".join(f"{r['components'][c]:.3f}" for c in COMPONENTS) + " |"
        )
    if ours:
        lines.append(
            f"\nload {ours[0]['load_s']:.1f} s; GPU memory after loading the graphs: "
            f"{fmt(ours[0]['loaded_mib'], '.0f')} MiB"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-arch", help="built-in name or diffusers folder")
    parser.add_argument("--artifacts", type=Path, help="an existing artifacts folder (instead of --model)")
    parser.add_argument("--work", type=Path, default=Path("artifacts/gpu-bench"), help="for --model")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batches", default="1,4,8,16", help="decoder steps per call with fd-ddim50")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "fp32"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the graphs")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (1 on a shared CPU: OpenMP spin-waits)"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]

    from effdiff.artifacts import Manifest

    artifacts = args.artifacts
    if artifacts is None:
        from effdiff.export.onnx import write_source_manifest

        artifacts = args.work / Path(args.model).name
        write_source_manifest(args.model, artifacts)
        args.artifacts = None
    manifest = Manifest.read(artifacts)
    f = manifest.geometry.vae_factor
    latents = np.random.default_rng(0).standard_normal(
        (1, manifest.geometry.latent_channels, args.size // f, args.size // f)
    )
    latents = latents.astype(np.float32)
    device = device_profile(None)
    rows, reference = effdiff_rows(args, artifacts, latents)
    if not args.no_peers:
        rows += peer_rows(args, Path(manifest.source.path), latents, reference)
    report = markdown(args, rows, device)
    print("\n" + report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_propagation_{artifacts.name}_{args.size}_{args.device.split(':')[0]}"
    (args.out / f"{stem}.md").write_text(report)
    (args.out / f"{stem}.json").write_text(
        json.dumps({"device": device, "rows": rows}, indent=2, default=str)
    )
    print(f"wrote {args.out / stem}.md and .json")


if __name__ == "__main__":
    main()
