"""Knowledge-base builds on a Ray cluster: the prompts are cut into shards, Ray actors build them with the
local build's own code (`build_kb(shard=...)`: checkpointed, atomic, resumable), and the driver joins the
parts with `merge_kb`. effdiff has no scheduler, worker pool or RPC of its own: Ray places the actors
(one per GPU, or per `actor_cpus` CPUs on nodes without one), hands them shards (`ray.util.ActorPool`),
restarts an actor that dies and re-runs its shard, which resumes from the shard's last checkpoint.

Layout, in the KB folder (a path every node sees: a shared filesystem on a multi-node cluster):

  OUT/.shards/plan.json         what the shards are cut from: shard count, artifacts, settings, prompts
  OUT/.shards/part-I-of-N/      one part per shard, exactly as `kb build --shard I/N` writes it
  OUT/kb.json, OUT/keys.npy ... the merged KB (`merge_kb`); `.shards` is removed once kb.json exists

The folder's visible names stay empty until the merge, so a half-built folder never looks like a KB.
A driver killed part-way is re-run with `resume=True`: finished parts (their kb.json written) are
skipped, unfinished ones resume from their checkpoints. Ray is imported lazily (the `distributed` extra).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from effdiff._deps import require
from effdiff.artifacts import Manifest, folder_lock, read_json, write_json
from effdiff.errors import EffdiffError, FolderBusy
from effdiff.kb.build import (
    BuildReport,
    IndexOptions,
    build_kb,
    check_graphs,
    chosen_precision,
    merge_kb,
    prompts_sha256,
    shard_range,
    state_changes,
)
from effdiff.kb.store import KB_MANIFEST, PARTIAL, BuildSettings, KBManifest, artifacts_tie

SHARDS = ".shards"
PLAN = "plan.json"
BUSY_WAIT_S = 60.0  # how long a restarted actor waits for its shard's previous owner to exit
POLL_S = 0.5  # progress poll interval of the driver


def part_name(i: int, n: int) -> str:
    return f"part-{i}-of-{n}"


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a distributed build runs."""

    address: str = "auto"  # "auto" (a running cluster), "local" (start one here), or host:port / ray://...
    shards: int | None = None  # None: one per actor (or the unfinished build's count on resume)
    actors: int | None = None  # None: as many as the cluster has slots for (one per GPU, or per actor_cpus)
    actor_cpus: int = 1  # CPUs each actor reserves; on a node without GPU, also its ONNX Runtime threads
    max_restarts: int = 3  # per actor; each restart re-runs the shard it held, from its checkpoints

    def check(self) -> None:
        for name in ("shards", "actors", "actor_cpus", "max_restarts"):
            value = getattr(self, name)
            low = 0 if name == "max_restarts" else 1
            if value is None and name in ("shards", "actors"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise EffdiffError(f"{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.address, str) or not self.address.strip():
            raise EffdiffError("the Ray address must be auto, local, or host:port")


@dataclass
class ShardReport:
    shard: int
    entries: int
    generated: int
    resumed: int  # found in the shard's checkpoints (left by a run or an actor that died)
    seconds: float  # inside the actor, loading excluded
    node: str
    device: str
    pid: int

    @property
    def entries_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


@dataclass
class RayBuildReport:
    kb: BuildReport  # the merged KB
    shard_count: int
    actors: int
    shards: list[ShardReport]  # built by this run
    finished_earlier: list[int]  # shards a previous run had finished
    build_seconds: float  # actors started to last shard written
    merge_seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        earlier = f", {len(self.finished_earlier)} finished earlier" if self.finished_earlier else ""
        return (
            f"{self.kb.summary()}; {self.shard_count} shards on {self.actors} Ray actors{earlier} "
            f"(shards {self.build_seconds:.1f}s, merge {self.merge_seconds:.1f}s)"
        )


# ---------------------------------------------------------------- the actor


class ShardBuilder:
    """A Ray actor's state: the artifacts loaded once, built shards reported back. Ray restarts it (a new
    process, `__init__` again) when it dies and re-sends the call it was running."""

    def __init__(self, artifacts: str, precision: str, threads: int | None) -> None:
        from effdiff.runtime.backends.ort import OrtBackend
        from effdiff.runtime.pipeline import Pipeline

        ray = require("ray")
        gpu = bool(ray.get_gpu_ids())  # Ray set CUDA_VISIBLE_DEVICES to the GPU it reserved
        backend = OrtBackend(threads=None if gpu else threads)  # CUDA first where onnxruntime-gpu has it
        self.pipe = Pipeline.load(artifacts, backend=backend, precision=precision, lean=False)
        self.device = backend.providers[0].replace("ExecutionProvider", "")
        self.node = ray.util.get_node_ip_address()
        self.done: dict[int, int] = {}

    def build(
        self,
        artifacts: str,
        prompts: list[str],
        part: str,
        settings: BuildSettings,
        shard: tuple[int, int],
        checkpoint_every: int,
        batch: int,
        precision: str,
    ) -> ShardReport:
        i = shard[0]
        deadline = time.monotonic() + BUSY_WAIT_S
        while True:
            try:
                rep = build_kb(
                    Path(artifacts),
                    prompts,
                    Path(part),
                    settings,
                    shard=shard,
                    resume=True,  # the driver decided fresh or resume; a retried call must resume
                    checkpoint_every=checkpoint_every,
                    batch=batch,
                    precision=precision,
                    progress=False,
                    log=lambda _m: None,
                    pipeline=self.pipe,
                    on_progress=lambda n: self.done.__setitem__(i, n),
                )
                break
            except FolderBusy:  # the shard's previous owner (killed with its driver) is still exiting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        return ShardReport(
            i, rep.entries, rep.generated, rep.resumed, rep.seconds, self.node, self.device, os.getpid()
        )

    def progress(self) -> dict[int, int]:
        """Entries done per shard this actor holds or held (served while `build` runs: 2 threads)."""
        return dict(self.done)


# ---------------------------------------------------------------- the driver


def _connect(ray: Any, address: str) -> bool:
    """Connect (or start, for "local"); True when this call started the connection (and must end it)."""
    if ray.is_initialized():
        return False  # a caller (a test, a notebook) already chose the cluster
    if address not in ("auto", "local") and not address.startswith("ray://"):
        _check_reachable(address)  # Ray's own client retries an unreachable address for ever
    try:
        ray.init(
            address=address,
            include_dashboard=False if address == "local" else None,
            log_to_driver=False,  # actors report through return values; their logs stay in Ray's folder
            logging_level=logging.ERROR,
        )
    except (ConnectionError, ValueError, RuntimeError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "start one with `ray start --head`, or pass --ray local" if address == "auto" else ""
        raise EffdiffError(
            f"cannot reach a Ray cluster at {address!r}: {text}" + (f"; {hint}" if hint else "")
        ) from None
    return True


def _check_reachable(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise EffdiffError(f"Ray address {address!r}: give auto, local, host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise EffdiffError(
            f"cannot reach a Ray cluster at {address!r} ({exc.strerror or type(exc).__name__}); "
            "is `ray start --head` running there, and is the port the one it printed?"
        ) from None


def _slots(ray: Any, actor_cpus: int) -> tuple[int, bool]:
    """How many actors the cluster can hold at once, and whether they get a GPU each."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = sum(int(n["Resources"].get("GPU", 0)) for n in nodes)
    if gpus:
        return gpus, True
    return sum(int(n["Resources"].get("CPU", 0)) // actor_cpus for n in nodes), False


def _finished(part: Path, i: int, n: int) -> bool:
    if not (part / KB_MANIFEST).exists():
        return False
    m = KBManifest.read(part)
    return m.kind == "part" and m.shard == (i, n)


def _check_folder(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise EffdiffError(f"{out} is a file, not a folder for a knowledge base")
    if (out / KB_MANIFEST).exists():
        raise EffdiffError(f"{out} already holds a knowledge base; choose another folder or delete it")
    if (out / PARTIAL).exists():
        raise EffdiffError(f"{out} holds an unfinished local build; resume it without --ray")
    if (out / SHARDS).exists() and not resume:
        raise EffdiffError(f"{out} holds an unfinished distributed build; pass --resume to continue it")
    if out.exists():
        others = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        if others:
            raise EffdiffError(f"{out} is not empty ({', '.join(others[:3])} ...); choose a new folder")


def _error_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries the actor's own exception
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


def build_kb_ray(
    artifacts: Path,
    prompts: list[str],
    out: Path,
    settings: BuildSettings,
    index: IndexOptions | None = None,
    ray_options: RayOptions = RayOptions(),
    resume: bool = False,
    checkpoint_every: int = 256,
    batch: int = 32,
    precision: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> RayBuildReport:
    """`build_kb` over a Ray cluster: the same KB, its shards built by Ray actors (see the module
    docstring for the layout and for resume). `out` must be a path every node of the cluster sees."""
    ray = require("ray")  # first: without the extra, fail before reading anything
    from ray.util import ActorPool

    started = time.perf_counter()
    index = index or IndexOptions()
    ray_options.check()
    settings.check()
    index.check(settings.value_steps)
    if not prompts or not all(isinstance(p, str) and p.strip() and "\n" not in p for p in prompts):
        raise EffdiffError("prompts must be a non-empty list of one-line, non-blank strings")
    artifacts, out = Path(artifacts).resolve(), Path(out).resolve()  # actors run in other folders
    manifest = Manifest.read(artifacts)
    chosen = chosen_precision(manifest, precision)
    check_graphs(manifest, settings, chosen)  # on the driver: no actor starts for a build that cannot run
    total = len(prompts) * len(settings.seeds)
    _check_folder(out, resume)
    shards_dir = out / SHARDS
    plan_path = shards_dir / PLAN
    old_plan = read_json(plan_path) if plan_path.exists() else None

    owns = _connect(ray, ray_options.address)
    try:
        slots, gpu = _slots(ray, ray_options.actor_cpus)
        if slots < 1:
            raise EffdiffError(
                f"the Ray cluster has no node with {ray_options.actor_cpus} CPUs for an actor; "
                "lower --actor-cpus"
            )
        wanted = min(ray_options.actors or slots, slots)
        count = ray_options.shards or (old_plan["shards"] if old_plan else min(wanted, total))
        if old_plan and count != old_plan["shards"]:
            raise EffdiffError(
                f"the unfinished build in {out} has {old_plan['shards']} shards, not {count}; resume it "
                f"with --shards {old_plan['shards']}, or delete {shards_dir} to start again"
            )
        if count > total:
            raise EffdiffError(f"{count} shards for {total} entries: some would be empty; use fewer shards")
        plan = {
            "shards": count,
            "tie": artifacts_tie(manifest, chosen, settings.tied_graphs())["hash"],
            "settings": settings.to_json(),
            "prompts_sha256": prompts_sha256(prompts),
            "checkpoint_every": checkpoint_every,
        }
        shards_dir.mkdir(parents=True, exist_ok=True)
        with folder_lock(shards_dir, "a distributed knowledge-base build"):
            diff = [] if old_plan is None else state_changes(old_plan, plan)
            if diff:
                raise EffdiffError(
                    f"the unfinished build in {out} was started with other {', '.join(diff)}; resume it "
                    f"with the same options, or delete {shards_dir} to start again"
                )
            write_json(plan_path, plan)
            parts = [shards_dir / part_name(i, count) for i in range(count)]
            earlier = [i for i in range(count) if _finished(parts[i], i, count)]
            pending = [i for i in range(count) if i not in earlier]
            if earlier:
                log(f"resuming: {len(earlier)} of {count} shards finished earlier")
            reports, actors_used, t_build = _run_shards(
                ray,
                ActorPool,
                str(artifacts),
                prompts,
                settings,
                parts,
                pending,
                count,
                total,
                min(wanted, len(pending)),
                gpu,
                ray_options,
                checkpoint_every,
                batch,
                chosen,
                progress,
                log,
            )
        t0 = time.perf_counter()
        kb = merge_kb(parts, out, index, log)
        merge_seconds = time.perf_counter() - t0
        shutil.rmtree(shards_dir, ignore_errors=True)  # kb.json is written: the parts are copies now
    finally:
        if owns:
            ray.shutdown()
    kb.generated = sum(r.generated for r in reports)
    kb.resumed = total - kb.generated
    kb.seconds = time.perf_counter() - started
    return RayBuildReport(
        kb, count, actors_used, reports, earlier, t_build, merge_seconds, notes=list(kb.notes)
    )


def _run_shards(
    ray: Any,
    actor_pool: Any,
    artifacts: str,
    prompts: list[str],
    settings: BuildSettings,
    parts: list[Path],
    pending: list[int],
    count: int,
    total: int,
    n_actors: int,
    gpu: bool,
    options: RayOptions,
    checkpoint_every: int,
    batch: int,
    precision: str,
    progress: bool,
    log: Callable[[str], None],
) -> tuple[list[ShardReport], int, float]:
    """Build the pending shards on `n_actors` actors, one tqdm bar over every entry of the build."""
    if not pending:
        return [], 0, 0.0
    t0 = time.perf_counter()
    ranges = {i: shard_range(total, (i, count)) for i in range(count)}
    sizes = {i: b - a for i, (a, b) in ranges.items()}
    remote = ray.remote(
        num_cpus=options.actor_cpus,
        num_gpus=1 if gpu else 0,
        max_restarts=options.max_restarts,
        max_task_retries=options.max_restarts,  # the call an actor died in is sent to its restart
        max_concurrency=2,  # `progress` is answered while `build` runs
    )(ShardBuilder)
    actors = [remote.remote(artifacts, precision, options.actor_cpus) for _ in range(n_actors)]
    log(f"{len(pending)} shards of {count} on {n_actors} Ray actors ({'GPU' if gpu else 'CPU'})")
    prompts_ref = ray.put(prompts)  # sent to the object store once, not once per shard
    pool = actor_pool(actors)
    for i in pending:
        pool.submit(
            lambda a, i: a.build.remote(
                artifacts,
                prompts_ref,
                str(parts[i]),
                settings,
                (i, count),
                checkpoint_every,
                batch,
                precision,
            ),
            i,
        )
    initial = total - sum(sizes[i] for i in pending)
    bar = tqdm(total=total, initial=initial, desc="kb build (ray)", unit="entry", disable=not progress)
    done: dict[int, int] = {}
    polls: dict[int, Any] = {}
    reports: list[ShardReport] = []
    try:
        while pool.has_next():
            try:
                rep = pool.get_next_unordered(timeout=POLL_S)
            except TimeoutError:
                rep = None
            except ray.exceptions.RayActorError as exc:
                raise EffdiffError(
                    f"a Ray actor building a shard is dead after up to {options.max_restarts} restarts "
                    f"({_error_line(exc)}); finished shards are kept: run again with --resume"
                ) from None
            except ray.exceptions.RayError as exc:
                raise EffdiffError(
                    f"a shard failed on its Ray actor: {_error_line(exc)}; finished shards are kept"
                ) from None
            if rep is not None:
                reports.append(rep)
                done[rep.shard] = sizes[rep.shard]
            for k, actor in enumerate(actors):  # progress: non-blocking, a dead actor is skipped
                if k not in polls:  # not retried: a poll lost with its actor is simply sent again
                    polls[k] = actor.progress.options(max_task_retries=0).remote()
            ready, _ = ray.wait(list(polls.values()), num_returns=len(polls), timeout=0)
            for k in [k for k, ref in polls.items() if ref in ready]:
                try:
                    for i, n in ray.get(polls.pop(k)).items():
                        if not any(r.shard == i for r in reports):
                            done[i] = n
                except ray.exceptions.RayError:
                    pass  # restarting or gone: its build call says which
            bar.n = initial + sum(done.values())
            bar.refresh()
    finally:
        bar.close()
        ray.wait(list(polls.values()), num_returns=len(polls), timeout=2.0)  # no poll cut off by the kill
        for actor in actors:
            ray.kill(actor)  # free their CPUs/GPUs now, not when the driver exits
    return sorted(reports, key=lambda r: r.shard), n_actors, time.perf_counter() - t0
