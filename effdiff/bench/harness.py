"""Measure configurations and peers side by side, on the same artifacts, prompts, seeds and steps.

For each configuration: session load time, latency per component and end to end (median / p90 / min
over timed runs after warm-up), per-step UNet time, peak host RSS (sampled every 5 ms), GPU memory
through NVML when present, artifacts' size on disk, and quality against the `full` configuration
(PSNR/SSIM; attribute adherence when the model is effdiff's reference model).
Peers (diffusers in PyTorch, DeepCache on it) run in the same process with the same initial latents.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Sequence
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
from effdiff.profiling import GpuMemory, OtherProcessesCpu, PeakRSS
from effdiff.runtime.pipeline import Pipeline
from effdiff.runtime.propagation import KeySchedule
from effdiff.specs import GRAPHS, UNET_GRAPHS, Precision

REPORT_SCHEMA = 3  # 2: interleaved repeats, per-repeat speed-ups, adherence intervals; 3: contention
PEERS = ("diffusers", "deepcache")


@dataclass(frozen=True)
class BenchConfig:
    """One effdiff configuration."""

    name: str
    propagation: KeySchedule
    precision: Precision | None = None  # None: the folder's default (fp32, or fp16 for an fp16 export)
    backend: str = "ort"  # ort, torch, trt, coreml: rows of other backends are named CONFIG@BACKEND
    kb: Path | None = None  # retrieval start from this knowledge base (its adaptive jumps)
    memory_budget: str | None = None  # a pipeline that plans every call to fit this budget ("2GiB")
    fp16_weights: bool = False  # the fp32-w16 variants (`effdiff-export fp16-weights`)


def with_backends(configs: list[BenchConfig], backends: list[str]) -> list[BenchConfig]:
    """Every configuration on every backend; the first backend's rows keep their names (its `full` is
    the quality reference), the others' are CONFIG@BACKEND."""
    from dataclasses import replace

    from effdiff.runtime.backends import backend_names

    unknown = [b for b in backends if b not in backend_names()]
    if unknown or not backends:
        raise EffdiffError(
            f"unknown backend(s) {', '.join(unknown) or '(none)'}; available: {', '.join(backend_names())}"
        )
    return [
        replace(c, name=c.name if i == 0 else f"{c.name}@{b}", backend=b)
        for i, b in enumerate(backends)
        for c in configs
    ]


def fd_schedule(sampler: str, steps: int) -> KeySchedule:
    """The encoder-propagation schedule the `fd` configuration uses for a sampler and step count."""
    if sampler == "ddim" and steps == 50:
        return KeySchedule.preset("fd-ddim50")
    if sampler == "dpmpp-2m" and steps == 20:
        return KeySchedule.preset("fd-dpm20")
    return KeySchedule.uniform(3)


def parse_configs(
    names: list[str], sampler: str, steps: int, kb: Path | Sequence[Path] | None = None
) -> list[BenchConfig]:
    """Configurations composed with `+`: a schedule part (`full`, `fd` = the sampler's encoder-propagation
    schedule, `fd:SCHEDULE`, `cache:N` = DeepCache's recipe every N steps) and modifiers (`int8`, `w16` =
    weights stored fp16 (the fp32-w16 variants), `kb` = retrieval start from a knowledge base,
    `budget:SIZE` = the runtime's memory plan for that budget, whose lean plans load graphs during the
    run). Examples: `full`, `fd`, `fd:uniform:4`, `cache:3`, `int8`, `fd+int8`, `cache:3+int8`, `kb`,
    `kb+fd`, `kb+cache:3`, `kb+fd+int8`, `fd+int8+budget:2GiB`, `fd+w16+budget:3GiB`.
    With several KBs, each `kb` configuration starts from the one built on its own schedule (`kb build
    --propagation`), since a KB's keys are latents of that schedule's trajectories; the first KB when
    none matches."""
    kbs = [Path(kb)] if isinstance(kb, (str, Path)) else [Path(k) for k in kb or ()]
    out = []
    for name in names:
        schedule: KeySchedule | None = None
        precision: Precision | None = None
        wants_kb = False
        budget: str | None = None
        w16 = False
        for part in name.split("+"):
            if part in ("full", "fd") or part.startswith(("fd:", "cache:")):
                if schedule is not None:
                    raise EffdiffError(f"configuration {name!r} names two schedules; combine one with int8")
                if part == "full":
                    schedule = KeySchedule.none()
                elif part == "fd":
                    schedule = fd_schedule(sampler, steps)
                else:
                    schedule = KeySchedule.parse(part[3:] if part.startswith("fd:") else part)
            elif part == "int8":
                precision = Precision.INT8
            elif part == "w16":
                w16 = True
            elif part.startswith("budget:"):
                from effdiff.runtime.memory import parse_size

                budget = part[len("budget:") :]
                parse_size(budget)  # a bad size is named now, not after other rows ran
            elif part == "kb":
                if not kbs:
                    raise EffdiffError(f"configuration {name!r} needs a knowledge base (--kb KB)")
                wants_kb = True
            else:
                raise EffdiffError(
                    f"unknown configuration part {part!r} in {name!r}; use full, fd, fd:SCHEDULE, cache:N, "
                    "int8, w16, kb, budget:SIZE, joined with +"
                )
        schedule = schedule or KeySchedule.none()
        retrieval = _kb_for(schedule, kbs) if wants_kb else None
        out.append(
            BenchConfig(name, schedule, precision, kb=retrieval, memory_budget=budget, fp16_weights=w16)
        )
    if "full" not in [c.name for c in out]:
        out.insert(0, BenchConfig("full", KeySchedule.none()))  # quality is measured against it
    return out


def _pipe_key(config: BenchConfig) -> tuple[str, Precision | None, str | None, bool]:
    return config.backend, config.precision, config.memory_budget, config.fp16_weights


def _kb_for(schedule: KeySchedule, kbs: list[Path]) -> Path:
    """The KB whose trajectories ran on `schedule`, else the first one."""
    if len(kbs) == 1:
        return kbs[0]
    from effdiff.kb.store import KBManifest

    for path in kbs:
        if str(KeySchedule.parse(KBManifest.read(path).settings.propagation)) == str(schedule):
            return path
    return kbs[0]


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
    peak_rss_gib: float = 0.0  # the process's peak during this row's timed runs
    rss_added_gib: float = 0.0  # resident memory its model added when loaded (graphs: summed per graph)
    gpu_peak_mib: float | None = None
    disk_mib: float | None = None
    quality: dict[str, float] = field(default_factory=dict)
    # end-to-end speed-up over the baseline row, one ratio per repeat (rows interleaved call by call)
    speedup: Stats | None = None
    speedups: list[float] = field(default_factory=list)


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
    # Each prompt's images in a call of their own, one after another (an app serving one request at
    # a time), instead of every prompt in one batch. Small models gain most from a compiled runtime
    # here: PyTorch's per-operator cost is paid per call, not per image.
    one_at_a_time: bool = False

    @property
    def images(self) -> int:
        """Images per run: every prompt, `batch` times."""
        return len(self.prompts) * self.batch


@dataclass
class BenchReport:
    schema: int
    device: dict[str, Any]
    settings: dict[str, Any]
    artifacts: str
    model: str
    rows: list[Row]
    images: dict[str, list[Image.Image]] = field(default_factory=dict, repr=False)
    # per timed repeat, the share of the machine's CPU other processes used (profiling.OtherProcessesCpu)
    contention: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "device": self.device,
            "settings": self.settings,
            "artifacts": self.artifacts,
            "model": self.model,
            "rows": [asdict(r) for r in self.rows],
            "contention": self.contention,
        }


def _calls(settings: BenchSettings, latents: np.ndarray) -> list[tuple[list[str], np.ndarray]]:
    """What one timed run generates, call by call: every prompt in one batch, or each prompt's images
    in a call of their own (`one_at_a_time`)."""
    if not settings.one_at_a_time:
        return [(settings.prompts, latents)]
    b = settings.batch
    return [([p], latents[i * b : (i + 1) * b]) for i, p in enumerate(settings.prompts)]


def _latents(pipe: Pipeline, settings: BenchSettings, height: int, width: int) -> np.ndarray:
    g = pipe.geometry
    shape = (settings.images, g.latent_channels, height // g.vae_factor, width // g.vae_factor)
    return np.random.default_rng(settings.seed).standard_normal(shape).astype(np.float32)


def _disk_mib(pipe: Pipeline, graphs: tuple[str, ...]) -> float | None:
    """Size of the files the graphs run from; None for a backend that builds them from the model."""
    if any(not pipe.variants[g].files for g in graphs if g in pipe.variants):
        return None
    return sum(pipe.variants[g].size_bytes for g in graphs if g in pipe.variants) / 2**20


@dataclass
class Run:
    seconds: float
    images: list[Image.Image]
    timings: dict[str, float] | None = None  # per graph (effdiff rows)
    gpu_mib: float | None = None

    @classmethod
    def join(cls, parts: list[Run]) -> Run:
        """One timed run from its calls (one per prompt with `one_at_a_time`)."""
        timings = None
        if all(p.timings is not None for p in parts):
            keys = {k for p in parts for k in p.timings or {}}
            timings = {k: sum((p.timings or {}).get(k, 0.0) for p in parts) for k in keys}
        gpu = [p.gpu_mib for p in parts if p.gpu_mib is not None]
        images = [im for p in parts for im in p.images]
        return cls(sum(p.seconds for p in parts), images, timings, max(gpu) if gpu else None)


class Runner:
    """One row: loaded once, then run as often as the interleaved schedule asks."""

    name: str
    kind: str
    detail: str
    load_s: float = 0.0
    rss_added_gib: float = 0.0
    disk_mib: float | None = None

    def run(self, prompts: list[str], latents: np.ndarray) -> Run:
        """One call: these prompts (each `batch` times) from these unit-noise latents."""
        raise NotImplementedError


def _rss() -> int:
    return psutil.Process().memory_info().rss


class EffdiffRunner(Runner):
    """A configuration on a pipeline shared with the other configurations of its precision: each graph
    is opened once, and the RSS its opening added is attributed to every row that uses it."""

    kind = "effdiff"

    def __init__(
        self,
        config: BenchConfig,
        pipe: Pipeline,
        graph_costs: dict[str, tuple[float, int]],
        settings: BenchSettings,
    ) -> None:
        self.name, self.config, self.pipe, self.settings = config.name, config, pipe, settings
        self.detail = str(config.propagation) + (f", {config.precision.value}" if config.precision else "")
        self.generate: Any = pipe
        if config.kb is not None:
            from effdiff.kb.retrieval import RetrievalStart
            from effdiff.kb.store import KnowledgeBase

            self.generate = RetrievalStart(pipe, KnowledgeBase.open(config.kb))
            self.detail += f" + kb {config.kb.name}"
        if config.backend != "ort":
            self.detail += f", {pipe.backend.describe()} {pipe.precision.value}"
        self.graphs = ("text_encoder", *config.propagation.graphs, "vae_decoder")
        if config.fp16_weights:
            self.detail += ", fp16 weights"
        if config.memory_budget is not None:
            self.detail += f", budget {config.memory_budget}"
        # opening counts as load, not as the first run; under a budget the plan decides what stays
        # open, so its loads are run time and nothing is opened ahead
        for g in self.graphs if config.memory_budget is None else ():
            if (id(pipe), g) not in graph_costs:
                before, start = _rss(), time.perf_counter()
                pipe.open_graph(g)
                graph_costs[(id(pipe), g)] = (time.perf_counter() - start, _rss() - before)
        costs = [graph_costs.get((id(pipe), g), (0.0, 0)) for g in self.graphs]
        self.load_s = sum(c[0] for c in costs)
        self.rss_added_gib = sum(c[1] for c in costs) / 2**30
        self.disk_mib = _disk_mib(pipe, self.graphs)
        self.gpu = GpuMemory()

    def run(self, prompts: list[str], latents: np.ndarray) -> Run:
        s, g = self.settings, self.pipe.geometry
        res = self.gpu.measure(
            lambda: self.generate(
                prompts,
                steps=s.steps,
                sampler=s.sampler,
                guidance_scale=s.guidance,
                latents=latents,
                height=latents.shape[2] * g.vae_factor,
                width=latents.shape[3] * g.vae_factor,
                num_images=s.batch,
                propagation=self.config.propagation,
                max_decoder_batch=s.max_decoder_batch,
            )
        )
        return Run(res.timings["total"], res.images, res.timings, self.gpu.peak_mib)


class PeerRunner(Runner):
    """diffusers' StableDiffusionPipeline in PyTorch, shared by the peers: DeepCache is enabled on it for
    the `deepcache` row's runs and disabled for the others."""

    kind = "peer"

    def __init__(self, peer: str, shared: dict[str, Any], source: Path, settings: BenchSettings) -> None:
        import torch
        from diffusers import (
            DDIMScheduler,
            DPMSolverMultistepScheduler,
            EulerDiscreteScheduler,
            StableDiffusionPipeline,
        )

        self.name, self.settings, self.torch = peer, settings, torch
        if "pipe" not in shared:
            before, start = _rss(), time.perf_counter()
            pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None, local_files_only=True)
            cls = {
                "ddim": DDIMScheduler,
                "dpmpp-2m": DPMSolverMultistepScheduler,
                "euler": EulerDiscreteScheduler,
            }
            pipe.scheduler = cls[settings.sampler].from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
            limit = pipe.text_encoder.config.max_position_embeddings
            if pipe.tokenizer.model_max_length > limit:  # folders saved without it overflow in diffusers
                pipe.tokenizer.model_max_length = limit
            shared.update(pipe=pipe, load=time.perf_counter() - start, rss=_rss() - before)
        self.pipe = shared["pipe"]
        self.load_s, self.rss_added_gib = shared["load"], shared["rss"] / 2**30
        self.helper = None
        if peer == "deepcache":
            from DeepCache import DeepCacheSDHelper

            self.helper = DeepCacheSDHelper(pipe=self.pipe)
            self.helper.set_params(cache_interval=3, cache_branch_id=0)
        self.detail = "StableDiffusionPipeline, PyTorch" + (
            ", DeepCache interval 3 branch 0" if self.helper else ""
        )
        self.gpu = GpuMemory()

    def run(self, prompts: list[str], latents: np.ndarray) -> Run:
        torch, s = self.torch, self.settings
        f = self.pipe.vae_scale_factor
        if self.helper is not None:
            self.helper.enable()
        try:
            start = time.perf_counter()
            with torch.inference_mode():
                images = self.gpu.measure(
                    lambda: (
                        self.pipe(
                            prompts,
                            num_inference_steps=s.steps,
                            guidance_scale=s.guidance,
                            latents=torch.from_numpy(latents),
                            height=f * latents.shape[2],
                            width=f * latents.shape[3],
                            num_images_per_prompt=s.batch,
                        ).images
                    )
                )
            return Run(time.perf_counter() - start, images, None, self.gpu.peak_mib)
        finally:
            if self.helper is not None:
                self.helper.disable()


def _row(runner: Runner, runs: list[Run], peak_gib: float, steps: int) -> Row:
    row = Row(
        runner.name,
        runner.kind,
        runner.detail,
        runner.load_s,
        Stats.of([r.seconds for r in runs]),
        peak_rss_gib=peak_gib,
        rss_added_gib=runner.rss_added_gib,
        gpu_peak_mib=max((r.gpu_mib for r in runs if r.gpu_mib is not None), default=None),
        disk_mib=runner.disk_mib,
    )
    timed = [r.timings for r in runs if r.timings is not None]
    if timed:
        row.components = {c: Stats.of([t[c] for t in timed]) for c in GRAPHS if any(t[c] > 0 for t in timed)}
        row.components["overhead"] = Stats.of([t["overhead"] for t in timed])
        row.unet_per_step_s = statistics.median(sum(t[c] for c in UNET_GRAPHS) for t in timed) / steps
    return row


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
    """Load every configuration and peer once, warm each up, then time them interleaved call by call
    (A B C, A B C, ...; prompt by prompt with `one_at_a_time`), so drift in the machine's speed touches
    every row alike; speed-ups are ratios within each repeat."""
    from effdiff.bench.device import device_profile

    artifacts = Path(artifacts)
    manifest = Manifest.read(artifacts)
    for p in peers:
        if p not in PEERS:
            raise EffdiffError(f"unknown peer {p!r}; peers: {', '.join(PEERS)}")
    # One pipeline per (backend, precision, budget, weights), loaded before anything runs: a missing
    # variant or a backend this machine lacks is named in one line now, not after the first ones ran.
    pipes: dict[tuple[str, Precision | None, str | None, bool], Pipeline] = {}
    for cfg in configs:
        key = _pipe_key(cfg)
        if key not in pipes:
            ort_providers = providers if cfg.backend == "ort" else None
            pipes[key] = Pipeline.load(
                artifacts,
                cfg.backend,
                providers=ort_providers,
                precision=cfg.precision,
                memory_budget=cfg.memory_budget,
                fp16_weights=cfg.fp16_weights,
            )
        for graph in cfg.propagation.graphs:
            pipes[key].require((graph,))
    first = next(iter(pipes.values()))
    h, w = first.default_size()
    h, w = settings.height or h, settings.width or w
    kb_paths = [c.kb for c in configs if c.kb is not None]
    if kb_paths:  # every configuration starts from noise the KB holds (its seeds in turn), as in ReDi
        from effdiff.kb.build import entry_noise
        from effdiff.kb.store import KBManifest

        seeds = KBManifest.read(kb_paths[0]).settings.seeds
        for other in kb_paths[1:]:
            if KBManifest.read(other).settings.seeds != seeds:
                raise EffdiffError(
                    f"knowledge bases {kb_paths[0]} and {other} hold different seeds; the bench starts "
                    "every configuration from the same noise, so build them with the same --seeds"
                )
        latents = entry_noise(first, [seeds[i % len(seeds)] for i in range(settings.images)], h, w)
    else:
        latents = _latents(first, settings, h, w)
    calls = _calls(settings, latents)
    runs_total = (settings.warmup + settings.repeat) * (len(configs) + len(peers)) * len(calls)
    bar = tqdm(total=runs_total, desc="bench", unit="call", disable=not progress)
    graph_costs: dict[Any, tuple[float, int]] = {}
    runners: list[Runner] = [EffdiffRunner(c, pipes[_pipe_key(c)], graph_costs, settings) for c in configs]
    shared_peer: dict[str, Any] = {}
    for peer in peers:
        try:
            runners.append(PeerRunner(peer, shared_peer, Path(manifest.source.path), settings))
        except ImportError:
            bar.update((settings.warmup + settings.repeat) * len(calls))  # diffusers / DeepCache absent
        except Exception as exc:  # a peer's own failure must not cost the user the rest of the report
            warnings.warn(f"peer {peer} failed and is left out: {type(exc).__name__}: {exc}", stacklevel=2)
            bar.update((settings.warmup + settings.repeat) * len(calls))
    failed: set[str] = set()

    def attempt(runner: Runner, call: int) -> Run | None:
        if runner.name in failed:
            return None
        try:
            return runner.run(*calls[call])
        except EffdiffError:
            raise
        except Exception as exc:
            if runner.kind != "peer":
                raise
            warnings.warn(
                f"peer {runner.name} failed and is left out: {type(exc).__name__}: {exc}", stacklevel=2
            )
            failed.add(runner.name)
            return None

    for runner in runners:
        bar.set_postfix_str(f"warm-up {runner.name}")
        for _ in range(settings.warmup):
            for call in range(len(calls)):
                attempt(runner, call)
                bar.update()
    timed: dict[str, list[Run]] = {r.name: [] for r in runners}
    peaks: dict[str, float] = dict.fromkeys(timed, 0.0)
    contention: list[float] = []
    for _ in range(settings.repeat):
        parts: dict[str, list[Run | None]] = {r.name: [] for r in runners}
        with OtherProcessesCpu() as others:
            # call by call (A1 B1 C1 A2 B2 C2 ...): a slow spell of the machine lands on every row
            for call in range(len(calls)):
                for runner in runners:
                    bar.set_postfix_str(runner.name)
                    with PeakRSS() as mem:
                        parts[runner.name].append(attempt(runner, call))
                    peaks[runner.name] = max(peaks[runner.name], mem.peak_gib)
                    bar.update()
        for name, got in parts.items():
            runs = [g for g in got if g is not None]
            if runs and len(runs) == len(got):  # a peer that failed in this repeat gives no run
                timed[name].append(Run.join(runs))
        contention.append(others.share)
    bar.close()
    rows = [_row(r, timed[r.name], peaks[r.name], settings.steps) for r in runners if timed[r.name]]
    images = {r.name: timed[r.name][-1].images for r in rows}
    _speedups(rows, timed)
    reference = images["full"]
    classifier = None
    if scenes is not None:
        from effdiff.reference.judge import AttributeClassifier

        classifier = AttributeClassifier()
    for row in rows:
        row.quality = _quality(images[row.name], reference)
        if classifier is not None and scenes is not None:
            adh = classifier.adherence(images[row.name], [s for s in scenes for _ in range(settings.batch)])
            lo, hi = adh.pooled_interval()
            row.quality.update(adherence=adh.mean, adherence_lo=lo, adherence_hi=hi, adherence_n=adh.count)
            row.quality.update({f"adherence_{k}": v for k, v in adh.per_attribute.items()})
    settings_json = {**asdict(settings), "height": h, "width": w, "interleaved": True}
    return BenchReport(
        REPORT_SCHEMA,
        device_profile(providers),
        settings_json,
        str(artifacts),
        manifest.source.model,
        rows,
        images,
        contention,
    )


def _speedups(rows: list[Row], timed: dict[str, list[Run]]) -> None:
    """Per-repeat ratio of the baseline's time (diffusers when it ran, else `full`) to each row's."""
    names = {r.name for r in rows}
    base = "diffusers" if "diffusers" in names else "full"
    for row in rows:
        pairs = zip(timed[base], timed[row.name], strict=False)
        row.speedups = [b.seconds / r.seconds for b, r in pairs]
        row.speedup = Stats.of(row.speedups) if row.speedups else None
