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
@click.option("--lean", is_flag=True, help="one component in memory at a time")
@click.option("--vae-tile", type=int, help="decode the VAE in latent tiles of this size")
@click.option("--providers", help="comma-separated onnxruntime execution providers")
@click.option("--kb", type=click.Path(path_type=Path), help="start from a knowledge base (effdiff kb build)")
@click.option("--kb-mode", default="latent", show_default=True, type=click.Choice(["latent", "prompt"]))
@click.option(
    "--kb-jump", default="adaptive", show_default=True, help="adaptive, adaptive:Q1,..., none or a step"
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
    lean: bool,
    vae_tile: int | None,
    providers: str | None,
    kb: Path | None,
    kb_mode: str,
    kb_jump: str,
    kb_combine: str,
    kb_neighbours: int,
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
    knowledge = None
    if kb is not None:
        from effdiff.kb.store import KnowledgeBase

        knowledge = KnowledgeBase.open(kb)
        s = knowledge.settings
        steps, sampler = steps or s.steps, sampler or s.sampler
        guidance = s.guidance if guidance is None else guidance
    steps, sampler = steps or 50, sampler or "ddim"
    guidance = 7.5 if guidance is None else guidance
    schedule = KeySchedule.parse(propagation)
    schedule.key_steps(steps)  # cheap checks before sessions load: steps, key steps, sampler
    sampler_class(sampler)
    injection: NoiseInjection | str | None = "auto"
    if noise_alpha is not None:
        injection = NoiseInjection(noise_alpha, noise_tau) if noise_alpha != 0 else None
    pipe = Pipeline.load(
        artifacts, providers=providers.split(",") if providers else None, lean=lean, precision=precision
    )
    run: Any = pipe
    if knowledge is not None:
        from effdiff.kb.retrieval import RetrievalStart, jump_policy

        policy = jump_policy(knowledge, kb_jump, kb_mode)
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
    line = (
        f"wrote {out}: total {t['total']:.2f}s ({parts}; session load {t['load']:.2f}s), "
        f"peak RSS {result.peak_rss_gib:.2f} GiB"
    )
    if knowledge is not None:
        line += f"; {result.summary(knowledge.settings.key_step)}, lookup {t['kb_lookup'] * 1e3:.1f} ms"
    click.echo(line)


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
    help="full, fd, fd:SCHEDULE, kb, fd+kb (comma-separated)",
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
@click.option(
    "--kb", type=click.Path(path_type=Path), help="knowledge base for the kb and fd+kb configurations"
)
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
    kb: Path | None,
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
        parse_configs([c for c in configs.split(",") if c], sampler, steps, kb),
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
@index_options
@click.option("--batch", default=32, show_default=True, type=int, help="entries per runtime call")
@click.option("--checkpoint-every", default=256, show_default=True, type=int, help="entries per checkpoint")
@click.option("--shard", help="i/n: build the i-th of n parts (join them with `effdiff kb merge`)")
@click.option("--resume", is_flag=True, help="continue an interrupted build from its checkpoints")
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
    index: str,
    prompt_index: str | None,
    nprobe: int,
    shortlist: int,
    jump_quantiles: str | None,
    batch: int,
    checkpoint_every: int,
    shard: str | None,
    resume: bool,
    precision: str | None,
    height: int | None,
    width: int | None,
    quiet: bool,
) -> None:
    """Generate trajectories for prompts x seeds and store keys, values and faiss indexes on disk."""
    from effdiff.kb.build import build_kb, parse_shard, read_prompts
    from effdiff.kb.retrieval import as_int_list
    from effdiff.kb.store import BuildSettings

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
    )
    settings.check()  # before the prompts or the artifacts are read
    report = build_kb(
        artifacts,
        read_prompts(prompts_file),
        out,
        settings,
        _index(index, prompt_index, nprobe, shortlist, jump_quantiles),
        shard=parse_shard(shard) if shard else None,
        resume=resume,
        checkpoint_every=checkpoint_every,
        batch=batch,
        precision=precision,
        progress=not quiet,
        log=lambda m: click.echo(m, err=True),
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
@user_errors
def kb_eval_cmd(kb: Path, queries: int, artifacts: Path | None, count: int, jump: str) -> None:
    """Recall@1/@10 against exact search and lookup latency; with --artifacts of the reference model,
    UNet evaluations saved against adherence and PSNR on held-in and held-out prompts."""
    from effdiff.kb.evaluate import KBConfig, eval_index, eval_quality, markdown_table
    from effdiff.kb.store import KnowledgeBase

    if queries < 1 or count < 1:
        raise EffdiffError("--queries and --count must be >= 1")
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
    configs = [KBConfig(f"kb {jump}", jump=jump)]
    rows = []
    for split, scenes in (("held-in", held_in_scenes(count)), ("held-out", held_out_scenes())):
        rows += eval_quality(pipe, knowledge, scenes, split, configs, log=lambda m: click.echo(m, err=True))
    click.echo(markdown_table(rows))
