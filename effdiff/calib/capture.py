"""Calibration capture: record what the fp32 runtime feeds each UNet graph, through its recording hook.

Two or three runs per chunk of prompts, each a real `Pipeline.denoise` over the whole schedule:
- `whole`: every step is a key step (encoder and decoder on fresh features, no noise injection), which
  is numerically the whole-UNet path. Its encoder feeds are the `unet` graph's inputs.
- `propagation`: the key-step schedule the runtime uses (Faster Diffusion): the encoder sees latents at
  key steps only, and the decoder sees features cached at a key step together with later timesteps.
- `cache` (when the artifacts have DeepCache's graphs): `cache:N`, the whole UNet (`unet_deep`) at every
  N-th step and the shallow path (`unet_shallow`) fed the deep feature of the last key step between.
A sample is one graph call for one prompt with both guidance halves (rows [negative, prompt]). Which
steps are kept is decided before the run: per prompt, graph and run, `per_prompt` steps stratified over
the steps where that graph is called (timestep-aware, as Q-Diffusion calibrates), at most `samples` per
graph and run. The last prompts (`holdout`) are kept out of calibration, for validation.

Storage: one `.npz` shard per chunk of prompts plus `calib.json` (settings, and per shard its size,
sha256 and sample records). A shard is renamed into place before the manifest names it, and chunks are
deterministic (seeded by their index), so a capture killed at any point resumes at the first chunk the
manifest does not name, without duplicating or losing samples.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from effdiff.artifacts import FileRecord, atomic_path, read_json, sha256_file, write_json
from effdiff.errors import EffdiffError
from effdiff.runtime.pipeline import Hooks, Pipeline
from effdiff.runtime.propagation import AUTO, KeySchedule

CALIB_MANIFEST = "calib.json"
CALIB_SCHEMA = 1
STREAMS = ("whole", "propagation", "cache")
# Graphs the hook records (`unet` reads the `whole` run's encoder feeds: the same inputs), in the order
# that seeds each graph's step choice; new graphs go last so older plans stay as they were.
CAPTURED = ("unet_encoder", "unet_decoder", "unet_deep", "unet_shallow")
CACHE_GRAPHS = ("unet_deep", "unet_shallow")  # recorded by the `cache` run only


def read_prompts(path: Path) -> list[str]:
    """Prompts from a text file, one per line (blank lines and `#` comments skipped)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise EffdiffError(f"calibration prompt file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EffdiffError(f"cannot read calibration prompt file {path}: {exc}") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise EffdiffError(f"calibration prompt file {path} holds no prompts (one per line)")
    return prompts


def default_prompts(seed: int = 0) -> list[str]:
    """The reference model's training-split prompts outside the 192 evaluation scenes, shuffled so that
    the first few already vary in kind, colour and background."""
    from effdiff.reference.scenes import disjoint_scenes

    prompts = [s.prompt for s in disjoint_scenes()]
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [prompts[i] for i in order]


def default_guidance(artifacts: Path) -> float:
    """The reference model's guidance scale for its own artifacts, Stable Diffusion's 7.5 otherwise."""
    from effdiff.artifacts import Manifest
    from effdiff.reference.scenes import REFERENCE_GUIDANCE

    return REFERENCE_GUIDANCE if Manifest.read(artifacts).is_reference else 7.5


@dataclass(frozen=True)
class CaptureSettings:
    """What a capture records. `samples` bounds each (run, graph): calibration and held-out together."""

    prompts: tuple[str, ...]
    samples: int = 64
    per_prompt: int = 8  # steps recorded per prompt, graph and run
    holdout: float = 0.125  # share of the prompts used kept out of calibration (at least one)
    steps: int = 50
    sampler: str = "ddim"
    guidance: float = 7.5
    propagation: str = "fd-ddim50"
    chunk: int = 8  # prompts per pipeline run and per shard
    seed: int = 0
    height: int | None = None  # pixels; default: the export size
    width: int | None = None
    cache_interval: int = 3  # the `cache` run's schedule: cache:N
    # Record the `cache` run: None = when the artifacts have unet_deep and unet_shallow (`capture`
    # resolves it before hashing, so a folder that gains or loses them is captured again).
    cache: bool | None = None

    def __post_init__(self) -> None:
        if not self.prompts:
            raise EffdiffError("calibration needs at least one prompt")
        for name in ("samples", "per_prompt", "steps", "chunk", "cache_interval"):
            if getattr(self, name) < 1:
                raise EffdiffError(f"calibration {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.holdout < 1.0:
            raise EffdiffError(f"holdout must be in [0, 1), got {self.holdout}")
        schedule = KeySchedule.parse(self.propagation)
        if not schedule.propagates:
            raise EffdiffError(
                "the capture's propagation schedule must propagate (e.g. fd-ddim50, uniform:3)"
            )
        schedule.key_steps(self.steps)

    @property
    def cache_schedule(self) -> KeySchedule:
        return KeySchedule.parse(f"cache:{self.cache_interval}")

    @property
    def streams(self) -> tuple[str, ...]:
        return STREAMS if self.cache else STREAMS[:2]

    @property
    def prompts_used(self) -> int:
        return min(len(self.prompts), math.ceil(self.samples / self.per_prompt))

    @property
    def holdout_prompts(self) -> int:
        n = self.prompts_used
        return 0 if n < 2 else max(1, round(n * self.holdout))

    @property
    def chunks(self) -> int:
        return math.ceil(self.prompts_used / self.chunk)

    def key(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SampleRecord:
    id: str
    stream: str  # "whole", "propagation" or "cache"
    graph: str  # the graph whose feeds these are
    prompt: int  # index into the settings' prompts
    step: int  # sampler step index of the call
    timestep: float
    key_step: int  # the step whose features the decoder / shallow path reused (= step on the whole run)
    holdout: bool


def plan_steps(settings: CaptureSettings) -> dict[tuple[str, str, int], tuple[int, ...]]:
    """(run, graph, prompt) -> the step indices to record: stratified over the steps where the graph
    is called in that run, one per stratum, at most `samples` per (run, graph) in all."""
    keys = KeySchedule.parse(settings.propagation).key_steps(settings.steps)
    every = tuple(range(settings.steps))
    calls = {
        ("whole", "unet_encoder"): every,
        ("whole", "unet_decoder"): every,
        ("propagation", "unet_encoder"): keys,
        ("propagation", "unet_decoder"): every,
    }
    if settings.cache:
        cache_keys = settings.cache_schedule.key_steps(settings.steps)
        calls["cache", "unet_deep"] = cache_keys
        calls["cache", "unet_shallow"] = tuple(i for i in every if i not in cache_keys)
    plan: dict[tuple[str, str, int], tuple[int, ...]] = {}
    for (si, stream), (gi, graph) in ((s, g) for s in enumerate(STREAMS) for g in enumerate(CAPTURED)):
        if (stream, graph) not in calls:
            continue
        left = settings.samples
        for prompt in range(settings.prompts_used):
            k = min(settings.per_prompt, len(calls[stream, graph]), left)
            rng = np.random.default_rng([settings.seed, prompt, si, gi])
            strata = np.array_split(np.asarray(calls[stream, graph]), k) if k else []
            plan[stream, graph, prompt] = tuple(int(s[rng.integers(len(s))]) for s in strata)
            left -= k
    return plan


@dataclass
class CalibrationSet:
    """A capture folder: settings, shards and sample records. Arrays load lazily, shard by shard."""

    folder: Path
    settings: dict[str, Any]
    shards: dict[str, FileRecord] = field(default_factory=dict)
    samples: dict[str, list[SampleRecord]] = field(default_factory=dict)  # shard file -> records
    complete: bool = False

    @property
    def records(self) -> list[SampleRecord]:
        return [r for name in sorted(self.samples) for r in self.samples[name]]

    @property
    def sha256(self) -> str:
        """The calibration set's hash: its settings and every shard's sha256."""
        payload = json.dumps(
            {"settings": self.settings, "shards": {n: r.sha256 for n, r in sorted(self.shards.items())}},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def select(self, stream: str, graph: str, holdout: bool) -> list[SampleRecord]:
        return [r for r in self.records if r.stream == stream and r.graph == graph and r.holdout == holdout]

    def count(self, stream: str, graph: str, holdout: bool) -> int:
        return len(self.select(stream, graph, holdout))

    def feeds(self, records: list[SampleRecord]) -> Iterator[dict[str, np.ndarray]]:
        """The samples' feeds in order, one shard open at a time."""
        wanted = {r.id for r in records}
        by_shard = {name: [r for r in recs if r.id in wanted] for name, recs in self.samples.items()}
        for name in sorted(by_shard):
            if not by_shard[name]:
                continue
            with np.load(self.folder / name) as data:
                for rec in by_shard[name]:
                    prefix = f"{rec.id}."
                    yield {k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)}

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": CALIB_SCHEMA,
            "settings": self.settings,
            "complete": self.complete,
            "shards": {
                name: {
                    "size": rec.size,
                    "sha256": rec.sha256,
                    "samples": [asdict(s) for s in self.samples[name]],
                }
                for name, rec in sorted(self.shards.items())
            },
        }

    @classmethod
    def read(cls, folder: Path) -> CalibrationSet:
        folder = Path(folder)
        data = read_json(folder / CALIB_MANIFEST, "capture it again (`effdiff-export int8`)")
        if data.get("schema") != CALIB_SCHEMA:
            raise EffdiffError(
                f"{folder / CALIB_MANIFEST} has schema {data.get('schema')!r}, not {CALIB_SCHEMA}"
            )
        out = cls(folder, dict(data["settings"]), complete=bool(data.get("complete")))
        for name, rec in data["shards"].items():
            out.shards[name] = FileRecord(int(rec["size"]), str(rec["sha256"]))
            out.samples[name] = [SampleRecord(**s) for s in rec["samples"]]
        return out

    def write(self) -> None:
        write_json(self.folder / CALIB_MANIFEST, self.to_json())


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.npz"


def _resume(folder: Path, settings: CaptureSettings, log: Any) -> CalibrationSet:
    """The folder's calibration set when it was made with these settings (shards checked: a missing or
    altered one is dropped and captured again); otherwise a fresh, empty one (old shards removed)."""
    key = settings.key()
    fresh = CalibrationSet(folder, {**asdict(settings), "key": key})
    if (folder / CALIB_MANIFEST).exists():
        try:
            old = CalibrationSet.read(folder)
        except (EffdiffError, KeyError, TypeError):
            old = None
        for partial in folder.glob(".shard-*.tmp"):  # a shard being written when a capture was killed
            partial.unlink()
        if old is not None and old.settings.get("key") == key:
            for name, rec in list(old.shards.items()):
                path = folder / name
                if not path.is_file() or path.stat().st_size != rec.size or sha256_file(path) != rec.sha256:
                    log(f"calibration shard {name} is missing or altered; it is captured again")
                    del old.shards[name], old.samples[name]
            return old
        log(f"{folder} held a calibration set with other settings; it is replaced")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (*folder.glob("shard-*.npz"), *folder.glob(".shard-*.tmp"), folder / CALIB_MANIFEST):
        stale.unlink(missing_ok=True)
    return fresh


class _Recorder:
    """The `on_graph` hook of one run over a chunk: keeps the planned (prompt, step) samples."""

    def __init__(
        self,
        stream: str,
        first_prompt: int,
        batch: int,
        guided: bool,
        timesteps: np.ndarray,
        plan: Mapping[tuple[str, str, int], tuple[int, ...]],
        holdout_from: int,
    ) -> None:
        self.stream = stream
        self.first = first_prompt
        self.batch = batch
        self.guided = guided
        self.index = {float(t): i for i, t in enumerate(timesteps)}
        self.plan = plan
        self.holdout_from = holdout_from
        self.key_step = -1
        self.arrays: dict[str, np.ndarray] = {}
        self.records: list[SampleRecord] = []

    def __call__(self, graph: str, feeds: Mapping[str, np.ndarray]) -> None:
        if graph not in CAPTURED:
            return
        ts = np.asarray(feeds["timestep"])
        step = self.index[float(ts[0])]
        if graph in ("unet_encoder", "unet_deep"):  # the features later calls reuse come from here
            self.key_step = step
        for j in range(self.batch):
            prompt = self.first + j
            if step not in self.plan.get((self.stream, graph, prompt), ()):
                continue
            rows = [j, self.batch + j] if self.guided else [j]
            sid = f"{self.stream}.{graph}.p{prompt:05d}.s{step:03d}"
            for name, value in feeds.items():
                self.arrays[f"{sid}.{name}"] = np.ascontiguousarray(np.asarray(value)[rows])
            self.records.append(
                SampleRecord(
                    sid,
                    self.stream,
                    graph,
                    prompt,
                    step,
                    float(ts[0]),
                    self.key_step,
                    prompt >= self.holdout_from,
                )
            )


def capture(
    artifacts: Path,
    out: Path,
    settings: CaptureSettings,
    progress: bool = True,
    log: Any = None,
) -> CalibrationSet:
    """Run the fp32 runtime over the prompts and record each UNet graph's inputs into `out` (resumable).
    EffdiffError when the artifacts lack the graphs, or when nothing was recorded."""
    log = log or (lambda _msg: None)
    out = Path(out)
    pipe = Pipeline.load(artifacts, precision="fp32", lean=False)
    if settings.cache is None:  # resolved before hashing: what is captured is part of the key
        settings = replace(settings, cache=all(g in pipe.variants for g in CACHE_GRAPHS))
    wanted = CAPTURED if settings.cache else tuple(g for g in CAPTURED if g not in CACHE_GRAPHS)
    missing = [g for g in wanted if g not in pipe.variants]
    if missing:
        raise EffdiffError(f"{artifacts} has no fp32 {', '.join(missing)} graph to calibrate; re-export it")
    calib = _resume(out, settings, log)
    plan = plan_steps(settings)
    height, width = settings.height, settings.width
    default_h, default_w = pipe.default_size()
    height, width = height or default_h, width or default_w
    holdout_from = settings.prompts_used - settings.holdout_prompts
    schedule = KeySchedule.parse(settings.propagation)
    runs = {
        "whole": (KeySchedule.uniform(1), None),
        "propagation": (schedule, AUTO),
        "cache": (settings.cache_schedule, AUTO),  # AUTO: no injection, as the runtime runs cache:N
    }
    todo = [c for c in range(settings.chunks) if _shard_name(c) not in calib.shards]
    if len(todo) < settings.chunks:
        log(f"calibration: {settings.chunks - len(todo)} of {settings.chunks} shards already captured, kept")
    bar = tqdm(
        total=len(todo) * len(settings.streams), desc="calibration capture", unit="run", disable=not progress
    )
    for c in todo:
        first = c * settings.chunk
        prompts = list(settings.prompts[first : min(first + settings.chunk, settings.prompts_used)])
        arrays: dict[str, np.ndarray] = {}
        records: list[SampleRecord] = []
        cond = pipe.encode_prompt(prompts, guidance_scale=settings.guidance)
        z = pipe.initial_noise(len(prompts), height, width, settings.seed + c, None)
        for stream in settings.streams:
            sched, injection = runs[stream]
            p = pipe.plan(
                settings.steps, settings.sampler, sched, max_decoder_batch=1, noise_injection=injection
            )
            rec = _Recorder(
                stream, first, len(prompts), cond.guided, p.scheduler.timesteps, plan, holdout_from
            )
            x = z * np.float32(p.scheduler.init_noise_sigma)
            pipe.denoise(x, cond, p, injection_noise=z, hooks=Hooks(on_graph=rec))
            arrays.update(rec.arrays)
            records += rec.records
            bar.update()
        name = _shard_name(c)
        with atomic_path(out / name) as tmp, tmp.open("wb") as fh:
            np.savez(fh, **arrays)
        calib.shards[name] = FileRecord.of(out / name)
        calib.samples[name] = records
        calib.write()  # after the shard is in place: a killed capture resumes at the next chunk
    bar.close()
    calib.complete = True
    calib.write()
    if not calib.records:
        raise EffdiffError(
            "calibration recorded no samples: the prompts may be empty, --samples 0, or the schedule "
            "never called the UNet halves"
        )
    return calib


def random_feeds(
    pipe_specs: Mapping[str, Any], graph: str, count: int, batch: int, height: int, width: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """Ablation (a): inputs drawn at random from the graph's spec (N(0,1) latents and features, random
    text embeddings, timesteps uniform over 1..999): what calibrating without the runtime looks like."""
    rng = np.random.default_rng(seed)
    spec = pipe_specs[graph]
    out = []
    for _ in range(count):
        ts = np.full((batch,), float(rng.integers(1, 1000)), np.float32)
        out.append(spec.sample_inputs(batch, height, width, rng, timesteps=ts))
    return out


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("shard-*.npz"))
