"""Encoder propagation against the whole-UNet path, on the same artifacts, in one run.

For DDIM at N steps with classifier-free guidance: UNet time per image, the speed-up over the whole-UNet
path, the speed-up each schedule allows in principle (from encoder and decoder call times measured in
isolation at the same batch), runtime overhead, and the final image's PSNR against the whole-UNet path.
diffusers' StableDiffusionPipeline (PyTorch) runs the same model, steps and latents for reference.

Run (SD1.5 architecture with random weights, 256x256; about 15 minutes on 2 CPU cores):
  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/export_sd15_arch.py --out artifacts/sd15-arch
  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/propagation.py --artifacts artifacts/sd15-arch --size 256
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import psutil

from effdiff.compare import psnr
from effdiff.runtime.backends import Graph
from effdiff.runtime.images import image_grid
from effdiff.runtime.pipeline import Pipeline
from effdiff.runtime.propagation import KeySchedule

SCHEDULES = ("none", "fd-ddim50", "uniform:2", "uniform:3", "uniform:4", "uniform:5")
PROMPT = "a photo of a cat on a red background"


def median_call(graph: Graph, feeds: dict[str, np.ndarray], repeat: int = 3) -> float:
    graph.run(feeds)  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        graph.run(feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def isolated_call_times(
    pipe: Pipeline, rows: int, h: int, w: int, repeat: int = 3
) -> tuple[float, float, float]:
    """Median seconds of one whole-UNet, encoder and decoder call at `rows` batch rows."""
    rng = np.random.default_rng(0)
    out = []
    features: dict[str, np.ndarray] = {}
    for name in ("unet", "unet_encoder", "unet_decoder"):
        spec = pipe.specs[name]
        graph = pipe.backend.open(pipe.artifacts / pipe.variants[name].file, spec)
        feeds = spec.sample_inputs(rows, h, w, rng, timesteps=np.full(rows, 501.0))
        if name == "unet_encoder":
            features = graph.run(feeds)
        if name == "unet_decoder":
            feeds.update(features)
        out.append(median_call(graph, feeds, repeat))
        del graph
        gc.collect()
    return out[0], out[1], out[2]


def diffusers_seconds(source: Path, steps: int, size: int, latents: np.ndarray) -> tuple[float, np.ndarray]:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if pipe.tokenizer.model_max_length > 77:  # folders saved without it: diffusers would overflow
        pipe.tokenizer.model_max_length = 77
    kwargs = dict(guidance_scale=7.5, height=size, width=size, latents=torch.from_numpy(latents))
    with torch.inference_mode():
        pipe(PROMPT, num_inference_steps=2, **kwargs)  # warm-up
        start = time.perf_counter()
        image = pipe(PROMPT, num_inference_steps=steps, output_type="np", **kwargs).images[0]
    return time.perf_counter() - start, (image * 255).round()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, help="image size in pixels (default: the export size)")
    parser.add_argument("--max-decoder-batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument(
        "--schedules", default=",".join(SCHEDULES), help="none first: the others compare to it"
    )
    args = parser.parse_args()

    pipe = Pipeline.load(args.artifacts, lean=True)
    size = args.size or pipe.default_size()[0]
    f = pipe.geometry.vae_factor
    latents = np.random.default_rng(0).standard_normal(
        (1, pipe.geometry.latent_channels, size // f, size // f)
    )
    latents = latents.astype(np.float32)
    whole_call, enc_call, dec_call = isolated_call_times(pipe, 2, size // f, size // f)

    rows, images = [], []
    pipe(PROMPT, steps=2, latents=latents, height=size, width=size)  # warm-up
    base_image = None
    base_unet = 0.0
    schedules = args.schedules.split(",")
    for text in schedules:
        schedule = KeySchedule.parse(text)
        res = pipe(
            PROMPT,
            steps=args.steps,
            latents=latents,
            height=size,
            width=size,
            propagation=schedule,
            max_decoder_batch=args.max_decoder_batch,
            progress=True,
        )
        t = res.timings
        unet = t["unet"] + t["unet_encoder"] + t["unet_decoder"]
        denoise_loop = t["total"] - t["load"] - t["text_encoder"] - t["vae_decoder"]
        image = np.asarray(res.images[0])
        if base_image is None:
            base_image, base_unet = image, unet
        keys = len(res.key_steps) if schedule.propagates else args.steps
        allowed = (
            args.steps * whole_call / (keys * enc_call + args.steps * dec_call)
            if schedule.propagates
            else 1.0
        )
        speedup = base_unet / unet
        rows.append(
            dict(
                dec_step=t["unet_decoder"] / args.steps if schedule.propagates else dec_call,
                schedule=text,
                keys=keys,
                unet_s=unet,
                speedup=speedup,
                allowed=allowed,
                share=speedup / allowed,
                overhead=(denoise_loop - unet) / unet,
                total_s=t["total"] - t["load"],
                psnr=psnr(image, base_image),
            )
        )
        images.append(res.images[0])
        print(
            f"{text}: UNet {unet:.2f}s, total {t['total'] - t['load']:.2f}s, load {t['load']:.1f}s",
            flush=True,
        )
    del pipe
    gc.collect()

    lines = [
        f"machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM; artifacts: {args.artifacts.name}; "
        f"DDIM {args.steps} steps, CFG 7.5, {size}x{size}, batch 1, "
        f"max decoder batch {args.max_decoder_batch}",
        f"isolated calls at 2 rows: whole UNet {whole_call:.3f}s, encoder {enc_call:.3f}s, "
        f"decoder {dec_call:.3f}s (encoder share {enc_call / (enc_call + dec_call):.0%})",
        "",
        "| schedule | key steps | UNet s/image | speed-up | allowed | reached | decoder s/step as run | "
        "overhead | end-to-end s | PSNR dB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        quality = "ref" if r["schedule"] == "none" else f"{r['psnr']:.1f}"
        lines.append(
            f"| {r['schedule']} | {r['keys']} | {r['unet_s']:.2f} | {r['speedup']:.2f}x | "
            f"{r['allowed']:.2f}x | {r['share']:.0%} | {r['dec_step']:.3f} | {r['overhead']:.1%} | "
            f"{r['total_s']:.2f} | {quality} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"propagation_{args.artifacts.name}_{size}_b{args.max_decoder_batch}"
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")  # kept even if the peer fails
    if not args.no_diffusers:
        from effdiff.artifacts import Manifest

        source = Path(Manifest.read(args.artifacts).source.path)
        seconds, ref_image = diffusers_seconds(source, args.steps, size, latents)
        ours = rows[0]["total_s"]
        lines += [
            "",
            f"diffusers StableDiffusionPipeline (PyTorch, same model/steps/latents): {seconds:.2f}s "
            f"end to end; effdiff whole-UNet path {ours:.2f}s ({seconds / ours:.2f}x); "
            f"PSNR between them {psnr(base_image, ref_image):.1f} dB",
        ]
    report = "\n".join(lines)
    print("\n" + report)
    (args.out / f"{stem}.md").write_text(report + "\n")
    image_grid(images).save(args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.md and .png (columns: {', '.join(schedules)})")


if __name__ == "__main__":
    main()
