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
@click.option(
    "--attention",
    default="standard",
    show_default=True,
    type=click.Choice(["standard", "fused"]),
    help="fused: ONNX Runtime's MultiHeadAttention in the UNet and VAE graphs (less memory, faster; "
    "ONNX Runtime only, not TensorRT)",
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
    attention: str,
    quiet: bool,
) -> None:
    """Split the UNet into encoder/decoder (and DeepCache's deep/shallow graphs), export every graph to
    ONNX and validate each against PyTorch."""
    from effdiff.export.onnx import ExportRecipe, Precision, export_onnx

    recipe = ExportRecipe(
        opset=opset,
        precision=Precision(precision),
        height=height,
        width=width,
        cache_branch=cache_branch,
        attention=attention,
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
@click.option(
    "--float-weights",
    default="fp16",
    show_default=True,
    type=click.Choice(["fp16", "fp32"]),
    help="storage of the weights of layers kept in float (fp16 is cast back to fp32 at load)",
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
@click.option("--guidance", type=float, help="default: 2 for the reference model, else 7.5")
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
    float_weights: str,
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
        float_weights=float_weights,
    )
    report = quantize_artifacts(
        artifacts, options, settings, calib_dir, progress=not quiet, log=lambda m: click.echo(m, err=True)
    )
    if not report.passed:
        raise ValidationFailed(report.table())
    click.echo(report.table())
    click.echo(f"INT8 variants recorded in {artifacts / 'manifest.json'}")


@export_main.command("fp16-weights")
@click.option(
    "--artifacts", required=True, type=click.Path(path_type=Path), help="folder from effdiff-export onnx"
)
@click.option(
    "--graphs",
    default="",
    help="graphs to write, comma-separated (default: every graph the folder has in fp32)",
)
@click.option("--quiet", is_flag=True)
@user_errors
def export_fp16_weights_cmd(artifacts: Path, graphs: str, quiet: bool) -> None:
    """fp32 graphs with their Conv/MatMul/Gemm weights stored fp16 (variant fp32-w16): half the disk, and
    half the memory in lean plans on CPUs (`effdiff generate --fp16-weights --memory-budget 2GiB`)."""
    from effdiff.export.weights import store_weights_fp16

    names = tuple(g for g in graphs.split(",") if g)
    report = store_weights_fp16(artifacts, names, progress=not quiet, log=lambda m: click.echo(m, err=True))
    if not report.passed:
        raise ValidationFailed(report.table())
    click.echo(report.table())
    click.echo(f"fp32-w16 variants recorded in {artifacts / 'manifest.json'}")


@main.command("generate")
@click.option(
    "--artifacts", required=True, type=click.Path(path_type=Path), help="folder from effdiff-export"
)
@click.option("--prompt", required=True)
@click.option("--negative-prompt", default="", show_default=True)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="PNG to write (a grid if several)"
)
@click.option("--steps", type=int, help="default 50, or the knowledge base's")
@click.option("--sampler", help="ddim, dpmpp-2m or euler (default ddim, or the knowledge base's)")
@click.option("--guidance", type=float, help="default 7.5, or the knowledge base's")
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
@click.option(
    "--fp16-weights",
    is_flag=True,
    help="run the fp32-w16 variants (weights stored fp16, computed fp32; `effdiff-export fp16-weights`)",
)
@click.option("--lean", is_flag=True, help="one component in memory at a time")
@click.option(
    "--memory-budget", help="plan to fit this much RAM (e.g. 2GiB): residency, ORT options, VAE tiling"
)
@click.option("--vae-tile", type=int, help="decode the VAE in latent tiles of this size")
@click.option("--providers", help="comma-separated onnxruntime execution providers")
@click.option("--kb", type=click.Path(path_type=Path), help="start from a knowledge base (effdiff kb build)")
@click.option("--kb-mode", default="latent", show_default=True, type=click.Choice(["latent", "prompt"]))
@click.option(
    "--kb-jump", default="adaptive", show_default=True, help="adaptive, adaptive:Q1,..., none or a step"
)
@click.option(
    "--kb-prompt-gate",
    help="adaptive latent jumps only for prompts this close to a stored one: a quantile of the KB's own "
    "prompt distances (default 0.95, as the shortest jump's), or off",
)
@click.option(
    "--kb-max-error",
    help="adaptive latent jumps stop at the last value step whose leave-one-out value error (relative L2, "
    "recorded by kb build) is within this (default 0.2), or off; prompt mode and a fixed --kb-jump "
    "STEP are not capped",
)
@click.option("--kb-combine", default="lstsq", show_default=True, type=click.Choice(["lstsq", "nearest"]))
@click.option("--kb-neighbours", default=4, show_default=True, type=int)
@click.option("--quiet", is_flag=True)
@user_errors
def generate_cmd(
    artifacts: Path,
    prompt: str,
    negative_prompt: str,
    out: Path,
    steps: int | None,
    sampler: str | None,
    guidance: float | None,
    seed: int,
    height: int | None,
    width: int | None,
    num_images: int,
    propagation: str,
    max_decoder_batch: int | None,
    noise_alpha: float | None,
    noise_tau: float,
    precision: str | None,
    fp16_weights: bool,
    lean: bool,
    memory_budget: str | None,
    vae_tile: int | None,
    providers: str | None,
    kb: Path | None,
    kb_mode: str,
    kb_jump: str,
    kb_prompt_gate: str | None,
    kb_max_error: str | None,
    kb_combine: str,
    kb_neighbours: int,
    quiet: bool,
) -> None:
    """Text to image from exported artifacts (numpy + onnxruntime only)."""
    from effdiff.artifacts import check_writable_file
    from effdiff.runtime.images import save_image
    from effdiff.runtime.pipeline import Pipeline
    from effdiff.runtime.propagation import DEFAULT_INJECTION, KeySchedule, NoiseInjection
    from effdiff.runtime.schedulers import sampler_class

    check_writable_file(out, ".png")
    knowledge = policy = None
    if kb is not None:
        from effdiff.kb.retrieval import as_max_error, as_prompt_gate, jump_policy
        from effdiff.kb.store import KnowledgeBase

        knowledge = KnowledgeBase.open(kb)
        # the jump options are checked before any session loads, as the other options are
        gate, cap = as_prompt_gate(kb_prompt_gate), as_max_error(kb_max_error)
        policy = jump_policy(knowledge, kb_jump, kb_mode, gate, cap, kb_combine)
        s = knowledge.settings
        steps = s.steps if steps is None else steps
        sampler = s.sampler if sampler is None else sampler
        guidance = s.guidance if guidance is None else guidance
    # `is None`, not `or`: an explicit 0 or "" is a mistake to report, not a request for the default
    steps = 50 if steps is None else steps
    sampler = "ddim" if sampler is None else sampler
    guidance = 7.5 if guidance is None else guidance
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
        fp16_weights=fp16_weights,
    )
    run: Any = pipe
    if knowledge is not None:
        from effdiff.kb.retrieval import RetrievalStart

        run = RetrievalStart(pipe, knowledge, kb_mode, kb_combine, kb_neighbours, policy)
    result = run(
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
    line = (
        f"wrote {out}: total {t['total']:.2f}s ({parts}; session load {t['load']:.2f}s), "
        f"peak RSS {result.peak_rss_gib:.2f} GiB"
    )
    if knowledge is not None:
        line += f"; {result.summary(knowledge.settings.key_step)}, lookup {t['kb_lookup'] * 1e3:.1f} ms"
    click.echo(line)


@main.command("profile-memory")
@click.option("--artifacts", required=True, type=click.Path(path_type=Path))
@click.option("--height", type=int, help="pixels (default: the export size)")
@click.option("--width", type=int, help="pixels (default: the export size)")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]))
@click.option(
    "--fp16-weights", is_flag=True, help="profile the fp32-w16 variants (`effdiff-export fp16-weights`)"
)
@user_errors
def profile_memory_cmd(
    artifacts: Path, height: int | None, width: int | None, precision: str | None, fp16_weights: bool
) -> None:
    """Measure what each graph costs in memory on this machine (sessions, creation, activations at two
    sizes, default and lean ORT options) and store it in the folder for --memory-budget plans."""
    from tqdm import tqdm

    from effdiff.runtime.memory import OPTION_SETS, PROFILE_FILE, profile_memory
    from effdiff.runtime.pipeline import Pipeline

    pipe = Pipeline.load(artifacts, precision=precision, fp16_weights=fp16_weights)
    h, w = pipe.default_size()
    latent = pipe.geometry.latent_size(height or h, width or w)
    bar = tqdm(total=len(pipe.variants) * len(OPTION_SETS), desc="profile", unit="graph")
    profile = profile_memory(
        pipe.artifacts,
        pipe.manifest,
        pipe.variants,
        pipe.specs,
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
    help="full, fd, fd:SCHEDULE, cache:N, joined with int8, kb and budget:SIZE by + (comma-separated)",
)
@click.option("--prompt", "prompts", multiple=True, help="repeatable; default: one SD-style prompt")
@click.option("--sampler", default="ddim", show_default=True)
@click.option("--steps", default=50, show_default=True, type=int)
@click.option("--guidance", default=7.5, show_default=True, type=float)
@click.option("--height", type=int)
@click.option("--width", type=int)
@click.option("--batch", default=1, show_default=True, type=int, help="images per prompt")
@click.option(
    "--one-at-a-time",
    is_flag=True,
    help="each prompt in a call of its own, one after another (an app serving one request at a time); "
    "default: every prompt in one batch",
)
@click.option("--repeat", default=3, show_default=True, type=int)
@click.option("--warmup", default=1, show_default=True, type=int)
@click.option("--peers", default="", help="diffusers,deepcache (same model, steps, sampler and latents)")
@click.option(
    "--kb",
    type=click.Path(path_type=Path),
    multiple=True,
    help="knowledge base for the kb configurations (repeat it: each starts from the KB of its schedule)",
)
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
    one_at_a_time: bool,
    repeat: int,
    warmup: int,
    peers: str,
    kb: tuple[Path, ...],
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
        one_at_a_time=one_at_a_time,
    )
    report = run_bench(
        artifacts,
        with_backends(
            parse_configs([c for c in configs.split(",") if c], sampler, steps, kb),
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


# ---------------------------------------------------------------- knowledge base


@main.group("kb")
def kb_group() -> None:
    """Trajectory knowledge base for retrieval start: build, merge, inspect, evaluate."""


def index_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options that say how a KB's indexes and jump thresholds are made (build, merge, reindex)."""
    options = [
        click.option(
            "--index", default="PCA256,IVF256,PQ16", show_default=True, help="faiss factory for keys"
        ),
        click.option(
            "--prompt-index", help="faiss factory for prompt keys (default: PQ16 or the widest that fits)"
        ),
        click.option("--nprobe", default=16, show_default=True, type=int, help="IVF lists visited per query"),
        click.option(
            "--shortlist", default=64, show_default=True, type=int, help="candidates re-ranked exactly"
        ),
        click.option("--jump-quantiles", help="one per value step, falling (default 0.95 .. 0.6)"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _index(
    index: str, prompt_index: str | None, nprobe: int, shortlist: int, jump_quantiles: str | None
) -> Any:
    from effdiff.kb.build import IndexOptions
    from effdiff.kb.retrieval import as_float_list

    quantiles = as_float_list(jump_quantiles) if jump_quantiles else None
    return IndexOptions(index, prompt_index, nprobe, shortlist, quantiles)


def _echo_build(report: Any) -> None:
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(report.summary())


@kb_group.command("build")
@click.option(
    "--artifacts", required=True, type=click.Path(path_type=Path), help="folder from effdiff-export"
)
@click.option(
    "--prompts", "prompts_file", required=True, type=click.Path(path_type=Path), help="one per line"
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="knowledge-base folder to write")
@click.option("--seeds", default="0", show_default=True, help="starting-noise seeds per prompt, e.g. 0,1,2")
@click.option("--steps", default=50, show_default=True, type=int)
@click.option("--sampler", default="ddim", show_default=True)
@click.option("--guidance", default=7.5, show_default=True, type=float)
@click.option("--negative-prompt", default="", show_default=True)
@click.option("--key-step", default=10, show_default=True, type=int)
@click.option("--value-steps", default="20,25,30", show_default=True)
@click.option(
    "--propagation",
    default="none",
    show_default=True,
    help="schedule the trajectories run on, as generate's: none (the whole UNet), cache:N, fd-ddim50, "
    "uniform:K or 0,1,2,5; build with the schedule the KB will be used with",
)
@index_options
@click.option("--batch", default=32, show_default=True, type=int, help="entries per runtime call")
@click.option("--checkpoint-every", default=256, show_default=True, type=int, help="entries per checkpoint")
@click.option("--shard", help="i/n: build the i-th of n parts (join them with `effdiff kb merge`)")
@click.option("--resume", is_flag=True, help="continue an interrupted build from its checkpoints")
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="auto",
    help="build the shards on Ray actors: auto (a running cluster; the default of a bare --ray), "
    "local (start one here) or host:port; --out must be a path every node sees",
)
@click.option("--shards", type=int, help="with --ray: parts to cut the build into (default: one per actor)")
@click.option("--actors", type=int, help="with --ray: at most this many actors (default: one per GPU or CPU)")
@click.option(
    "--actor-cpus", default=1, show_default=True, type=int, help="with --ray: CPUs (and threads) per actor"
)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]))
@click.option("--height", type=int)
@click.option("--width", type=int)
@click.option("--quiet", is_flag=True)
@user_errors
def kb_build_cmd(
    artifacts: Path,
    prompts_file: Path,
    out: Path,
    seeds: str,
    steps: int,
    sampler: str,
    guidance: float,
    negative_prompt: str,
    key_step: int,
    value_steps: str,
    propagation: str,
    index: str,
    prompt_index: str | None,
    nprobe: int,
    shortlist: int,
    jump_quantiles: str | None,
    batch: int,
    checkpoint_every: int,
    shard: str | None,
    resume: bool,
    ray_address: str | None,
    shards: int | None,
    actors: int | None,
    actor_cpus: int,
    precision: str | None,
    height: int | None,
    width: int | None,
    quiet: bool,
) -> None:
    """Generate trajectories for prompts x seeds and store keys, values and faiss indexes on disk."""
    from effdiff.kb.build import build_kb, parse_shard, read_prompts
    from effdiff.kb.retrieval import as_int_list
    from effdiff.kb.store import BuildSettings
    from effdiff.runtime.propagation import KeySchedule

    settings = BuildSettings(
        sampler=sampler,
        steps=steps,
        guidance=guidance,
        key_step=key_step,
        value_steps=as_int_list(value_steps),
        seeds=as_int_list(seeds),
        negative_prompt=negative_prompt,
        height=height,
        width=width,
        propagation=str(KeySchedule.parse(propagation)),  # one spelling per schedule in kb.json
    )
    settings.check()  # before the prompts or the artifacts are read
    if ray_address is None and (shards is not None or actors is not None):
        raise EffdiffError("--shards and --actors need --ray (one part of a local build: --shard i/n)")
    # what a local build and a Ray build share
    common: dict[str, Any] = dict(
        resume=resume,
        checkpoint_every=checkpoint_every,
        batch=batch,
        precision=precision,
        progress=not quiet,
        log=lambda m: click.echo(m, err=True),
    )
    index_options = _index(index, prompt_index, nprobe, shortlist, jump_quantiles)
    if ray_address is not None:
        if shard:
            raise EffdiffError("--shard builds one part here; with --ray give --shards N instead")
        from effdiff.kb.distributed import RayOptions, build_kb_ray

        options = RayOptions(ray_address, shards, actors, actor_cpus)
        options.check()
        report: Any = build_kb_ray(
            artifacts, read_prompts(prompts_file), out, settings, index_options, options, **common
        )
    else:
        report = build_kb(
            artifacts,
            read_prompts(prompts_file),
            out,
            settings,
            index_options,
            shard=parse_shard(shard) if shard else None,
            **common,
        )
    _echo_build(report)


@kb_group.command("merge")
@click.argument("parts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path))
@index_options
@user_errors
def kb_merge_cmd(parts: tuple[Path, ...], out: Path, **index: Any) -> None:
    """Join the parts of a sharded build (`kb build --shard i/n`) into one knowledge base."""
    from effdiff.kb.build import merge_kb

    _echo_build(merge_kb(list(parts), out, _index(**index), log=lambda m: click.echo(m, err=True)))


@kb_group.command("reindex")
@click.argument("kb", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="new knowledge-base folder")
@index_options
@user_errors
def kb_reindex_cmd(kb: Path, out: Path, **index: Any) -> None:
    """Copy a knowledge base with other indexes or jump quantiles (no trajectories generated again)."""
    from effdiff.kb.build import reindex_kb

    _echo_build(reindex_kb(kb, out, _index(**index), log=lambda m: click.echo(m, err=True)))


@kb_group.command("info")
@click.argument("kb", type=click.Path(path_type=Path))
@click.option("--checksum", is_flag=True, help="also check every file's sha256")
@user_errors
def kb_info_cmd(kb: Path, checksum: bool) -> None:
    """Entries, bytes per entry in RAM and on disk, index type, steps and jump thresholds."""
    from effdiff.kb.evaluate import kb_info

    for line in kb_info(kb, checksum).lines():
        click.echo(line)


@kb_group.command("eval")
@click.argument("kb", type=click.Path(path_type=Path))
@click.option("--queries", default=200, show_default=True, type=int, help="held-out lookups for recall")
@click.option("--artifacts", type=click.Path(path_type=Path), help="reference-model artifacts: adds quality")
@click.option("--count", default=192, show_default=True, type=int, help="held-in scenes scored")
@click.option("--jump", default="adaptive", show_default=True, help="as generate --kb-jump")
@click.option("--prompt-gate", help="as generate --kb-prompt-gate")
@click.option("--max-error", help="as generate --kb-max-error")
@user_errors
def kb_eval_cmd(
    kb: Path,
    queries: int,
    artifacts: Path | None,
    count: int,
    jump: str,
    prompt_gate: str | None,
    max_error: str | None,
) -> None:
    """Recall@1/@10 against exact search and lookup latency; with --artifacts of the reference model,
    UNet evaluations saved against adherence and PSNR on held-in and held-out prompts."""
    from effdiff.kb.evaluate import KBConfig, eval_index, eval_quality, markdown_table
    from effdiff.kb.retrieval import as_max_error, as_prompt_gate
    from effdiff.kb.store import KnowledgeBase

    if queries < 1 or count < 1:
        raise EffdiffError("--queries and --count must be >= 1")
    gate, cap = as_prompt_gate(prompt_gate), as_max_error(max_error)
    knowledge = KnowledgeBase.open(kb)
    for space in ("latent", "prompt"):
        for line in eval_index(knowledge, queries, space).lines():
            click.echo(line)
    if artifacts is None:
        return
    from effdiff.artifacts import Manifest
    from effdiff.reference.scenes import held_in_scenes, held_out_scenes
    from effdiff.runtime.pipeline import Pipeline

    if not Manifest.read(artifacts).is_reference:
        raise EffdiffError(
            "quality needs the reference model's artifacts (effdiff-export onnx --model reference)"
        )
    pipe = Pipeline.load(artifacts)
    configs = [KBConfig(f"kb {jump}", jump=jump, prompt_gate=gate, max_error=cap)]
    rows = []
    for split, scenes in (("held-in", held_in_scenes(count)), ("held-out", held_out_scenes())):
        rows += eval_quality(pipe, knowledge, scenes, split, configs, log=lambda m: click.echo(m, err=True))
    click.echo(markdown_table(rows))
