"""Measure configurations and peers side by side, on the same artifacts, prompts, seeds and steps.

For each configuration: session load time, latency per component and end to end (median / p90 / min
over timed runs after warm-up), per-step UNet time, peak host RSS (sampled every 5 ms), GPU memory
through NVML when present, artifacts' size on disk, and quality against the `full` configuration
(PSNR/SSIM; attribute adherence when the model is effdiff's reference model).
Peers (diffusers in PyTorch, DeepCache on it) run in the same process with the same initial latents.
"""

from __future__ import annotations

import gc
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image
from tqdm import tqdm

from effdiff.artifacts import Manifest
from effdiff.bench.quality import ssim
from effdiff.compare import psnr
from effdiff.errors import EffdiffError
from effdiff.profiling import GpuMemory, PeakRSS
from effdiff.runtime.pipeline import Pipeline
from effdiff.runtime.propagation import KeySchedule
from effdiff.specs import GRAPHS, UNET_GRAPHS, Precision

REPORT_SCHEMA = 1
PEERS = ("diffusers", "deepcache")


@dataclass(frozen=True)
class BenchConfig:
    """One effdiff configuration."""

    name: str
    propagation: KeySchedule
    precision: Precision | None = None  # None: the folder's default (fp32, or fp16 for an fp16 export)
    kb: Path | None = None  # retrieval start from this knowledge base (its adaptive jumps)


def fd_schedule(sampler: str, steps: int) -> KeySchedule:
    """The encoder-propagation schedule the `fd` configuration uses for a sampler and step count."""
    if sampler == "ddim" and steps == 50:
        return KeySchedule.preset("fd-ddim50")
    if sampler == "dpmpp-2m" and steps == 20:
        return KeySchedule.preset("fd-dpm20")
    return KeySchedule.uniform(3)


def parse_configs(names: list[str], sampler: str, steps: int, kb: Path | None = None) -> list[BenchConfig]:
    """`full`, `fd`, `fd:SCHEDULE` (e.g. fd:uniform:4), `kb` and `fd+kb` (retrieval start from `kb`,
    without / with encoder propagation); INT8 is refused until it exists."""
    out = []
    for name in names:
        if name in ("kb", "fd+kb"):
            if kb is None:
                raise EffdiffError(f"configuration {name!r} needs a knowledge base (--kb KB)")
            schedule = fd_schedule(sampler, steps) if name == "fd+kb" else KeySchedule.none()
            out.append(BenchConfig(name, schedule, kb=Path(kb)))
        elif name == "full":
            out.append(BenchConfig("full", KeySchedule.none()))
        elif name == "fd":
            out.append(BenchConfig("fd", fd_schedule(sampler, steps)))
        elif name.startswith("fd:"):
            out.append(BenchConfig(name, KeySchedule.parse(name[3:])))
        elif name == "int8" or "+" in name:
            raise EffdiffError(
                f"configuration {name!r} needs INT8 / retrieval start, which this effdiff lacks yet"
            )
        else:
            raise EffdiffError(f"unknown configuration {name!r}; use full, fd, fd:SCHEDULE")
    if "full" not in [c.name for c in out]:
        out.insert(0, BenchConfig("full", KeySchedule.none()))  # quality is measured against it
    return out


@dataclass
class Stats:
    median: float
    p90: float
    min: float

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        v = sorted(values)
        return cls(statistics.median(v), float(np.percentile(v, 90)), v[0])


@dataclass
class Row:
    """One configuration or peer in the report."""

    name: str
    kind: str  # "effdiff" or "peer"
    detail: str
    load_s: float
    end_to_end: Stats
    components: dict[str, Stats] = field(default_factory=dict)
    unet_per_step_s: float = 0.0
    peak_rss_gib: float = 0.0  # the process's peak during the timed runs
    rss_added_gib: float = 0.0  # that peak minus the process's RSS before this row loaded its model
    gpu_peak_mib: float | None = None
    disk_mib: float | None = None
    quality: dict[str, float] = field(default_factory=dict)


@dataclass
class BenchSettings:
    prompts: list[str]
    sampler: str = "ddim"
    steps: int = 50
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None
    batch: int = 1
    repeat: int = 3
    warmup: int = 1
    seed: int = 0
    max_decoder_batch: int | None = None  # None: the pipeline's choice for the device


@dataclass
class BenchReport:
    schema: int
    device: dict[str, Any]
    settings: dict[str, Any]
    artifacts: str
    model: str
    rows: list[Row]
    images: dict[str, list[Image.Image]] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "device": self.device,
            "settings": self.settings,
            "artifacts": self.artifacts,
            "model": self.model,
            "rows": [asdict(r) for r in self.rows],
        }


def _latents(pipe: Pipeline, settings: BenchSettings, height: int, width: int) -> np.ndarray:
    g = pipe.geometry
    rows = len(settings.prompts) * settings.batch
    shape = (rows, g.latent_channels, height // g.vae_factor, width // g.vae_factor)
    return np.random.default_rng(settings.seed).standard_normal(shape).astype(np.float32)


def _disk_mib(pipe: Pipeline, graphs: tuple[str, ...]) -> float:
    return sum(pipe.variants[g].size_bytes for g in graphs if g in pipe.variants) / 2**20


def bench_effdiff(
    artifacts: Path,
    config: BenchConfig,
    settings: BenchSettings,
    latents: np.ndarray,
    providers: list[str] | None,
    progress: Callable[[], None],
) -> tuple[Row, list[Image.Image]]:
    gpu = GpuMemory()
    base_rss = psutil.Process().memory_info().rss
    start = time.perf_counter()
    pipe = Pipeline.load(artifacts, providers=providers, precision=config.precision)
    run: Any = pipe
    if config.kb is not None:
        from effdiff.kb.retrieval import RetrievalStart
        from effdiff.kb.store import KnowledgeBase

        run = RetrievalStart(pipe, KnowledgeBase.open(config.kb))
    unet_graphs = ("unet_encoder", "unet_decoder") if config.propagation.propagates else ("unet",)
    for g in unet_graphs:
        pipe.open_graph(g)  # graph creation counts as load, not as the first run
    load = time.perf_counter() - start
    h, w = latents.shape[2] * pipe.geometry.vae_factor, latents.shape[3] * pipe.geometry.vae_factor

    def once() -> Any:
        return run(
            settings.prompts,
            steps=settings.steps,
            sampler=settings.sampler,
            guidance_scale=settings.guidance,
            latents=latents,
            height=h,
            width=w,
            num_images=settings.batch,
            propagation=config.propagation,
            max_decoder_batch=settings.max_decoder_batch,
        )

    for _ in range(settings.warmup):
        once()
        progress()
    results = []
    with PeakRSS() as mem:
        for _ in range(settings.repeat):
            results.append(gpu.measure(once))
            progress()
    comps = {
        c: Stats.of([r.timings[c] for r in results]) for c in GRAPHS if any(r.timings[c] > 0 for r in results)
    }
    comps["overhead"] = Stats.of([r.timings["overhead"] for r in results])
    unet = statistics.median(sum(r.timings[c] for c in UNET_GRAPHS) for r in results)
    graphs = ("text_encoder", *unet_graphs, "vae_decoder")
    row = Row(
        config.name,
        "effdiff",
        str(config.propagation) + (f" + kb {config.kb.name}" if config.kb else ""),
        load,
        Stats.of([r.timings["total"] for r in results]),
        comps,
        unet_per_step_s=unet / settings.steps,
        peak_rss_gib=mem.peak_gib,
        rss_added_gib=(mem.peak_bytes - base_rss) / 2**30,
        gpu_peak_mib=gpu.peak_mib,
        disk_mib=_disk_mib(pipe, graphs),
    )
    images = results[-1].images
    return row, images


def bench_peer(
    peer: str, source: Path, settings: BenchSettings, latents: np.ndarray, progress: Callable[[], None]
) -> tuple[Row, list[Image.Image]] | None:
    """diffusers' StableDiffusionPipeline in PyTorch, plain or with DeepCache; None when not importable."""
    try:
        import torch
        from diffusers import (
            DDIMScheduler,
            DPMSolverMultistepScheduler,
            EulerDiscreteScheduler,
            StableDiffusionPipeline,
        )
    except ImportError:
        return None
    helper = None
    if peer == "deepcache":
        try:
            from DeepCache import DeepCacheSDHelper
        except ImportError:
            return None
    base_rss = psutil.Process().memory_info().rss
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None, local_files_only=True)
    cls = {"ddim": DDIMScheduler, "dpmpp-2m": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
    pipe.scheduler = cls[settings.sampler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    limit = pipe.text_encoder.config.max_position_embeddings
    if pipe.tokenizer.model_max_length > limit:  # folders saved without it overflow in diffusers
        pipe.tokenizer.model_max_length = limit
    if peer == "deepcache":
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=3, cache_branch_id=0)
        helper.enable()
    load = time.perf_counter() - start
    h = pipe.vae_scale_factor * latents.shape[2]
    w = pipe.vae_scale_factor * latents.shape[3]
    gpu = GpuMemory()

    def once() -> list[Image.Image]:
        with torch.inference_mode():
            return pipe(
                settings.prompts,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance,
                latents=torch.from_numpy(latents),
                height=h,
                width=w,
                num_images_per_prompt=settings.batch,
            ).images

    for _ in range(settings.warmup):
        once()
        progress()
    times, images = [], []
    with PeakRSS() as mem:
        for _ in range(settings.repeat):
            t0 = time.perf_counter()
            images = gpu.measure(once)
            times.append(time.perf_counter() - t0)
            progress()
    detail = "StableDiffusionPipeline, PyTorch" + (", DeepCache interval 3 branch 0" if helper else "")
    row = Row(
        peer,
        "peer",
        detail,
        load,
        Stats.of(times),
        peak_rss_gib=mem.peak_gib,
        gpu_peak_mib=gpu.peak_mib,
        rss_added_gib=(mem.peak_bytes - base_rss) / 2**30,
    )
    return row, images


def _quality(images: list[Image.Image], reference: list[Image.Image]) -> dict[str, float]:
    pairs = [(np.asarray(a), np.asarray(b)) for a, b in zip(images, reference, strict=True)]
    return {
        "psnr_db": float(np.mean([min(psnr(a, b), 99.0) for a, b in pairs])),
        "ssim": float(np.mean([ssim(a, b) for a, b in pairs])),
    }


def run_bench(
    artifacts: Path,
    configs: list[BenchConfig],
    settings: BenchSettings,
    peers: tuple[str, ...] = (),
    providers: list[str] | None = None,
    scenes: list[Any] | None = None,
    progress: bool = True,
) -> BenchReport:
    """Every configuration, then every peer, one at a time (one model in memory at a time)."""
    from effdiff.bench.device import device_profile

    artifacts = Path(artifacts)
    manifest = Manifest.read(artifacts)
    for p in peers:
        if p not in PEERS:
            raise EffdiffError(f"unknown peer {p!r}; peers: {', '.join(PEERS)}")
    probe = Pipeline.load(artifacts, providers=providers, lean=True)
    h, w = probe.default_size()
    h, w = settings.height or h, settings.width or w
    latents = _latents(probe, settings, h, w)
    kb_paths = [c.kb for c in configs if c.kb is not None]
    if kb_paths:  # every configuration starts from noise the KB holds (its seeds in turn), as in ReDi
        from effdiff.kb.build import entry_noise
        from effdiff.kb.store import KBManifest

        seeds = KBManifest.read(kb_paths[0]).settings.seeds
        latents = entry_noise(probe, [seeds[i % len(seeds)] for i in range(len(latents))], h, w)
    del probe
    runs = (settings.warmup + settings.repeat) * (len(configs) + len(peers))
    bar = tqdm(total=runs, desc="bench", unit="run", disable=not progress)
    rows, images = [], {}
    for cfg in configs:
        bar.set_postfix_str(cfg.name)
        row, imgs = bench_effdiff(artifacts, cfg, settings, latents, providers, bar.update)
        rows.append(row)
        images[cfg.name] = imgs
        gc.collect()  # the configuration's sessions go before the next one loads
    for peer in peers:
        bar.set_postfix_str(peer)
        try:
            got = bench_peer(peer, Path(manifest.source.path), settings, latents, bar.update)
        except Exception as exc:  # a peer's own failure must not cost the user the rest of the report
            warnings.warn(f"peer {peer} failed and is left out: {type(exc).__name__}: {exc}", stacklevel=2)
            got = None
        if got is None:
            bar.update(settings.warmup + settings.repeat)
            continue
        rows.append(got[0])
        images[peer] = got[1]
    bar.close()
    reference = images["full"]
    classifier = None
    if scenes is not None:
        from effdiff.reference.judge import AttributeClassifier

        classifier = AttributeClassifier()
    for row in rows:
        row.quality = _quality(images[row.name], reference)
        if classifier is not None and scenes is not None:
            adh = classifier.adherence(images[row.name], [s for s in scenes for _ in range(settings.batch)])
            row.quality["adherence"] = adh.mean
            row.quality.update({f"adherence_{k}": v for k, v in adh.per_attribute.items()})
    settings_json = {**asdict(settings), "height": h, "width": w}
    return BenchReport(
        REPORT_SCHEMA,
        device_profile(providers),
        settings_json,
        str(artifacts),
        manifest.source.model,
        rows,
        images,
    )
