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


class OneLineGroup(click.Group):
    """click's own usage errors (a bad integer, an unknown option) as one `error:` line too, not click's
    three-line usage block: every bad input gets one line and a non-zero exit."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("standalone_mode", None)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()} (see --help)", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)


@click.group(cls=OneLineGroup)
@click.version_option(__version__, prog_name="effdiff")
def main() -> None:
    """effdiff: export Stable-Diffusion-class models as split-UNet graphs and run them fast."""


@click.group("export", cls=OneLineGroup)
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
@click.option(
    "--cache-branch",
    default=0,
    show_default=True,
    type=int,
    help="DeepCache's branch (3 x block + layer) for the unet_deep/unet_shallow graphs",
)
@click.option("--quiet", is_flag=True, help="no progress bar")
@user_errors
def export_onnx_cmd(
    model: str,
    out: Path,
    opset: int,
    precision: str,
    height: int | None,
    width: int | None,
    cache_branch: int,
    quiet: bool,
) -> None:
    """Split the UNet into encoder/decoder (and DeepCache's deep/shallow graphs), export every graph to
    ONNX and validate each against PyTorch."""
    from effdiff.export.onnx import ExportRecipe, Precision, export_onnx

    recipe = ExportRecipe(
        opset=opset, precision=Precision(precision), height=height, width=width, cache_branch=cache_branch
    )
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
@click.option(
    "--cache-interval",
    default=3,
    show_default=True,
    type=click.IntRange(1),
    help="the cache:N schedule captured for unet_deep/unet_shallow (when the folder has them)",
)
@click.option("--guidance", type=float, help="default: 3 for the reference model, else 7.5")
@click.option("--calib-dir", type=click.Path(path_type=Path), help="default: ARTIFACTS/calibration")
@click.option(
    "--graphs",
    default="",
    help="UNet graphs to quantize, comma-separated (default: every UNet graph the folder has in fp32)",
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
    cache_interval: int,
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
        cache_interval=cache_interval,
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
@click.option(
    "--memory-budget", help="plan to fit this much RAM (e.g. 2GiB): residency, ORT options, VAE tiling"
)
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
    memory_budget: str | None,
    vae_tile: int | None,
    providers: str | None,
    quiet: bool,
) -> None:
    """Text to image from exported artifacts (numpy + onnxruntime only)."""
    from effdiff.artifacts import check_writable_file
    from effdiff.runtime.images import save_image
    from effdiff.runtime.pipeline import Pipeline
    from effdiff.runtime.propagation import DEFAULT_INJECTION, KeySchedule, NoiseInjection
    from effdiff.runtime.schedulers import sampler_class

    check_writable_file(out, ".png")
    schedule = KeySchedule.parse(propagation)
    schedule.key_steps(steps)  # cheap checks before sessions load: steps, key steps, sampler
    sampler_class(sampler)
    # checked even when it ends up unused: a bad value is a mistake worth telling
    given = NoiseInjection(DEFAULT_INJECTION.alpha if noise_alpha is None else noise_alpha, noise_tau)
    if noise_alpha is None:  # "auto": injection with propagation only, at the tau given
        injection = given if schedule.propagates else None
    else:
        injection = given if noise_alpha != 0 else None
    pipe = Pipeline.load(
        artifacts,
        providers=providers.split(",") if providers else None,
        lean=lean,
        precision=precision,
        memory_budget=memory_budget,
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
    if "memory_plan" in result.info:
        click.echo(result.info["memory_plan"])
    click.echo(
        f"wrote {out}: total {t['total']:.2f}s ({parts}; session load {t['load']:.2f}s), "
        f"peak RSS {result.peak_rss_gib:.2f} GiB"
    )


@main.command("profile-memory")
@click.option("--artifacts", required=True, type=click.Path(path_type=Path))
@click.option("--height", type=int, help="pixels (default: the export size)")
@click.option("--width", type=int, help="pixels (default: the export size)")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]))
@user_errors
def profile_memory_cmd(artifacts: Path, height: int | None, width: int | None, precision: str | None) -> None:
    """Measure what each graph costs in memory on this machine (sessions, creation, activations at two
    sizes, default and lean ORT options) and store it in the folder for --memory-budget plans."""
    from tqdm import tqdm

    from effdiff.runtime.backends.ort import OrtBackend
    from effdiff.runtime.memory import OPTION_SETS, PROFILE_FILE, profile_memory
    from effdiff.runtime.pipeline import Pipeline

    pipe = Pipeline.load(artifacts, precision=precision)
    h, w = pipe.default_size()
    latent = pipe.geometry.latent_size(height or h, width or w)
    bar = tqdm(total=len(pipe.variants) * len(OPTION_SETS), desc="profile", unit="graph")
    profile = profile_memory(
        pipe.artifacts,
        pipe.manifest,
        pipe.variants,
        pipe.specs,
        lambda options: OrtBackend(session_options=options),
        latent,
        progress=bar.update,
    )
    bar.close()
    for graph, variants in profile.costs.items():
        for variant, options in variants.items():
            for name, cost in options.items():
                click.echo(
                    f"{graph:<14} {variant:<5} {name:<8} resident {cost.resident / 2**20:8.1f} MiB, creation "
                    f"+{cost.create_extra / 2**20:7.1f} MiB, activations x pixels^{cost.exponent:.2f}"
                )
    click.echo(f"wrote {pipe.artifacts / PROFILE_FILE}")


@main.command("verify")
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option("--quick", is_flag=True, help="hash only files changed since their last verification")
@user_errors
def verify_cmd(artifacts: Path, quick: bool) -> None:
    """Check every file of an artifacts folder against the sizes and sha256 sums in its manifest."""
    from effdiff.artifacts import verify_artifacts

    report = verify_artifacts(artifacts, full=not quick)
    click.echo(report.table())
    if not report.ok:
        raise EffdiffError(f"{artifacts} does not match its manifest; re-export it")


@main.command("bench")
@click.option("--artifacts", required=True, type=click.Path(path_type=Path))
@click.option(
    "--configs",
    default="full,fd",
    show_default=True,
    help="full, fd, fd:SCHEDULE, cache:N, joined with +int8 (comma-separated)",
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
@click.option(
    "--backend", default="ort", show_default=True, help="ort, torch, trt (comma-separated: compared)"
)
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
    backend: str,
    out: Path,
    quiet: bool,
) -> None:
    """Latency, memory and quality of each configuration and peer, side by side, with plots."""
    from effdiff.artifacts import check_writable_folder
    from effdiff.bench.harness import BenchSettings, parse_configs, run_bench, with_backends
    from effdiff.bench.report import markdown, write_report
    from effdiff.runtime.pipeline import check_guidance

    if repeat < 1 or warmup < 0 or batch < 1:
        raise EffdiffError("--repeat and --batch must be >= 1 and --warmup >= 0")
    check_guidance(guidance)
    check_writable_folder(out)  # before the benchmark, not after it
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
        with_backends(
            parse_configs([c for c in configs.split(",") if c], sampler, steps),
            [b for b in backend.split(",") if b],
        ),
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
    from effdiff.artifacts import check_writable_folder
    from effdiff.bench.demo import run_demo
    from effdiff.bench.report import markdown

    if steps < 1:
        raise EffdiffError(f"--steps must be >= 1, got {steps}")
    check_writable_folder(out)
    report, _ = run_demo(
        out,
        steps=steps,
        peers=() if no_peers else ("diffusers", "deepcache"),
        log=lambda m: click.echo(m, err=True),
    )
    click.echo(markdown(report))
    click.echo(f"report: {out / 'report' / 'report.md'}")


@export_main.command("trt")
@click.option(
    "--artifacts", required=True, type=click.Path(path_type=Path), help="folder from effdiff-export"
)
@click.option("--precision", default="fp16", show_default=True, type=click.Choice(["fp16", "int8"]))
@click.option(
    "--timing-cache", type=click.Path(path_type=Path), help="TensorRT timing cache to read and update"
)
@click.option(
    "--max-batch",
    default=2,
    show_default=True,
    type=click.IntRange(1, 64),
    help="largest batch (2 per guided image)",
)
@click.option("--quiet", is_flag=True, help="no progress bar")
@user_errors
def export_trt_cmd(
    artifacts: Path, precision: str, timing_cache: Path | None, max_batch: int, quiet: bool
) -> None:
    """Build one TensorRT engine per graph (Polygraphy), recorded in the manifest; needs an NVIDIA GPU."""
    from effdiff.export.trt import EngineRecipe, build_engines
    from effdiff.specs import Precision

    recipe = EngineRecipe(Precision(precision), max_batch=max_batch, timing_cache=timing_cache)
    report = build_engines(artifacts, recipe, progress=not quiet, log=lambda m: click.echo(m, err=True))
    click.echo(report.table())
    click.echo(f"engines for TensorRT {report.target.tensorrt} on {report.target.gpu}; manifest updated")


@export_main.command("coreml")
@click.option(
    "--artifacts", required=True, type=click.Path(path_type=Path), help="folder from effdiff-export"
)
@click.option("--precision", default="fp16", show_default=True, type=click.Choice(["fp16"]))
@click.option("--palettize", type=click.Choice(["8", "6", "4"]), help="also write weight-palettized packages")
@click.option("--quiet", is_flag=True, help="no progress bar")
@user_errors
def export_coreml_cmd(artifacts: Path, precision: str, palettize: str | None, quiet: bool) -> None:
    """Convert text encoder, UNet encoder/decoder and VAE decoder to CoreML .mlpackage (runs on Linux)."""
    from effdiff.export.coreml import CoreMLRecipe, export_coreml
    from effdiff.specs import Precision

    recipe = CoreMLRecipe(Precision(precision), palettize=int(palettize) if palettize else None)
    report = export_coreml(artifacts, recipe, progress=not quiet, log=lambda m: click.echo(m, err=True))
    click.echo(report.table())
    click.echo(
        "packages recorded in the manifest; prediction needs macOS (`Pipeline.load(..., backend='coreml')`)"
    )
