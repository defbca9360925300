"""Text-to-image from exported artifacts in three parts: `encode_prompt`, `denoise`, `decode`.

Classifier-free guidance runs as one batch of 2B rows, [negative x B, prompt x B], as diffusers does.
With encoder propagation the encoder runs at key steps only, and the decoder calls that share one key
step's features run as one call (the decoder graph repeats the features per step inside). With the
`none` schedule the whole-UNet graph runs at every step.

`denoise` can start and stop at any step: a run split at step k and continued with the same plan
reproduces the uninterrupted run exactly; a fresh plan started at k (retrieval start) begins the
multistep history anew, as the sampler does at step 0. Hooks see every step's latents (and may replace
them) and every graph's feeds (calibration capture).
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from effdiff.artifacts import SCHEDULER_CONFIG, W16_TAG, Manifest, Variant, check_files, read_json
from effdiff.errors import EffdiffError
from effdiff.runtime.backends import Backend, Graph, builds_from_source, get_backend
from effdiff.runtime.graphs import FeedsCallback, GraphSet, RecordingGraph, RowSplitGraph, Usage
from effdiff.runtime.images import tiled_decode, to_pil
from effdiff.runtime.propagation import AUTO, KeySchedule, NoiseInjection, resolve_injection
from effdiff.runtime.schedulers import Scheduler, make_scheduler
from effdiff.runtime.tokenizer import PromptTokenizer
from effdiff.specs import GRAPHS, UNET_GRAPHS, Precision

StepCallback = Callable[[int, float, np.ndarray], "np.ndarray | None"]


@dataclass
class Hooks:
    """`on_step(index, timestep, latents)` runs after every sampler step and may return replacement
    latents (as diffusers' callback_on_step_end); `on_graph(name, feeds)` sees every graph call's
    inputs as host arrays before it runs."""

    on_step: StepCallback | None = None
    on_graph: FeedsCallback | None = None


@dataclass
class Conditioning:
    """Text embeddings for a batch: rows [negative x B, prompt x B] when guided, else [prompt x B]."""

    embeddings: np.ndarray  # (rows, text_len, hidden); small, so kept on the host
    batch: int
    guidance_scale: float

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def rows(self) -> int:
        return 2 * self.batch if self.guided else self.batch


@dataclass
class DenoisePlan:
    """The sampler (with its multistep state), the key-step schedule and the options of one run."""

    scheduler: Scheduler
    schedule: KeySchedule
    max_decoder_batch: int
    noise_injection: NoiseInjection | None

    @property
    def steps(self) -> int:
        return len(self.scheduler.timesteps)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    latents: np.ndarray  # final latents, model space (B, C, h, w)
    timings: dict[str, float]  # seconds per graph, "overhead", "total", "load"
    calls: dict[str, int]
    key_steps: tuple[int, ...]
    peak_rss_gib: float | None = None  # only when the caller asked to measure memory
    info: dict[str, Any] = field(default_factory=dict)


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise EffdiffError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise EffdiffError(f"{name} must be >= {minimum}, got {value}")


# Beyond these a request is a mistake, not a workload: refused before memory is allocated for it.
MAX_SIDE_PX = 16384
MAX_IMAGES = 1024
MAX_GUIDANCE = 100.0  # SD is used at 1..20; far above, guided noise overflows float32


def check_guidance(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise EffdiffError(f"guidance scale must be a finite number, got {value!r}")
    if not 0 <= value <= MAX_GUIDANCE:
        raise EffdiffError(f"guidance scale must be in [0, {MAX_GUIDANCE:g}], got {value}")
    return float(value)


def _prompts(prompt: Any) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list | tuple) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise EffdiffError("prompt must be a string or a non-empty list of strings")
    return list(prompts)


def _check_finite(values: np.ndarray, graph: str, where: str) -> None:
    if not np.isfinite(values).all():
        raise EffdiffError(
            f"{graph} returned NaN or infinity {where}; the artifacts may be corrupt (`effdiff verify`) "
            "or this precision overflows for the inputs"
        )


class Pipeline:
    """Load once, call many times. `lean=True` keeps one component's graph open at a time."""

    def __init__(
        self,
        artifacts: Path,
        manifest: Manifest,
        backend: Backend,
        precision: Precision,
        resident: tuple[str, ...] | None = None,
        verify: bool = False,
        memory_budget: int | None = None,
    ) -> None:
        self.artifacts = Path(artifacts)
        self.verify = verify
        self.memory_budget = memory_budget
        self._baseline_rss = _rss()
        self.manifest = manifest
        self.backend = backend
        self.precision = precision
        self.geometry = manifest.geometry
        tok = manifest.tokenizer
        self.tokenizer = PromptTokenizer(self.artifacts / tok.file, tok.max_length, tok.pad_id, tok.eos_id)
        self.scheduler_config = read_json(self.artifacts / SCHEDULER_CONFIG, "re-run the export")
        self.format = backend.formats[0]
        self.tag = getattr(backend, "variant_tag", "")  # e.g. "pal6": CoreML's palettized packages
        if builds_from_source(backend):  # implied variants: the graphs come from the source model
            path = manifest.source.path
            found = {
                g: Variant(f"{self.format}-{precision.value}", precision, path, {}, self.format)
                for g in GRAPHS
            }
        else:
            found = {g: manifest.find(g, precision, self.format, self.tag) for g in GRAPHS}
        self.variants = {g: v for g, v in found.items() if v is not None}
        self.specs = {g: manifest.spec(g, v) for g, v in self.variants.items()}
        self.graphs = GraphSet({g: self._loader(g) for g in GRAPHS}, resident, self.specs)
        # UNet batch rows per graph call (None: all at once); a memory plan sets 1 to run the two
        # guidance rows one after the other when the whole batch's activations do not fit
        self.unet_rows: int | None = None

    @classmethod
    def load(
        cls,
        artifacts: str | Path,
        backend: str | Backend = "ort",
        providers: list[str] | None = None,
        lean: bool = False,
        precision: Precision | str | None = None,
        verify: bool = False,
        memory_budget: int | str | None = None,
        fp16_weights: bool = False,
    ) -> Pipeline:
        """Read and check the manifest and the files a run needs; open no graph yet. Graphs open on first
        use (so a run opens only those its schedule needs, and bad arguments are refused before any
        expensive work); `open_graph` opens one ahead of time. Files are checked by size, and by sha256
        when they changed since they were last verified, or always with `verify=True`. With a
        `memory_budget` (bytes or text such as "2GiB"), every call plans how to fit it first
        (`effdiff.runtime.memory`) or refuses in one line. `fp16_weights` runs the ort backend's
        `fp32-w16` variants (weights stored fp16, computed fp32; INT8 UNet graphs as they are)."""
        if not isinstance(artifacts, str | Path):
            raise EffdiffError(f"artifacts must be a folder path, got {type(artifacts).__name__}")
        artifacts = Path(artifacts)
        manifest = Manifest.read(artifacts)
        check_files(artifacts, manifest.support_files, full=verify)
        if providers is not None and (
            not isinstance(providers, list | tuple) or not all(isinstance(p, str) for p in providers)
        ):
            raise EffdiffError(f"providers must be a list of execution provider names, got {providers!r}")
        if fp16_weights and backend != "ort" and getattr(backend, "variant_tag", None) != W16_TAG:
            raise EffdiffError(
                "fp16 weights are the ort backend's fp32-w16 variants: backend='ort', or "
                "OrtBackend(fp16_weights=True)"
            )
        if isinstance(backend, str):
            options: dict[str, Any] = {"providers": list(providers)} if providers else {}
            backend = get_backend(backend, **options, **({"fp16_weights": True} if fp16_weights else {}))
        source, fmt = builds_from_source(backend), backend.formats[0]
        try:
            requested = Precision.parse(precision) if precision is not None else None
            if source:  # the backend converts the source model's weights: it says which precisions
                chosen = backend.source_precision(requested)  # type: ignore[attr-defined]
            else:
                chosen = requested or manifest.default_precision(fmt)
        except ValueError as exc:
            raise EffdiffError(str(exc)) from None
        if fp16_weights and chosen is Precision.FP16:
            raise EffdiffError("fp16 weights are for fp32 or int8 runs: an fp16 graph stores fp16 already")
        for graph in ("text_encoder", "vae_decoder"):
            if not source:  # a missing variant is named now; UNet graphs by `plan`
                manifest.choose(graph, chosen, fmt, getattr(backend, "variant_tag", ""))
        budget = None
        if memory_budget is not None:
            from effdiff.runtime.memory import parse_size

            budget = memory_budget if isinstance(memory_budget, int) else parse_size(memory_budget)
            if not hasattr(backend, "session_options"):
                raise EffdiffError(f"memory budgets are planned for the ort backend, not {backend.name}")
        return cls(
            artifacts,
            manifest,
            backend,
            chosen,
            resident=() if lean else None,
            verify=verify,
            memory_budget=budget,
        )

    def require(self, graphs: tuple[str, ...]) -> None:
        """EffdiffError naming the first graph without a variant at this pipeline's precision."""
        for graph in graphs:
            if graph not in self.variants:
                self.manifest.choose(graph, self.precision, self.format, self.tag)

    def _loader(self, graph: str) -> Callable[[], Graph]:
        def load() -> Graph:
            self.require((graph,))
            variant = self.variants[graph]
            if variant.format not in self.backend.formats:
                raise EffdiffError(
                    f"{graph}: the {self.backend.name} backend cannot run {variant.format} variants"
                )
            if builds_from_source(self.backend):
                source = Path(self.manifest.source.path)
                return self.backend.open_source(source, graph, self.specs[graph])  # type: ignore[attr-defined]
            check = getattr(self.backend, "check_variant", None)
            if check is not None:  # e.g. an engine built for another TensorRT or GPU
                check(variant)
            check_files(self.artifacts, variant.files, full=self.verify)
            return self.backend.open(self.artifacts / variant.file, self.specs[graph])

        return load

    @property
    def lean(self) -> bool:
        return not self.graphs.resident

    def open_graph(self, name: str) -> Graph:
        """Open a graph now (or return it), e.g. so its load time stays out of a timed run."""
        return self.graphs.open(name)

    def auto_decoder_batch(self) -> int:
        """Decoder steps per call when the caller does not say: 8 where batching pays (GPUs), else 1."""
        return 8 if self.backend.batches_pay() else 1

    def default_size(self) -> tuple[int, int]:
        f = self.geometry.vae_factor
        return self.manifest.export_size[0] * f, self.manifest.export_size[1] * f

    def _graph(self, graphs: Mapping[str, Graph], name: str, hooks: Hooks | None) -> Graph:
        graph = graphs[name]
        if self.unet_rows is not None and name in UNET_GRAPHS:
            graph = RowSplitGraph(graph, self.unet_rows, self.backend.to_host)  # type: ignore[assignment]
        if hooks is not None and hooks.on_graph is not None:
            return RecordingGraph(graph, hooks.on_graph, self.backend.to_host)  # type: ignore[return-value]
        return graph

    # ------------------------------------------------------------ the three parts

    def encode_prompt(
        self,
        prompt: str | list[str],
        negative_prompt: str = "",
        num_images: int = 1,
        guidance_scale: float = 7.5,
        hooks: Hooks | None = None,
        usage: Usage | None = None,
    ) -> Conditioning:
        prompts = _prompts(prompt)
        if not isinstance(negative_prompt, str):
            raise EffdiffError("negative_prompt must be a string")
        _check_int("num_images", num_images, 1)
        guidance_scale = check_guidance(guidance_scale)
        batch = len(prompts) * num_images
        cond = Conditioning(np.zeros(0, np.float32), batch, guidance_scale)
        rows = [p for p in prompts for _ in range(num_images)]
        texts = [negative_prompt] * batch + rows if cond.guided else rows
        with self.graphs.using(("text_encoder",), usage or Usage()) as g:
            graph = self._graph(g, "text_encoder", hooks)
            out = graph.run({"input_ids": self.tokenizer(texts)})["last_hidden_state"]
        out = self.backend.to_host(out)
        _check_finite(out, "text_encoder", "for the prompts")
        cond.embeddings = out
        return cond

    def plan(
        self,
        steps: int = 50,
        sampler: str = "ddim",
        propagation: KeySchedule | str = "none",
        max_decoder_batch: int | None = None,
        noise_injection: NoiseInjection | str | None = AUTO,
    ) -> DenoisePlan:
        """A fresh plan: sampler state at its start, key steps checked against `steps`."""
        _check_int("steps", steps, 1)
        _check_int("max_decoder_batch", max_decoder_batch, 1, optional=True)
        if not isinstance(sampler, str):
            raise EffdiffError(f"sampler must be a name, got {sampler!r}")
        schedule = KeySchedule.parse(propagation) if isinstance(propagation, str) else propagation
        if not isinstance(schedule, KeySchedule):
            raise EffdiffError(f"propagation must be a schedule name or a KeySchedule, got {propagation!r}")
        scheduler = make_scheduler(sampler, self.scheduler_config)
        scheduler.set_timesteps(steps)
        schedule.key_steps(steps)  # validates the schedule against the step count
        self.require(schedule.graphs)
        batch = max_decoder_batch if max_decoder_batch is not None else self.auto_decoder_batch()
        return DenoisePlan(scheduler, schedule, batch, resolve_injection(noise_injection, schedule))

    def denoise(
        self,
        latents: np.ndarray,
        cond: Conditioning,
        plan: DenoisePlan,
        start_step: int = 0,
        stop_step: int | None = None,
        injection_noise: np.ndarray | None = None,
        hooks: Hooks | None = None,
        usage: Usage | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """Run steps [start_step, stop_step) from `latents` (the sampler's space at start_step); returns
        the latents after the last step. `injection_noise` is z_T for prior noise injection."""
        usage = usage or Usage()
        stop = plan.steps if stop_step is None else stop_step
        _check_int("start_step", start_step, 0)
        _check_int("stop_step", stop, start_step + 1)
        if stop > plan.steps:
            raise EffdiffError(f"stop_step {stop} is beyond the plan's {plan.steps} steps")
        if plan.noise_injection is not None and injection_noise is None:
            raise EffdiffError("prior noise injection needs the initial noise (injection_noise)")
        scheduler, rows, n_img = plan.scheduler, cond.rows, cond.batch
        unet_names = plan.schedule.graphs
        float_dtype = np.dtype(self.specs[unet_names[0]].inputs[0].dtype)  # of `sample`
        ehs = np.asarray(cond.embeddings).astype(float_dtype, copy=False)
        guidance = np.float32(cond.guidance_scale)
        x = latents

        def guided(noise: np.ndarray, i: int, graph: str) -> np.ndarray:
            noise = noise.astype(np.float32)
            _check_finite(noise, graph, f"at step {i} (timestep {scheduler.timesteps[i]})")
            if not cond.guided:
                return noise
            uncond, text = noise[:n_img], noise[n_img:]
            return uncond + guidance * (text - uncond)

        def model_input(x: np.ndarray, i: int) -> np.ndarray:
            x = np.concatenate([x, x]) if cond.guided else x
            return scheduler.scale_model_input(x, i).astype(float_dtype)

        def timesteps(i: int) -> np.ndarray:
            return np.full((rows,), scheduler.timesteps[i], dtype=np.float32)

        def after_step(i: int, x: np.ndarray) -> np.ndarray:
            if not np.isfinite(x).all():
                raise EffdiffError(
                    f"the latents became NaN or infinite at step {i} (timestep {scheduler.timesteps[i]}); "
                    f"guidance scale {cond.guidance_scale:g} may be too large for this model"
                )
            inj = plan.noise_injection
            if inj is not None and scheduler.timesteps[i] < inj.tau:
                x = x + np.float32(inj.alpha) * injection_noise
            if hooks is not None and hooks.on_step is not None:
                replaced = hooks.on_step(i, float(scheduler.timesteps[i]), x)
                if replaced is not None:
                    if not isinstance(replaced, np.ndarray) or replaced.shape != x.shape:
                        got = getattr(replaced, "shape", type(replaced).__name__)
                        raise EffdiffError(
                            f"on_step hook returned {got} at step {i}; expected an array {x.shape}"
                        )
                    x = replaced.astype(np.float32, copy=False)
            bar.update()
            return x

        bar = tqdm(total=stop - start_step, desc="denoise", unit="step", disable=not progress)
        with self.graphs.using(unet_names, usage) as g:
            if plan.schedule.caches:
                deep_graph = self._graph(g, "unet_deep", hooks)
                shallow = self._graph(g, "unet_shallow", hooks)
                keys = frozenset(plan.schedule.run_keys(plan.steps, start_step, stop))
                deep: Any = None
                for i in range(start_step, stop):
                    feeds = {
                        "sample": model_input(x, i),
                        "timestep": timesteps(i),
                        "encoder_hidden_states": ehs,
                    }
                    if i in keys:
                        out = deep_graph.run(
                            feeds, host_outputs=False
                        )  # the deep feature stays on the device
                        deep, noise, name = out["deep"], out["noise_pred"], "unet_deep"
                    else:
                        noise, name = shallow.run({**feeds, "deep": deep})["noise_pred"], "unet_shallow"
                    x = after_step(i, scheduler.step(guided(self.backend.to_host(noise), i, name), i, x))
            elif not plan.schedule.propagates:
                unet = self._graph(g, "unet", hooks)
                for i in range(start_step, stop):
                    feeds = {
                        "sample": model_input(x, i),
                        "timestep": timesteps(i),
                        "encoder_hidden_states": ehs,
                    }
                    noise = self.backend.to_host(unet.run(feeds)["noise_pred"])
                    x = after_step(i, scheduler.step(guided(noise, i, "unet"), i, x))
            else:
                encoder = self._graph(g, "unet_encoder", hooks)
                decoder = self._graph(g, "unet_decoder", hooks)
                keys = frozenset(plan.schedule.run_keys(plan.steps, start_step, stop))
                features: dict[str, Any] = {}
                for group in plan.schedule.groups(plan.steps, plan.max_decoder_batch, start_step, stop):
                    if group[0] in keys:
                        feeds = {
                            "sample": model_input(x, group[0]),
                            "timestep": timesteps(group[0]),
                            "encoder_hidden_states": ehs,
                        }
                        features = encoder.run(feeds, host_outputs=False)  # stays on the device
                    # One call for the group: rows step-major, each with its own timestep.
                    dec_feeds = {
                        **features,
                        "encoder_hidden_states": ehs,
                        "timestep": np.concatenate([timesteps(i) for i in group]),
                    }
                    out = self.backend.to_host(decoder.run(dec_feeds)["noise_pred"])
                    for j, i in enumerate(group):
                        step_noise = guided(out[j * rows : (j + 1) * rows], i, "unet_decoder")
                        x = after_step(i, scheduler.step(step_noise, i, x))
        bar.close()
        return x

    def decode(
        self,
        latents: np.ndarray,
        vae_tile: int | None = None,
        hooks: Hooks | None = None,
        usage: Usage | None = None,
    ) -> np.ndarray:
        """Model-space latents -> images (B, 3, H, W) in [-1, 1]."""
        _check_int("vae_tile", vae_tile, 1, optional=True)
        dtype = np.dtype(self.specs["vae_decoder"].inputs[0].dtype)
        with self.graphs.using(("vae_decoder",), usage or Usage()) as g:
            vae = self._graph(g, "vae_decoder", hooks)
            z = latents.astype(dtype)
            images = (
                tiled_decode(vae, z, vae_tile, self.geometry.vae_factor)
                if vae_tile
                else vae.run({"latent": z})["image"]
            )
        images = self.backend.to_host(images)
        _check_finite(images, "vae_decoder", "for the final latents")
        return images

    # ------------------------------------------------------------ memory

    def plan_memory(self, schedule: KeySchedule, images: int, height: int, width: int) -> Any:
        """Plan this request under the pipeline's memory budget and apply the plan: which graphs stay
        resident, the session options (graphs opened with other options are released), VAE tiling."""
        from effdiff.runtime.memory import MemoryProfile, plan_memory

        assert self.memory_budget is not None
        self.require(schedule.graphs)
        rows = 2 * images
        latent = self.geometry.latent_size(height, width)
        needed = {g: self.variants[g] for g in ("text_encoder", *schedule.graphs, "vae_decoder")}
        plan = plan_memory(
            self.manifest,
            needed,
            schedule.graphs,
            rows,
            latent,
            self.memory_budget,
            MemoryProfile.read(self.artifacts),
            self._baseline_rss,
        )
        options = plan.session_options(self.backend.providers)  # type: ignore[attr-defined]
        if getattr(self.backend, "session_options", None) != options:
            for name in self.graphs.open_names:
                self.graphs.release(name)
            self.backend.session_options = options  # type: ignore[attr-defined]
        self.graphs.resident = tuple(GRAPHS) if not plan.lean else plan.resident
        self.graphs.per_call = schedule.graphs if plan.unet_per_call else ()
        self.unet_rows = plan.unet_rows
        return plan

    # ------------------------------------------------------------ all together

    def initial_noise(
        self, batch: int, height: int, width: int, seed: int | None, latents: np.ndarray | None
    ) -> np.ndarray:
        """Unit-variance starting noise (B, C, h, w): `latents` when given (checked), else from `seed`."""
        try:
            lat_h, lat_w = self.geometry.latent_size(height, width)
        except ValueError as exc:
            raise EffdiffError(str(exc)) from None
        shape = (batch, self.geometry.latent_channels, lat_h, lat_w)
        if latents is None:
            _check_int("seed", seed, 0, optional=True)
            return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        if not isinstance(latents, np.ndarray) or tuple(latents.shape) != shape:
            got = tuple(latents.shape) if isinstance(latents, np.ndarray) else type(latents).__name__
            raise EffdiffError(f"latents must be a numpy array of shape {shape}, got {got}")
        if not np.isfinite(latents).all():
            raise EffdiffError("latents contain NaN or infinity")
        return latents.astype(np.float32)

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str = "",
        steps: int = 50,
        sampler: str = "ddim",
        guidance_scale: float = 7.5,
        seed: int | None = 0,
        latents: np.ndarray | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        propagation: KeySchedule | str = "none",
        max_decoder_batch: int | None = None,
        noise_injection: NoiseInjection | str | None = AUTO,
        vae_tile: int | None = None,
        hooks: Hooks | None = None,
        progress: bool = False,
        measure_memory: bool = False,
    ) -> GenerationResult:
        """Generate. `latents` are unit-variance noise (scaled by the sampler's initial sigma here, as
        diffusers does); `noise_injection="auto"` injects with propagation only; `measure_memory`
        samples peak RSS in a background thread (off by default: it is a measuring concern)."""
        prompts = _prompts(prompt)
        _check_int("num_images", num_images, 1)
        default_h, default_w = self.default_size()
        for name, value in (("height", height), ("width", width)):
            _check_int(name, value, 1, optional=True)
        height = default_h if height is None else height
        width = default_w if width is None else width
        if max(height, width) > MAX_SIDE_PX:
            raise EffdiffError(f"height and width must be at most {MAX_SIDE_PX} pixels, got {height}x{width}")
        plan = self.plan(steps, sampler, propagation, max_decoder_batch, noise_injection)
        check_guidance(guidance_scale)
        _check_int("vae_tile", vae_tile, 1, optional=True)
        batch = len(prompts) * num_images
        if batch > MAX_IMAGES:
            raise EffdiffError(f"at most {MAX_IMAGES} images per call (prompts x num_images), got {batch}")
        unit_noise = self.initial_noise(batch, height, width, seed, latents)

        plan_line = None
        if self.memory_budget is not None:
            memory = self.plan_memory(plan.schedule, batch, height, width)
            plan_line = memory.describe()
            vae_tile = vae_tile or memory.vae_tile
        usage = Usage()
        monitor = None
        if measure_memory:
            from effdiff.profiling import PeakRSS

            monitor = PeakRSS()
            monitor.__enter__()
        try:
            start = time.perf_counter()
            cond = self.encode_prompt(prompts, negative_prompt, num_images, guidance_scale, hooks, usage)
            x = unit_noise * np.float32(plan.scheduler.init_noise_sigma)
            x = self.denoise(
                x, cond, plan, injection_noise=unit_noise, hooks=hooks, usage=usage, progress=progress
            )
            images = self.decode(x, vae_tile, hooks, usage)
            total = time.perf_counter() - start
        finally:
            if monitor is not None:
                monitor.__exit__(None, None, None)
        timings = {k: round(v, 6) for k, v in usage.seconds.items()}
        timings["overhead"] = max(0.0, total - usage.load_seconds - sum(usage.seconds.values()))
        timings["total"] = total
        timings["load"] = usage.load_seconds
        return GenerationResult(
            to_pil(images),
            x,
            timings,
            dict(usage.calls),
            plan.schedule.run_keys(plan.steps),
            monitor.peak_gib if monitor is not None else None,
            {"memory_plan": plan_line} if plan_line else {},
        )
