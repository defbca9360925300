"""What a knowledge base is and how well it works: `kb info`, index recall and latency, and (on the
reference model) UNet evaluations saved against prompt adherence and PSNR kept."""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from effdiff.artifacts import atomic_path
from effdiff.compare import psnr
from effdiff.kb.adaptive import DEFAULT_MAX_VALUE_ERROR, DEFAULT_PROMPT_GATE, longest_jump
from effdiff.kb.build import LOO_NEIGHBOURS, _same_prompt_groups, entry_noise
from effdiff.kb.store import BuildSettings, KBManifest, KnowledgeBase, check_kb_files
from effdiff.runtime.propagation import KeySchedule

# ---------------------------------------------------------------- info


@dataclass
class KBInfo:
    folder: Path
    manifest: KBManifest
    disk_bytes: int

    @property
    def entries(self) -> int:
        return self.manifest.entries

    @property
    def float16_key_bytes(self) -> int:
        return 2 * self.manifest.key_dim

    def lines(self) -> list[str]:
        m, s = self.manifest, self.manifest.settings
        tie = m.tie
        out = [
            f"entries: {m.entries}",
            f"kind: {m.kind}"
            + (f" (shard {m.shard[0]}/{m.shard[1]}, entries {m.entry_range})" if m.shard else ""),
            f"artifacts: {tie['model']} (source {tie['source_hash'][:12]}, UNet {tie['precision']}, "
            f"tie {tie['hash'][:12]})",
            f"steps: {s.sampler} {s.steps}, guidance {s.guidance:g}, key step {s.key_step}, value steps "
            f"{','.join(map(str, s.value_steps))}, seeds {','.join(map(str, s.seeds))}",
            f"trajectories: propagation {s.propagation}"
            + (" (the whole UNet at every step)" if s.propagation == "none" else ""),
            f"keys: latent {'x'.join(map(str, m.latent_shape))} = {m.key_dim}-d, "
            f"{self.float16_key_bytes} B as float16",
        ]
        if m.index is not None and m.prompt_index is not None:
            ix = m.index
            ratio = self.float16_key_bytes / max(1, ix.entry_bytes)
            out += [
                f"index type: {ix.factory} (nprobe {ix.nprobe}, shortlist {ix.shortlist} re-ranked exactly)",
                f"bytes per entry in RAM: {ix.entry_bytes} (index codes"
                + (" + id" if ix.id_bytes else "")
                + f"; {ratio:.0f}x smaller than a float16 key) + {ix.fixed_bytes / 2**10:.0f} KiB fixed "
                "(transforms, codebooks); the index is memory-mapped",
                f"resident index at {m.entries} entries: {ix.file_bytes / 2**10:.0f} KiB "
                f"({ix.file_bytes / m.entries:.0f} B/entry including the fixed part)",
                f"prompt index: {m.prompt_index.factory} ({m.prompt_index.entry_bytes} B/entry)",
            ]
            for note in (ix.note, m.prompt_index.note):
                if note:
                    out.append(f"note: {note}")
        out.append(
            f"bytes per entry on disk: {self.disk_bytes / max(1, m.entries):.0f} "
            f"({self.disk_bytes / 2**20:.1f} MiB in all: float16 keys and values, indexes, prompt keys)"
        )
        for space, info in m.adaptive.items():
            thr = ", ".join(f"{v}: {t:.3g}" for v, t in info["thresholds"].items())
            q = ",".join(f"{x:g}" for x in info["quantiles"])
            out.append(
                f"jump thresholds ({space}, quantiles {q} of {info['loo_entries']} leave-one-out): {thr}"
            )
            if "prompt_limit" in info:
                out.append(
                    f"prompt gate (latent jumps): prompt distance <= {info['prompt_limit']:.3g} "
                    f"(quantile {info['prompt_gate']:g} of the leave-one-out prompt distances)"
                )
        errors = m.adaptive.get("latent", {}).get("value_rel_error", {})
        if errors:
            err = ", ".join(f"{v}: {e['nearest']:.3f}/{e['lstsq']:.3f}" for v, e in errors.items())
            out.append(f"leave-one-out value error (relative L2, nearest/lstsq): {err}")
            steps = m.settings.value_steps
            for combine in ("lstsq", "nearest"):
                out.append(_cap_line(longest_jump(errors, steps, combine), min(steps), combine))
        return out


def _cap_line(cap: int | None, first: int, combine: str) -> str:
    limit = f"{combine} value error {DEFAULT_MAX_VALUE_ERROR:g}; generate --kb-max-error"
    who = f"adaptive jumps with --kb-combine {combine}"
    if cap is None:
        return f"{who} may go to every value step (within {limit})"
    if cap < first:
        return f"{who} never happen: the first value step's error is past {limit}"
    return f"{who} go to step {cap} at most (later steps are past {limit})"


def kb_info(folder: Path, checksum: bool = False) -> KBInfo:
    """Read a KB's (or a part's) manifest and check its files (sizes; sha256 when `checksum`)."""
    manifest = KBManifest.read(Path(folder))
    check_kb_files(Path(folder), manifest.files, checksum)
    disk = sum(r.size for r in manifest.files.values())
    return KBInfo(Path(folder), manifest, disk)


# ---------------------------------------------------------------- index


@dataclass
class IndexEval:
    queries: int
    recall_at_1: float  # exact nearest is the search's first (after re-ranking)
    recall_at_10: float  # exact nearest is among the search's first 10
    recall_at_1_codes: float  # the same from compressed codes alone (no re-ranking)
    recall_at_10_codes: float
    latency_ms: dict[str, float]  # one query at a time, k = 4, with re-ranking: median, p90, min
    cpu_ms: float  # median CPU time of the calling thread per query (wall time grows on a busy machine)
    space: str = "latent"

    def lines(self) -> list[str]:
        lat = self.latency_ms
        return [
            f"{self.space} index on {self.queries} held-out queries (each entry's own prompt left out): "
            f"recall@1 {self.recall_at_1:.3f}, recall@10 {self.recall_at_10:.3f} against exact search "
            f"(compressed codes alone: {self.recall_at_1_codes:.3f}, {self.recall_at_10_codes:.3f})",
            f"lookup latency per query: median {lat['median']:.3f} ms, p90 {lat['p90']:.3f} ms, "
            f"min {lat['min']:.3f} ms (CPU time median {self.cpu_ms:.3f} ms)",
        ]


def eval_index(kb: KnowledgeBase, queries: int = 200, space: str = "latent", seed: int = 1) -> IndexEval:
    """Recall of the KB's search against brute force over the float16 keys, on entries looked up with
    every entry of their own prompt left out (as a new prompt would be), and single-query latency."""
    n = len(kb)
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(n, min(n, queries), replace=False))
    same = _same_prompt_groups(np.asarray(kb.entries))
    exclude = [same(int(e)) for e in held]
    keys = kb.prompt_keys if space == "prompt" else kb.keys
    q = np.asarray(keys[held], np.float32)
    exact = kb.exact_search(q, 1, space, exclude=exclude)
    truth, best = exact.ids[:, 0], exact.distances[:, 0]

    def recall(ids: np.ndarray) -> tuple[float, float]:
        # a hit: the exact nearest entry, or one exactly as near (entries of one prompt share its
        # prompt key, and the KB may hold duplicates), distances taken directly from the keys
        rows = np.asarray(keys[np.maximum(ids, 0).ravel()], np.float64).reshape(*ids.shape, -1)
        dist = np.linalg.norm(rows - q[:, None].astype(np.float64), axis=-1)
        hit = (ids == truth[:, None]) | ((ids >= 0) & (dist <= best[:, None] * (1 + 1e-6) + 1e-9))
        return float(np.mean(hit[:, 0])), float(np.mean(hit[:, :10].any(1)))

    r1, r10 = recall(kb.search(q, 10, space, exclude=exclude).ids)
    c1, c10 = recall(kb.search(q, 10, space, exclude=exclude, rerank=False).ids)
    for row in q[:5]:  # warm-up: page in what the first queries touch
        kb.search(row[None], LOO_NEIGHBOURS, space)
    times, cpu = [], []
    for row in q:
        t0, c0 = time.perf_counter(), time.thread_time()
        kb.search(row[None], LOO_NEIGHBOURS, space)
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.thread_time() - c0) * 1e3)
    lat = {"median": statistics.median(times), "p90": float(np.percentile(times, 90)), "min": min(times)}
    return IndexEval(len(held), r1, r10, c1, c10, lat, statistics.median(cpu), space)


# ---------------------------------------------------------------- quality on the reference model


@dataclass(frozen=True)
class KBConfig:
    """One way to use the KB in a quality evaluation."""

    name: str
    mode: str = "latent"
    jump: str = "adaptive"  # as `effdiff generate --kb-jump`
    prompt_gate: float | None = DEFAULT_PROMPT_GATE  # as `--kb-prompt-gate` (None: off)
    max_error: float | None = DEFAULT_MAX_VALUE_ERROR  # as `--kb-max-error` (None: off)
    combine: str = "lstsq"
    neighbours: int = 4
    propagation: str = "none"


@dataclass
class QualityRow:
    name: str
    split: str
    images: int
    unet_steps: int  # denoising steps run, all images
    full_steps: int  # what full generation runs
    adherence: Any  # effdiff.reference.judge.Adherence
    psnr_db: float | None  # against full generation with the same noise (None for the baseline itself)
    jumps: dict[str, int] = field(default_factory=dict)  # start step (or "full") -> images
    encoder_evals: int = 0  # UNet-encoder evaluations, all images (the whole UNet counts as one)
    baseline: Any = None  # full generation's Adherence on the same prompts and noise (paired comparison)

    @property
    def saved(self) -> float:
        return 1.0 - self.unet_steps / max(1, self.full_steps)

    def cells(self) -> list[str]:
        a = self.adherence
        jumps = ", ".join(f"{k}: {v}" for k, v in sorted(self.jumps.items(), key=lambda kv: str(kv[0])))
        return [
            self.name,
            self.split,
            str(self.images),
            f"{100 * self.saved:.1f} %",
            f"{self.encoder_evals / max(1, self.images):.1f}",
            a.describe("kind"),
            a.describe("colour"),
            *("—" if self.baseline is None else a.versus(self.baseline, k) for k in ("kind", "colour")),
            "—" if self.psnr_db is None else f"{self.psnr_db:.2f}",
            jumps or "—",
        ]


HEADER = [
    "configuration",
    "split",
    "images",
    "UNet steps saved",
    "encoder evals / image",
    "shape [95 % CI]",
    "colour [95 % CI]",
    "shape vs full [paired 95 % CI]",
    "colour vs full [paired 95 % CI]",
    "PSNR vs full (dB)",
    "jumps (start step: images)",
]


def markdown_table(rows: list[QualityRow]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def full_runs(
    pipe: Any,
    settings: BuildSettings,
    prompts: list[str],
    seeds: list[int],
    propagation: str,
    chunk: int = 32,
    cache: Path | None = None,
) -> tuple[list[Any], list[np.ndarray]]:
    """Full generations (images) and their latents after the key step, `chunk` images per call; kept
    in `cache` (a folder) under a hash of everything they depend on, so a re-run or a second KB with
    the same settings does not generate them again."""
    from PIL import Image

    from effdiff.runtime.pipeline import Hooks

    s = settings
    # the run's own `propagation` is what counts, not the KB's: two KBs that differ only in the
    # schedule of their trajectories share these runs (and the files cached before that field existed)
    run_settings = {k: v for k, v in s.to_json().items() if k != "propagation"}
    what = [pipe.manifest.source.content_hash, run_settings, prompts, seeds, propagation, chunk]
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]
    path = None if cache is None else Path(cache) / f"full-{digest}.npz"
    if path is not None and path.exists():
        with np.load(path) as data:
            images = [Image.fromarray(a) for a in data["images"]]
            return images, [data[f"key_{i}"] for i in range(int(data["chunks"]))]
    h, w = pipe.default_size()
    images, key_lat = [], []
    for start in range(0, len(prompts), chunk):
        unit = entry_noise(pipe, seeds[start : start + chunk], h, w)
        captured: dict[str, np.ndarray] = {}

        def grab(i: int, _t: float, lat: np.ndarray, into: dict[str, np.ndarray] = captured) -> None:
            if i + 1 == s.key_step:
                into["x"] = lat.copy()

        res = pipe(
            prompts[start : start + chunk],
            s.negative_prompt,
            steps=s.steps,
            sampler=s.sampler,
            guidance_scale=s.guidance,
            latents=unit,
            propagation=propagation,
            hooks=Hooks(on_step=grab),
        )
        images += res.images
        key_lat.append(captured["x"])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = {f"key_{i}": k for i, k in enumerate(key_lat)}
        with atomic_path(path) as tmp, tmp.open("wb") as fh:
            np.savez(fh, images=np.stack([np.asarray(im) for im in images]), chunks=len(key_lat), **keys)
    return images, key_lat


def eval_quality(
    pipe: Any,
    kb: KnowledgeBase,
    scenes: list[Any],
    split: str,
    configs: list[KBConfig],
    seeds: list[int] | None = None,
    chunk: int = 32,
    log: Callable[[str], None] = print,
    cache: Path | None = None,
) -> list[QualityRow]:
    """Full generation and each KB configuration on the same prompts and starting noise, scored by the
    reference model's attribute classifier. Image i starts from seed `seeds[i]` (default: the KB's own
    seeds in turn, ReDi's protocol of shared starting noise). A full run per propagation schedule is
    the baseline; each KB configuration reuses its latents after the key step (the same computation)."""
    from effdiff.kb.retrieval import RetrievalStart, jump_policy
    from effdiff.reference.judge import Adherence, AttributeClassifier

    s = kb.settings
    seeds = seeds or default_seeds(s, len(scenes))
    h, w = pipe.default_size()
    clf = AttributeClassifier()
    rows: list[QualityRow] = []
    schedules = sorted({c.propagation for c in configs} | {"none"}, key=lambda p: p != "none")
    baseline_images: dict[str, list[Any]] = {}
    for prop in schedules:
        images, key_lat = full_runs(pipe, s, [sc.prompt for sc in scenes], seeds, prop, chunk, cache)
        baseline_images[prop] = images
        name = "full" if prop == "none" else f"fd ({prop})"
        adh = Adherence.of(clf.run(images)[0], scenes)
        full = len(scenes) * s.steps
        ref = baseline_images["none"]
        p = None if prop == "none" else _mean_psnr(images, ref)
        enc = len(scenes) * len(KeySchedule.parse(prop).run_keys(s.steps))
        base = None if prop == "none" else rows[0].adherence
        rows.append(
            QualityRow(name, split, len(scenes), full, full, adh, p, {"full": len(scenes)}, enc, base)
        )
        log(markdown_table(rows[-1:]).splitlines()[-1])
        for cfg in (c for c in configs if c.propagation == prop):
            runner = RetrievalStart(
                pipe,
                kb,
                cfg.mode,
                cfg.combine,
                cfg.neighbours,
                jump_policy(kb, cfg.jump, cfg.mode, cfg.prompt_gate, cfg.max_error, cfg.combine),
            )
            kb_images, steps_run, jumps, enc = [], 0, {}, 0
            for n_chunk, start in enumerate(range(0, len(scenes), chunk)):
                part = scenes[start : start + chunk]
                unit = entry_noise(pipe, seeds[start : start + chunk], h, w)
                res = runner(
                    [sc.prompt for sc in part],
                    latents=unit,
                    propagation=prop,
                    key_latents=key_lat[n_chunk] if cfg.mode == "latent" else None,
                )
                kb_images += res.images
                steps_run += res.unet_steps
                for j in res.jumps:
                    k = j.start_step if j.start_step is not None else "full"
                    k = "full (prompt gate)" if j.prompt_gated else k
                    jumps[k] = jumps.get(k, 0) + 1
                    enc += encoder_evaluations(prop, s.steps, s.key_step, j.start_step, cfg.mode)
            adh = Adherence.of(clf.run(kb_images)[0], scenes)
            p = _mean_psnr(kb_images, ref)
            row = QualityRow(
                cfg.name, split, len(scenes), steps_run, full, adh, p, jumps, enc, rows[0].adherence
            )
            rows.append(row)
            log(markdown_table([row]).splitlines()[-1])
    return rows


def encoder_evaluations(propagation: str, steps: int, key_step: int, start: int | None, mode: str) -> int:
    """UNet-encoder evaluations of one image: every step without propagation; with it, the schedule's
    key steps before the lookup and, after a jump to `start`, that step and the schedule's keys after it."""
    schedule = KeySchedule.parse(propagation)
    if start is None:
        return len(schedule.run_keys(steps))
    before = len(schedule.run_keys(steps, 0, key_step)) if mode == "latent" else 0
    return before + len(schedule.run_keys(steps, start))


def default_seeds(settings: BuildSettings, count: int) -> list[int]:
    """The KB's seeds in turn: image i starts from the noise of seed i mod S."""
    return [settings.seeds[i % len(settings.seeds)] for i in range(count)]


def _mean_psnr(images: list[Any], reference: list[Any]) -> float:
    return float(
        np.mean(
            [min(psnr(np.asarray(a), np.asarray(b)), 99.0) for a, b in zip(images, reference, strict=True)]
        )
    )
