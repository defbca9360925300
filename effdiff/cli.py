"""Command line: parse options, call one library function, print its report, set the exit code."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from effdiff import __version__
from effdiff._deps import MissingDependency
from effdiff.errors import EffdiffError, ValidationFailed


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Known failures become one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ValidationFailed as exc:
            click.echo(str(exc), err=True)
            click.echo("error: validation beyond tolerance (artifacts and manifest kept)", err=True)
            sys.exit(1)
        except (EffdiffError, MissingDependency) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo(
                "interrupted: finished artifacts are kept; run the same command again to resume", err=True
            )
            sys.exit(130)

    return wrapper


@click.group()
@click.version_option(__version__, prog_name="effdiff")
def main() -> None:
    """effdiff: export Stable-Diffusion-class models as split-UNet graphs and run them fast."""


@click.group("export")
def export_main() -> None:
    """Export a diffusers model to deployable artifacts."""


main.add_command(export_main)


@export_main.command("onnx")
@click.option("--model", required=True, help="diffusers pipeline folder, or a built-in: tiny-sd1, tiny-sd2")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="artifacts folder to write")
@click.option("--opset", default=20, show_default=True, type=click.IntRange(18, 23))
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16"]))
@click.option("--height", type=int, help="image height in pixels used for validation (default: model's)")
@click.option("--width", type=int, help="image width in pixels used for validation (default: model's)")
@click.option("--quiet", is_flag=True, help="no progress bar")
@user_errors
def export_onnx_cmd(
    model: str, out: Path, opset: int, precision: str, height: int | None, width: int | None, quiet: bool
) -> None:
    """Split the UNet into encoder/decoder, export all graphs to ONNX and validate them against PyTorch."""
    from effdiff.export.onnx import ExportRecipe, Precision, export_onnx

    recipe = ExportRecipe(opset=opset, precision=Precision(precision), height=height, width=width)
    report = export_onnx(model, out, recipe, progress=not quiet, log=lambda m: click.echo(m, err=True))
    click.echo(report.table())
    click.echo(f"all graphs within tolerance; manifest: {out / 'manifest.json'}")


@export_main.command("int8")
@click.option(
    "--artifacts", required=True, type=click.Path(path_type=Path), help="folder from effdiff-export onnx"
)
@click.option(
    "--calib-prompts",
    type=click.Path(path_type=Path),
    help="prompts, one per line (default: the reference model's training prompts outside the evaluation set)",
)
@click.option("--samples", default=64, show_default=True, type=click.IntRange(1), help="samples per graph")
@click.option("--mode", default="static", show_default=True, type=click.Choice(["static", "dynamic"]))
@click.option(
    "--target",
    default="tensorrt",
    show_default=True,
    type=click.Choice(["tensorrt", "cpu"]),
    help="static QDQ layout: Q/DQ on Conv/MatMul/Gemm inputs (TensorRT), or inputs and outputs "
    "(ONNX Runtime CPU kernels)",
)
@click.option(
    "--method",
    default="percentile",
    show_default=True,
    type=click.Choice(["minmax", "percentile", "entropy"]),
)
@click.option(
    "--exclude",
    multiple=True,
    help="regex on a layer's module path kept in float (repeatable; adds to the defaults)",
)
@click.option(
    "--no-default-exclude", is_flag=True, help="quantize time embedding, conv_in/out, shortcuts too"
)
@click.option(
    "--calibrate-on",
    default="propagation",
    show_default=True,
    type=click.Choice(["propagation", "whole", "random"]),
    help="inputs the halves are calibrated on (whole: no propagation; random: N(0,1))",
)
@click.option("--steps", default=50, show_default=True, type=int)
@click.option("--sampler", default="ddim", show_default=True)
@click.option("--propagation", default="fd-ddim50", show_default=True, help="key-step schedule captured")
@click.option("--guidance", type=float, help="default: 3 for the reference model, else 7.5")
@click.option("--calib-dir", type=click.Path(path_type=Path), help="default: ARTIFACTS/calibration")
@click.option(
    "--graphs", default="unet_encoder,unet_decoder,unet", show_default=True, help="UNet graphs to quantize"
)
@click.option("--quiet", is_flag=True)
@user_errors
def export_int8_cmd(
    artifacts: Path,
    calib_prompts: Path | None,
    samples: int,
    mode: str,
    target: str,
    method: str,
    exclude: tuple[str, ...],
    no_default_exclude: bool,
    calibrate_on: str,
    steps: int,
    sampler: str,
    propagation: str,
    guidance: float | None,
    calib_dir: Path | None,
    graphs: str,
    quiet: bool,
) -> None:
    """Post-training INT8 of the UNet graphs, calibrated on what the runtime feeds each half."""
    from effdiff.calib.capture import CaptureSettings, default_guidance, default_prompts, read_prompts
    from effdiff.calib.quantize import DEFAULT_EXCLUDE, QuantizeOptions, quantize_artifacts

    prompts = read_prompts(calib_prompts) if calib_prompts is not None else default_prompts()
    settings = CaptureSettings(
        prompts=tuple(prompts),
        samples=samples,
        steps=steps,
        sampler=sampler,
        propagation=propagation,
        guidance=guidance if guidance is not None else default_guidance(artifacts),
    )
    options = QuantizeOptions(
        mode=mode,
        target=target,
        method=method,
        exclude=(*(() if no_default_exclude else DEFAULT_EXCLUDE), *exclude),
        source=calibrate_on,
        graphs=tuple(g for g in graphs.split(",") if g),
    )
    report = quantize_artifacts(
        artifacts, options, settings, calib_dir, progress=not quiet, log=lambda m: click.echo(m, err=True)
    )
    if not report.passed:
        raise ValidationFailed(report.table())
    click.echo(report.table())
    click.echo(f"INT8 variants recorded in {artifacts / 'manifest.json'}")


@main.command("generate")
@click.option(
    "--artifacts", required=True, type=click.Path(path_type=Path), help="folder from effdiff-export"
)
@click.option("--prompt", required=True)
@click.option("--negative-prompt", default="", show_default=True)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="PNG to write (a grid if several)"
)
@click.option("--steps", default=50, show_default=True, type=int)
@click.option("--sampler", default="ddim", show_default=True, help="ddim, dpmpp-2m or euler")
@click.option("--guidance", default=7.5, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--height", type=int, help="pixels (default: the export size)")
@click.option("--width", type=int, help="pixels (default: the export size)")
@click.option("--num-images", default=1, show_default=True, type=int)
@click.option(
    "--propagation", default="none", show_default=True, help="none, fd-ddim50, fd-dpm20, uniform:K or 0,1,2,5"
)
@click.option("--max-decoder-batch", type=int, help="decoder steps per batch (default: 8 on GPU, 1 on CPU)")
@click.option(
    "--noise-alpha",
    type=float,
    help="prior noise injection z += alpha * z_T (default: 0.003 with propagation, off without; 0 = off)",
)
@click.option("--noise-tau", default=500.0, show_default=True, type=float, help="inject below this timestep")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8"]),
    help="graph variants to run (default: the folder's fp32, or fp16 for an fp16 export)",
)
@click.option("--lean", is_flag=True, help="one component in memory at a time")
@click.option("--vae-tile", type=int, help="decode the VAE in latent tiles of this size")
@click.option("--providers", help="comma-separated onnxruntime execution providers")
@click.option("--quiet", is_flag=True)
@user_errors
def generate_cmd(
    artifacts: Path,
    prompt: str,
    negative_prompt: str,
    out: Path,
    steps: int,
    sampler: str,
    guidance: float,
    seed: int,
    height: int | None,
    width: int | None,
    num_images: int,
    propagation: str,
    max_decoder_batch: int | None,
    noise_alpha: float | None,
    noise_tau: float,
    precision: str | None,
    lean: bool,
    vae_tile: int | None,
    providers: str | None,
    quiet: bool,
) -> None:
    """Text to image from exported artifacts (numpy + onnxruntime only)."""
    from effdiff.runtime.images import save_image
    from effdiff.runtime.pipeline import Pipeline
    from effdiff.runtime.propagation import KeySchedule, NoiseInjection
    from effdiff.runtime.schedulers import sampler_class

    if out.suffix.lower() != ".png":
        raise EffdiffError(f"--out must be a .png file, got {out}")
    check_writable(out)
    schedule = KeySchedule.parse(propagation)
    schedule.key_steps(steps)  # cheap checks before sessions load: steps, key steps, sampler
    sampler_class(sampler)
    injection: NoiseInjection | str | None = "auto"
    if noise_alpha is not None:
        injection = NoiseInjection(noise_alpha, noise_tau) if noise_alpha != 0 else None
    pipe = Pipeline.load(
        artifacts, providers=providers.split(",") if providers else None, lean=lean, precision=precision
    )
    result = pipe(
        prompt,
        negative_prompt,
        steps=steps,
        sampler=sampler,
        guidance_scale=guidance,
        seed=seed,
        height=height,
        width=width,
        num_images=num_images,
        propagation=schedule,
        max_decoder_batch=max_decoder_batch,
        noise_injection=injection,
        vae_tile=vae_tile,
        progress=not quiet,
        measure_memory=True,
    )
    save_image(result.images, out)
    t = result.timings
    parts = ", ".join(
        f"{k} {t[k]:.2f}s"
        for k in ("text_encoder", "unet_encoder", "unet_decoder", "unet", "vae_decoder", "overhead")
        if t[k] > 0
    )
    click.echo(
        f"wrote {out}: total {t['total']:.2f}s ({parts}; session load {t['load']:.2f}s), "
        f"peak RSS {result.peak_rss_gib:.2f} GiB"
    )


def check_writable(path: Path) -> None:
    """Fail before the work, not after it, when the output cannot be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise EffdiffError(f"cannot write {path}: folder {parent} does not exist")
    if path.exists() and path.is_dir():
        raise EffdiffError(f"cannot write {path}: it is a folder")
    import os

    if not os.access(parent, os.W_OK):
        raise EffdiffError(f"cannot write {path}: folder {parent} is not writable")


@main.command("bench")
@click.option("--artifacts", required=True, type=click.Path(path_type=Path))
@click.option(
    "--configs",
    default="full,fd",
    show_default=True,
    help="full, fd, fd:SCHEDULE, int8, fd+int8 (comma-separated)",
)
@click.option("--prompt", "prompts", multiple=True, help="repeatable; default: one SD-style prompt")
@click.option("--sampler", default="ddim", show_default=True)
@click.option("--steps", default=50, show_default=True, type=int)
@click.option("--guidance", default=7.5, show_default=True, type=float)
@click.option("--height", type=int)
@click.option("--width", type=int)
@click.option("--batch", default=1, show_default=True, type=int, help="images per prompt")
@click.option("--repeat", default=3, show_default=True, type=int)
@click.option("--warmup", default=1, show_default=True, type=int)
@click.option("--peers", default="", help="diffusers,deepcache (same model, steps, sampler and latents)")
@click.option("--providers", help="comma-separated onnxruntime execution providers")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="report folder")
@click.option("--quiet", is_flag=True)
@user_errors
def bench_cmd(
    artifacts: Path,
    configs: str,
    prompts: tuple[str, ...],
    sampler: str,
    steps: int,
    guidance: float,
    height: int | None,
    width: int | None,
    batch: int,
    repeat: int,
    warmup: int,
    peers: str,
    providers: str | None,
    out: Path,
    quiet: bool,
) -> None:
    """Latency, memory and quality of each configuration and peer, side by side, with plots."""
    from effdiff.bench.harness import BenchSettings, parse_configs, run_bench
    from effdiff.bench.report import markdown, write_report

    if repeat < 1 or warmup < 0 or batch < 1:
        raise EffdiffError("--repeat and --batch must be >= 1 and --warmup >= 0")
    from effdiff.artifacts import Manifest
    from effdiff.reference.scenes import DEMO_SCENES

    # On the reference model with no prompts given: the demo's scenes, with adherence scored too.
    on_reference = Manifest.read(artifacts).is_reference
    scenes = list(DEMO_SCENES) if on_reference and not prompts else None
    default_prompts = [s.prompt for s in scenes] if scenes else ["a photo of a cat on a red background"]
    settings = BenchSettings(
        prompts=list(prompts) or default_prompts,
        sampler=sampler,
        steps=steps,
        guidance=guidance,
        height=height,
        width=width,
        batch=batch,
        repeat=repeat,
        warmup=warmup,
    )
    report = run_bench(
        artifacts,
        parse_configs([c for c in configs.split(",") if c], sampler, steps),
        settings,
        peers=tuple(p for p in peers.split(",") if p),
        providers=providers.split(",") if providers else None,
        scenes=scenes,
        progress=not quiet,
    )
    write_report(report, out)
    click.echo(markdown(report))
    click.echo(f"report: {out / 'report.md'}")


@main.command("demo")
@click.option("--out", default="effdiff-demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--steps", default=50, show_default=True, type=int)
@click.option("--no-peers", is_flag=True, help="skip diffusers / DeepCache")
@user_errors
def demo_cmd(out: Path, steps: int, no_peers: bool) -> None:
    """Export the bundled reference model, generate with each configuration, write a report folder."""
    from effdiff.bench.demo import run_demo
    from effdiff.bench.report import markdown

    report, _ = run_demo(
        out,
        steps=steps,
        peers=() if no_peers else ("diffusers", "deepcache"),
        log=lambda m: click.echo(m, err=True),
    )
    click.echo(markdown(report))
    click.echo(f"report: {out / 'report' / 'report.md'}")
