"""Build a knowledge base from prompts x seeds, checkpointed and resumable, one shard or all of it;
merge shards into one searchable KB.

A build enumerates its entries in a fixed order, entry e = (prompt e // S, seed e % S) for S seeds,
and a shard `i/n` owns the contiguous range [i*E//n, (i+1)*E//n). Its entries are generated in
checkpoints of `checkpoint_every` entries, each written atomically to `OUT/.partial/` under its entry
range; a build killed at any moment (SIGKILL included) resumes with `resume=True` from the first
missing checkpoint, so no finished checkpoint is lost and none is generated twice. A shard is one
self-contained resumable unit (a Ray actor can own one); `merge_kb` is the library function that joins
the parts. `kb.json` is written last, atomically, under the folder lock: a folder being written never
looks like a KB.

Trajectories come from the runtime's own loop: `Pipeline.denoise` with a step hook that copies the
latents after the key step and after each value step, stopping at the last value step (the steps after
it are never needed). They run on the settings' propagation schedule (`none`: the whole UNet at every
step; `cache:3`: DeepCache's recipe, so the keys are what a `cache:3` generation holds after the key
step), without noise injection. Each entry's starting noise is `numpy.random.default_rng(seed)` over
one image, which is what `effdiff generate --seed S` draws for its first image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from effdiff.artifacts import (
    Manifest,
    atomic_path,
    folder_lock,
    read_json,
    remove_stale_temporaries,
    write_json,
)
from effdiff.errors import EffdiffError
from effdiff.kb.adaptive import DEFAULT_PROMPT_GATE, JumpPolicy, default_quantiles, prompt_limit
from effdiff.kb.index import (
    DEFAULT_FACTORY,
    IndexInfo,
    add_in_chunks,
    describe,
    train_index,
    write_index,
)
from effdiff.kb.store import (
    ARRAYS,
    ENTRIES,
    INDEX,
    KB_MANIFEST,
    KEYS,
    LOO,
    PARTIAL,
    PROMPT_INDEX,
    PROMPT_KEYS,
    PROMPTS,
    VALUES,
    BuildSettings,
    KBManifest,
    KnowledgeBase,
    artifacts_tie,
    check_kb_files,
    record_files,
)

MAX_TRAIN = 100_000  # keys sampled to train an index; faiss needs no more for these codebooks
LOO_SAMPLE = 1000  # held-back entries whose leave-one-out distances set the jump thresholds
LOO_NEIGHBOURS = 4  # for the value-error figures recorded beside the thresholds
STATE = "state.json"


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines are skipped. EffdiffError when missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise EffdiffError(f"prompt file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise EffdiffError(f"prompt file {path} is not UTF-8 text") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise EffdiffError(f"prompt file {path} holds no prompts (one per line; blank lines are skipped)")
    return prompts


def parse_shard(text: str) -> tuple[int, int]:
    """`i/n` -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise EffdiffError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise EffdiffError(f"shard {text}: need 0 <= i < n")
    return i, n


def shard_range(total: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    if shard is None:
        return 0, total
    i, n = shard
    return i * total // n, (i + 1) * total // n


def default_prompt_factory(dim: int) -> str:
    """PQ over the prompt embedding with the most sub-quantizers (<= 16) that divide its width."""
    m = next(m for m in (16, 8, 4, 2, 1) if dim % m == 0)
    return f"PQ{m}"


@dataclass(frozen=True)
class IndexOptions:
    """How the searchable part of a KB is made from its entries (build, merge and reindex alike)."""

    factory: str = DEFAULT_FACTORY  # faiss factory string for the keys
    prompt_factory: str | None = None  # for prompt keys; None: PQ with up to 16 sub-quantizers
    nprobe: int = 16  # IVF lists visited per query
    shortlist: int = 64  # candidates re-ranked exactly from the float16 keys
    jump_quantiles: tuple[float, ...] | None = None  # one per value step; None: 0.95 .. 0.6

    def check(self, value_steps: tuple[int, ...]) -> None:
        for name in ("nprobe", "shortlist"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EffdiffError(f"{name} must be an integer >= 1, got {value!r}")
        if self.jump_quantiles is not None and len(self.jump_quantiles) != len(value_steps):
            raise EffdiffError(
                f"{len(self.jump_quantiles)} jump quantiles for {len(value_steps)} value steps; give one each"
            )


@dataclass
class BuildReport:
    out: Path
    kind: str  # "kb" or "part"
    entries: int  # held by the folder
    generated: int  # generated by this run
    resumed: int  # found in checkpoints of an earlier run
    seconds: float
    index: IndexInfo | None = None
    prompt_index: IndexInfo | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        what = "knowledge base" if self.kind == "kb" else "part (merge the parts with `effdiff kb merge`)"
        line = (
            f"wrote {what} {self.out}: {self.entries} entries ({self.generated} generated now, "
            f"{self.resumed} from checkpoints) in {self.seconds:.1f}s"
        )
        if self.index is not None:
            line += f"; index {self.index.factory} ({self.index.entry_bytes} B/entry)"
        return line


# ---------------------------------------------------------------- generating entries


def entry_noise(pipe: Any, seeds: list[int] | tuple[int, ...], height: int, width: int) -> np.ndarray:
    """Unit starting noise (B, C, h, w), one image per seed: `default_rng(seed)` over one image."""
    return np.concatenate([pipe.initial_noise(1, height, width, int(s), None) for s in seeds])


def prompt_keys(cond: Any) -> np.ndarray:
    """(B, P) float32: each image's prompt embedding averaged over its token positions."""
    rows = cond.embeddings[cond.batch :] if cond.guided else cond.embeddings
    return np.asarray(rows, np.float32).mean(axis=1)


def generate_entries(
    pipe: Any, prompts: list[str], seeds: list[int], settings: BuildSettings, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One batch of trajectories through the runtime: keys (B, D), values (B, V, D) and prompt keys
    (B, P), all float16. Runs steps [0, last value step) only, on the settings' propagation schedule."""
    from effdiff.runtime.pipeline import Hooks

    s = settings
    cond = pipe.encode_prompt(prompts, s.negative_prompt, 1, s.guidance)
    plan = pipe.plan(s.steps, s.sampler, s.propagation, noise_injection=None)
    unit = entry_noise(pipe, seeds, height, width)
    batch = len(prompts)
    keys = np.zeros((batch, unit[0].size), np.float16)
    values = np.zeros((batch, len(s.value_steps), unit[0].size), np.float16)
    slot = {v: j for j, v in enumerate(s.value_steps)}

    def record(i: int, _t: float, latents: np.ndarray) -> None:
        done = i + 1  # the latents after step i are the input of step i + 1
        if done == s.key_step:
            keys[:] = latents.reshape(batch, -1)
        if done in slot:
            values[:, slot[done]] = latents.reshape(batch, -1)

    x = unit * np.float32(plan.scheduler.init_noise_sigma)
    pipe.denoise(x, cond, plan, stop_step=s.value_steps[-1], hooks=Hooks(on_step=record))
    return keys, values, prompt_keys(cond).astype(np.float16)


# ---------------------------------------------------------------- checkpoints


def _chunk_path(partial: Path, start: int, stop: int) -> Path:
    return partial / f"chunk-{start:012d}-{stop:012d}.npz"


def _chunks(start: int, stop: int, every: int) -> list[tuple[int, int]]:
    return [(a, min(a + every, stop)) for a in range(start, stop, every)]


def _load_chunk(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            return {k: data[k] for k in ("entries", "keys", "values", "prompt_keys")}
    except Exception as exc:  # a checkpoint is renamed into place whole; this is disk damage
        raise EffdiffError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}); delete it and resume to redo it"
        ) from None


def _write_chunk(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.savez(fh, **arrays)


@contextlib.contextmanager
def _new_arrays(out: Path, shapes: dict[str, tuple[tuple[int, ...], Any]]) -> Iterator[dict[str, np.ndarray]]:
    """Memory-mapped .npy files written under temporary names, renamed into place together on success."""
    with contextlib.ExitStack() as stack:
        arrays = {}
        for name, (shape, dtype) in shapes.items():
            tmp = stack.enter_context(atomic_path(out / name))
            arrays[name] = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        yield arrays
        for arr in arrays.values():
            arr.flush()
        del arrays


# ---------------------------------------------------------------- build


def chosen_precision(manifest: Manifest, precision: str | None) -> str:
    """The UNet precision a build runs at: the one asked for, else the artifacts' default."""
    return manifest.default_precision().value if precision is None else precision


def prompts_sha256(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def check_graphs(manifest: Manifest, settings: BuildSettings, precision: str) -> None:
    """EffdiffError in one line, before anything is written, when the artifacts lack a UNet graph the
    settings' propagation schedule runs (e.g. `cache:3` without the cache recipe's graphs)."""
    for graph in settings.schedule.graphs:
        try:
            manifest.choose(graph, precision)
        except EffdiffError as exc:
            raise EffdiffError(f"propagation {settings.propagation} runs {graph}: {exc}") from None


def state_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between an unfinished build's recorded state and this run's, in words: a setting by
    name with its recorded value and this run's, anything else by name. A state written before a
    settings field existed reads that field at its default."""
    changes = []
    was = {**BuildSettings().to_json(), **old.get("settings", {})}
    for key in sorted(new):
        if key == "settings":
            changes += [f"{f} {was[f]!r} (this run: {v!r})" for f, v in new[key].items() if was.get(f) != v]
        elif key == "tie" and was["propagation"] != new["settings"]["propagation"]:
            continue  # the tie hashes the schedule's graphs, so it follows the propagation named above
        elif old.get(key) != new[key]:
            changes.append(key)
    return changes


def _check_out(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise EffdiffError(f"{out} is a file, not a folder for a knowledge base")
    if (out / KB_MANIFEST).exists():
        raise EffdiffError(f"{out} already holds a knowledge base; choose another folder or delete it")
    if (out / PARTIAL).exists() and not resume:
        raise EffdiffError(f"{out} holds an unfinished build; pass --resume to continue it")
    if out.exists() and not (out / PARTIAL).exists():
        others = [p.name for p in out.iterdir() if not p.name.startswith(".")]
        if others:
            shown = ", ".join(sorted(others)[:3])
            raise EffdiffError(f"{out} is not empty ({shown} ...); choose a new folder")


def build_kb(
    artifacts: Path,
    prompts: list[str],
    out: Path,
    settings: BuildSettings,
    index: IndexOptions = IndexOptions(),
    shard: tuple[int, int] | None = None,
    resume: bool = False,
    checkpoint_every: int = 256,
    batch: int = 32,
    precision: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    pipeline: Any | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> BuildReport:
    """Generate the entries of `prompts` x `settings.seeds` (or one shard of them) into `out`: a
    searchable KB, or for a shard a part for `merge_kb`. See the module docstring for resume rules.
    `pipeline`: these artifacts already loaded at `precision` (a Ray actor loads them once for all the
    shards it builds); `on_progress(n)`: called with the entries of this build done so far (checkpointed
    earlier or generated now) after each batch."""
    from effdiff.runtime.pipeline import Pipeline

    started = time.perf_counter()
    out = Path(out)
    settings.check()
    if not prompts or not all(isinstance(p, str) and p.strip() and "\n" not in p for p in prompts):
        raise EffdiffError("prompts must be a non-empty list of one-line, non-blank strings")
    for name, value in (("checkpoint_every", checkpoint_every), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EffdiffError(f"{name} must be an integer >= 1, got {value!r}")
    index.check(settings.value_steps)
    manifest = Manifest.read(Path(artifacts))
    chosen = chosen_precision(manifest, precision)
    check_graphs(manifest, settings, chosen)
    total = len(prompts) * len(settings.seeds)
    start, stop = shard_range(total, shard)
    if stop <= start:
        raise EffdiffError(f"shard {shard} of {total} entries is empty; use fewer shards")
    _check_out(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, "a knowledge-base build"):
        _check_out(out, resume)  # again, now that no other writer can change it
        partial = out / PARTIAL
        tie = artifacts_tie(manifest, chosen, settings.tied_graphs())
        state = {
            "tie": tie["hash"],
            "settings": settings.to_json(),
            "prompts_sha256": prompts_sha256(prompts),
            "range": [start, stop],
            "shard": list(shard) if shard else None,
            "checkpoint_every": checkpoint_every,
        }
        if (partial / STATE).exists():
            diff = state_changes(read_json(partial / STATE), state)
            if diff:
                raise EffdiffError(
                    f"the unfinished build in {out} was started with other {', '.join(diff)}; resume it "
                    f"with the same options, or delete {partial} to start again"
                )
        else:
            partial.mkdir(parents=True, exist_ok=True)
            write_json(partial / STATE, state)
        for folder in (out, partial):  # what a killed writer left half-written; we hold the lock
            remove_stale_temporaries(folder)
        chunks = _chunks(start, stop, checkpoint_every)
        missing = [c for c in chunks if not _chunk_path(partial, *c).exists()]
        resumed = sum(b - a for a, b in chunks) - sum(b - a for a, b in missing)
        if resumed:
            log(f"resuming: {resumed} of {stop - start} entries are in checkpoints")
        pipe = pipeline
        if pipe is None and missing:
            pipe = Pipeline.load(artifacts, precision=chosen, lean=False)
        height, width = (
            settings.height or manifest.export_size[0] * manifest.geometry.vae_factor,
            settings.width or manifest.export_size[1] * manifest.geometry.vae_factor,
        )
        seeds = list(settings.seeds)
        bar = tqdm(total=stop - start, initial=resumed, desc="kb build", unit="entry", disable=not progress)
        done = resumed
        if on_progress is not None:
            on_progress(done)
        for a, b in missing:
            parts: list[tuple[np.ndarray, ...]] = []
            for s0 in range(a, b, batch):
                ids = np.arange(s0, min(s0 + batch, b))
                batch_prompts = [prompts[e // len(seeds)] for e in ids]
                batch_seeds = [seeds[e % len(seeds)] for e in ids]
                parts.append(generate_entries(pipe, batch_prompts, batch_seeds, settings, height, width))
                bar.update(len(ids))
                done += len(ids)
                if on_progress is not None:
                    on_progress(done)
            ids = np.arange(a, b)
            numbers = np.stack([ids // len(seeds), np.asarray(seeds)[ids % len(seeds)]], 1)
            _write_chunk(
                _chunk_path(partial, a, b),
                entries=numbers.astype(np.int64),
                keys=np.concatenate([p[0] for p in parts]),
                values=np.concatenate([p[1] for p in parts]),
                prompt_keys=np.concatenate([p[2] for p in parts]),
            )
        bar.close()
        del pipe

        # assemble the checkpoints into the folder's arrays
        first = _load_chunk(_chunk_path(partial, *chunks[0]))
        n = stop - start
        shapes = {
            ENTRIES: ((n, 2), np.int64),
            KEYS: ((n, first["keys"].shape[1]), np.float16),
            VALUES: ((n, *first["values"].shape[1:]), np.float16),
            PROMPT_KEYS: ((n, first["prompt_keys"].shape[1]), np.float16),
        }
        with _new_arrays(out, shapes) as arrays:
            for a, b in chunks:
                data = _load_chunk(_chunk_path(partial, a, b))
                for name, key in zip(ARRAYS, ("entries", "keys", "values", "prompt_keys"), strict=True):
                    arrays[name][a - start : b - start] = data[key]
        with atomic_path(out / PROMPTS) as tmp:
            tmp.write_text("\n".join(prompts))
        c = manifest.geometry.latent_channels
        lat_h, lat_w = manifest.geometry.latent_size(height, width)
        kb_manifest = KBManifest(
            kind="part" if shard is not None else "kb",
            tie=tie,
            settings=settings,
            latent_shape=(c, lat_h, lat_w),
            prompts_sha256=prompts_sha256(prompts),
            num_prompts=len(prompts),
            entries=n,
            entry_range=(start, stop),
            total_entries=total,
            shard=shard,
            build={
                "checkpoint_every": checkpoint_every,
                "batch": batch,
                "unet_steps_per_entry": settings.value_steps[-1],
                "seconds": round(time.perf_counter() - started, 3),
            },
        )
        report = BuildReport(out, kb_manifest.kind, n, n - resumed, resumed, 0.0)
        if shard is not None:
            kb_manifest.files = record_files(out, [PROMPTS, *ARRAYS])
            kb_manifest.write(out)  # last
        else:
            _finalize(out, kb_manifest, index, report, log)
        shutil.rmtree(partial)
    report.seconds = time.perf_counter() - started
    return report


# ---------------------------------------------------------------- indexes, thresholds, manifest


def _same_prompt_groups(entries: np.ndarray) -> Callable[[int], np.ndarray]:
    """entry id -> ids of every entry with the same prompt (itself included)."""
    order = np.argsort(entries[:, 0], kind="stable")
    sorted_prompts = entries[order, 0]

    def same(e: int) -> np.ndarray:
        p = entries[e, 0]
        lo, hi = np.searchsorted(sorted_prompts, [p, p + 1])
        return order[lo:hi]

    return same


def _rel_error(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.linalg.norm(pred - true) / max(np.linalg.norm(true), 1e-12))


def _finalize(
    out: Path,
    manifest: KBManifest,
    options: IndexOptions,
    report: BuildReport,
    log: Callable[[str], None],
) -> None:
    """Train and fill both indexes, derive the jump thresholds, record every file, write kb.json last."""
    options.check(manifest.settings.value_steps)
    keys = np.load(out / KEYS, mmap_mode="r")
    pkeys = np.load(out / PROMPT_KEYS, mmap_mode="r")
    entries = np.load(out / ENTRIES)
    n = len(keys)
    rng = np.random.default_rng(0)
    train_ids = np.sort(rng.choice(n, min(n, MAX_TRAIN), replace=False))
    prompt_factory = options.prompt_factory or default_prompt_factory(pkeys.shape[1])
    infos = {}
    for name, factory, rows, what in (
        (INDEX, options.factory, keys, "keys"),
        (PROMPT_INDEX, prompt_factory, pkeys, "prompt keys"),
    ):
        t0 = time.perf_counter()
        index, note = train_index(factory, np.asarray(rows[train_ids], np.float32), what)
        add_in_chunks(index, rows)
        write_index(index, out / name)
        infos[name] = describe(
            index, factory, out / name, options.nprobe, options.shortlist, len(train_ids), note
        )
        if note:
            report.notes.append(f"{what} index: {note}")
        log(f"{what} index {factory}: trained and filled in {time.perf_counter() - t0:.1f}s")
        del index
    manifest.index, manifest.prompt_index = infos[INDEX], infos[PROMPT_INDEX]
    report.index, report.prompt_index = manifest.index, manifest.prompt_index

    # leave-one-out distances of a held-back sample, every entry of the query's own prompt left out
    kb = KnowledgeBase(out, manifest)
    held = np.sort(rng.choice(n, min(n, LOO_SAMPLE), replace=False))
    same = _same_prompt_groups(entries)
    exclude = [same(int(e)) for e in held]
    lat = kb.search(np.asarray(keys[held], np.float32), LOO_NEIGHBOURS, "latent", exclude=exclude)
    pro = kb.search(np.asarray(pkeys[held], np.float32), 1, "prompt", exclude=exclude)
    loo = np.stack([lat.distances[:, 0], pro.distances[:, 0]], 1).astype(np.float32)
    with atomic_path(out / LOO) as tmp, tmp.open("wb") as fh:
        np.save(fh, loo)
    steps = manifest.settings.value_steps
    quantiles = options.jump_quantiles or default_quantiles(len(steps))
    adaptive: dict[str, Any] = {}
    for col, space in enumerate(("latent", "prompt")):
        d = loo[:, col]
        finite = d[np.isfinite(d)]
        policy = JumpPolicy.from_distances(d, steps, quantiles)
        marks = (("min", 0.0), ("p10", 0.1), ("p50", 0.5), ("p90", 0.9))
        summary = {k: float(np.quantile(finite, q)) for k, q in marks} if len(finite) else {}
        adaptive[space] = {
            "quantiles": list(quantiles),
            "thresholds": policy.to_json()["thresholds"],
            "loo_entries": len(finite),
            "loo_distance": summary,
        }
    # what a jump would cost in value error at each step: nearest neighbour and ReDi's blend
    errors: dict[str, dict[str, float]] = {}
    for j, v in enumerate(steps):
        near, blend = [], []
        for row, e in enumerate(held[:200]):
            ids = lat.ids[row]
            if ids[0] < 0:
                continue
            true = np.asarray(kb.values[e, j], np.float32)
            near.append(_rel_error(kb.blend(keys[e], ids, v, "nearest"), true))
            blend.append(_rel_error(kb.blend(np.asarray(keys[e], np.float32), ids, v, "lstsq"), true))
        if near:
            errors[str(v)] = {"nearest": float(np.mean(near)), "lstsq": float(np.mean(blend))}
    adaptive["latent"]["value_rel_error"] = errors
    limit = prompt_limit(loo[:, 1], DEFAULT_PROMPT_GATE)
    adaptive["latent"].update(prompt_gate=DEFAULT_PROMPT_GATE, prompt_limit=limit)
    manifest.adaptive = adaptive
    if not len(loo[np.isfinite(loo[:, 0])]):
        report.notes.append("no entry has a neighbour of another prompt: adaptive jumps are disabled")
    del kb
    manifest.files = record_files(out, [PROMPTS, *ARRAYS, INDEX, PROMPT_INDEX, LOO])
    manifest.write(out)  # last: from here on the folder is a knowledge base


# ---------------------------------------------------------------- merge


def merge_kb(
    parts: list[Path],
    out: Path,
    index: IndexOptions = IndexOptions(),
    log: Callable[[str], None] = print,
) -> BuildReport:
    """Join the parts of a sharded build (every shard exactly once, any order) into one searchable KB.
    Each part is checked (files and sha256) and must come from the same artifacts, prompts and settings."""
    started = time.perf_counter()
    if not parts:
        raise EffdiffError("give the part folders to merge")
    out = Path(out)
    manifests = [KBManifest.read(Path(p)) for p in parts]
    for p, m in zip(parts, manifests, strict=True):
        if m.kind != "part":
            raise EffdiffError(f"{p} is a complete knowledge base, not a part of a sharded build")
        check_kb_files(Path(p), m.files)
    first = manifests[0]
    for p, m in zip(parts, manifests, strict=True):
        for what, a, b in (
            ("artifacts", m.tie["hash"], first.tie["hash"]),
            ("settings", m.settings, first.settings),
            ("prompts", m.prompts_sha256, first.prompts_sha256),
            ("shard count", m.shard[1] if m.shard else None, first.shard[1] if first.shard else None),
        ):
            if a != b:
                raise EffdiffError(f"part {p} was built with other {what} than part {parts[0]}")
    count = first.shard[1] if first.shard else 1
    have = sorted(m.shard[0] for m in manifests if m.shard)
    if have != list(range(count)):
        missing = sorted(set(range(count)) - set(have))
        dupes = sorted({i for i in have if have.count(i) > 1})
        raise EffdiffError(
            f"parts do not cover the build once: shards of {count}"
            + (f", missing {missing}" if missing else "")
            + (f", repeated {dupes}" if dupes else "")
        )
    order = sorted(range(len(parts)), key=lambda i: manifests[i].entry_range[0])
    _check_out(out, resume=False)
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, "a knowledge-base merge"):
        _check_out(out, resume=False)
        remove_stale_temporaries(out)  # of a merge killed part-way; we hold the lock
        total = first.total_entries
        src = [Path(parts[i]) for i in order]
        shapes = {}
        for name in ARRAYS:
            arr = np.load(src[0] / name, mmap_mode="r")
            shapes[name] = ((total, *arr.shape[1:]), arr.dtype)
        with _new_arrays(out, shapes) as arrays:
            for i, folder in zip(order, src, strict=True):
                a, b = manifests[i].entry_range
                for name in ARRAYS:
                    arrays[name][a:b] = np.load(folder / name, mmap_mode="r")
        shutil.copyfile(src[0] / PROMPTS, out / PROMPTS)
        merged = KBManifest(
            kind="kb",
            tie=first.tie,
            settings=first.settings,
            latent_shape=first.latent_shape,
            prompts_sha256=first.prompts_sha256,
            num_prompts=first.num_prompts,
            entries=total,
            entry_range=(0, total),
            total_entries=total,
            build={"merged_parts": count, **{k: v for k, v in first.build.items() if k != "seconds"}},
        )
        report = BuildReport(out, "kb", total, 0, total, 0.0)
        _finalize(out, merged, index, report, log)
    report.seconds = time.perf_counter() - started
    return report


def reindex_kb(
    source: Path,
    out: Path,
    index: IndexOptions = IndexOptions(),
    log: Callable[[str], None] = print,
) -> BuildReport:
    """A copy of a KB's entries in `out` with other indexes, search options or jump quantiles: trying
    another compression never needs the trajectories generated again."""
    started = time.perf_counter()
    source, out = Path(source), Path(out)
    manifest = KBManifest.read(source)
    if manifest.kind != "kb":
        raise EffdiffError(f"{source} is a part of a sharded build; merge the parts instead")
    check_kb_files(source, manifest.files)
    _check_out(out, resume=False)
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, "a knowledge-base reindex"):
        _check_out(out, resume=False)
        for name in (PROMPTS, *ARRAYS):
            with atomic_path(out / name) as tmp:
                shutil.copyfile(source / name, tmp)
        fresh = dataclasses.replace(manifest, files={}, index=None, prompt_index=None, adaptive={})
        report = BuildReport(out, "kb", manifest.entries, 0, manifest.entries, 0.0)
        _finalize(out, fresh, index, report, log)
    report.seconds = time.perf_counter() - started
    return report
