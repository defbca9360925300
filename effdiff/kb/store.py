"""The knowledge-base folder on disk, and searching it.

Layout (every file is recorded in `kb.json` with its size and sha256; `kb.json` is written last and
atomically, so a folder without it is not a KB, whatever else it holds):

  kb.json             KBManifest: what made it (artifacts hash, sampler, steps, guidance, seeds, key
                      and value steps, propagation schedule), its indexes, its jump thresholds, its files
  prompts.txt         the build's prompts, one per line (entries refer to them by number)
  entries.npy         (N, 2) int64: prompt number, seed of each entry
  keys.npy            (N, D) float16: latent at the key step, flattened (D = C*h*w)
  values.npy          (N, V, D) float16: latents at the value steps
  prompt_keys.npy     (N, P) float16: the prompt's text embedding averaged over tokens
  index.faiss         faiss index over keys (compressed; read memory-mapped and read-only)
  prompt_index.faiss  faiss index over prompt keys
  loo.npy             (M, 2) float32: leave-one-out nearest distances (latent, prompt) of held-back
                      entries, from which jump thresholds are derived

A part (one shard of a build, `kind: part`) has the arrays but no indexes; `merge` joins parts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from effdiff import __version__
from effdiff.artifacts import FileRecord, Manifest, read_json, sha256_file, write_json
from effdiff.errors import EffdiffError
from effdiff.kb.adaptive import DEFAULT_MAX_VALUE_ERROR, DEFAULT_PROMPT_GATE, JumpPolicy, longest_jump
from effdiff.kb.index import IndexInfo, read_index_mmap, search_threads, set_nprobe

if TYPE_CHECKING:
    from effdiff.runtime.propagation import KeySchedule

KB_MANIFEST = "kb.json"
KB_SCHEMA = 1
PARTIAL = ".partial"  # checkpoints of a build in progress
PROMPTS = "prompts.txt"
ENTRIES = "entries.npy"
KEYS = "keys.npy"
VALUES = "values.npy"
PROMPT_KEYS = "prompt_keys.npy"
INDEX = "index.faiss"
PROMPT_INDEX = "prompt_index.faiss"
LOO = "loo.npy"
ARRAYS = (ENTRIES, KEYS, VALUES, PROMPT_KEYS)
# The graphs a KB's trajectories come from, so the ones its tie hashes (not specs.UNET_GRAPHS: the
# cache recipe's graphs may be exported into the folder later without changing a whole-UNet trajectory).
# A KB built on another propagation schedule also ties the graphs that schedule runs
# (`BuildSettings.tied_graphs`).
TIED_GRAPHS = ("unet", "unet_encoder", "unet_decoder")
SPACES = ("latent", "prompt")


@dataclass(frozen=True)
class BuildSettings:
    """How the trajectories of a KB were generated; a query must use the same sampler, steps, guidance.
    `propagation` is the key-step schedule they ran on (`effdiff generate --propagation`: `none`, the
    whole UNet at every step, or e.g. `cache:3`), with noise injection off; a query on another schedule
    is not refused, but its latents at the key step lie farther from the keys (fewer jumps)."""

    sampler: str = "ddim"
    steps: int = 50
    guidance: float = 7.5
    key_step: int = 10
    value_steps: tuple[int, ...] = (20, 25, 30)
    seeds: tuple[int, ...] = (0,)
    negative_prompt: str = ""
    height: int | None = None  # pixels; None: the artifacts' export size
    width: int | None = None
    propagation: str = "none"  # kb.json files written before this field read as "none"

    def check(self) -> None:
        """Step arithmetic, before anything loads; EffdiffError in one line."""
        from effdiff.runtime.pipeline import check_guidance
        from effdiff.runtime.schedulers import sampler_class

        sampler_class(self.sampler)
        check_guidance(self.guidance)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 2:
            raise EffdiffError(f"steps must be an integer >= 2, got {self.steps!r}")
        if not 1 <= self.key_step < self.steps:
            raise EffdiffError(
                f"key step {self.key_step} is out of range for {self.steps} steps: it must be within "
                f"1..{self.steps - 1} (the latent after that many steps is the key)"
            )
        if not self.value_steps:
            raise EffdiffError("give at least one value step")
        if list(self.value_steps) != sorted(set(self.value_steps)):
            raise EffdiffError(f"value steps must be distinct and ascending, got {list(self.value_steps)}")
        if self.value_steps[0] <= self.key_step:
            raise EffdiffError(
                f"value step {self.value_steps[0]} is not after the key step {self.key_step}: a jump "
                "goes forward from the key step"
            )
        if self.value_steps[-1] >= self.steps:
            raise EffdiffError(
                f"value step {self.value_steps[-1]} is out of range for {self.steps} steps "
                f"(it must leave at least one step to run: <= {self.steps - 1})"
            )
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise EffdiffError(f"seeds must be integers >= 0, got {list(self.seeds)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise EffdiffError(f"seeds repeat: {list(self.seeds)}")
        self.schedule.key_steps(self.steps)  # the schedule fits the step count

    @property
    def schedule(self) -> KeySchedule:
        """`propagation` parsed (EffdiffError in one line when it is not a schedule)."""
        from effdiff.runtime.propagation import KeySchedule

        return KeySchedule.parse(self.propagation)

    def tied_graphs(self) -> tuple[str, ...]:
        """The UNet graphs whose files tie a KB of these settings to its artifacts: TIED_GRAPHS (kept for
        every schedule, so a whole-UNet KB's tie is what it always was) and the schedule's own."""
        extra = self.schedule.graphs
        return TIED_GRAPHS + tuple(g for g in extra if g not in TIED_GRAPHS)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["value_steps"] = list(self.value_steps)
        data["seeds"] = list(self.seeds)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BuildSettings:
        return cls(**{**data, "value_steps": tuple(data["value_steps"]), "seeds": tuple(data["seeds"])})


def artifacts_tie(
    manifest: Manifest, precision: str, graphs: tuple[str, ...] = TIED_GRAPHS
) -> dict[str, Any]:
    """What ties a KB to the artifacts that generated it: the source model's content hash and the
    sha256 of the UNet variant files of `graphs` (`BuildSettings.tied_graphs()`), plus one hash over both."""
    unet: dict[str, dict[str, str]] = {}
    for graph in graphs:
        variant = manifest.variants(graph).get(precision)
        if variant is not None:
            unet[f"{graph}.{precision}"] = {name: r.sha256 for name, r in sorted(variant.files.items())}
    digest = hashlib.sha256(json.dumps([manifest.source.content_hash, unet], sort_keys=True).encode())
    return {
        "model": manifest.source.model,
        "source_hash": manifest.source.content_hash,
        "precision": precision,
        "unet_files": unet,
        "hash": digest.hexdigest(),
    }


@dataclass
class KBManifest:
    kind: str  # "kb" (searchable) or "part" (one shard's arrays, to be merged)
    tie: dict[str, Any]
    settings: BuildSettings
    latent_shape: tuple[int, int, int]  # (C, h, w) of a key / value
    prompts_sha256: str
    num_prompts: int
    entries: int
    entry_range: tuple[int, int]  # [start, stop) of the whole build's entries this folder holds
    total_entries: int  # of the whole build (prompts x seeds)
    shard: tuple[int, int] | None = None
    files: dict[str, FileRecord] = field(default_factory=dict)
    index: IndexInfo | None = None
    prompt_index: IndexInfo | None = None
    adaptive: dict[str, Any] = field(default_factory=dict)  # per space: quantiles, thresholds, LOO stats
    build: dict[str, Any] = field(default_factory=dict)  # seconds, UNet steps, checkpoint size
    schema: int = KB_SCHEMA
    effdiff_version: str = __version__

    @property
    def key_dim(self) -> int:
        c, h, w = self.latent_shape
        return c * h * w

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "effdiff_version": self.effdiff_version,
            "kind": self.kind,
            "artifacts": self.tie,
            "settings": self.settings.to_json(),
            "latent_shape": list(self.latent_shape),
            "prompts_sha256": self.prompts_sha256,
            "num_prompts": self.num_prompts,
            "entries": self.entries,
            "entry_range": list(self.entry_range),
            "total_entries": self.total_entries,
            "shard": list(self.shard) if self.shard else None,
            "index": self.index.to_json() if self.index else None,
            "prompt_index": self.prompt_index.to_json() if self.prompt_index else None,
            "adaptive": self.adaptive,
            "build": self.build,
            "files": {n: {"size": r.size, "sha256": r.sha256} for n, r in self.files.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KBManifest:
        return cls(
            kind=data["kind"],
            tie=dict(data["artifacts"]),
            settings=BuildSettings.from_json(data["settings"]),
            latent_shape=tuple(data["latent_shape"]),  # type: ignore[arg-type]
            prompts_sha256=data["prompts_sha256"],
            num_prompts=int(data["num_prompts"]),
            entries=int(data["entries"]),
            entry_range=tuple(data["entry_range"]),  # type: ignore[arg-type]
            total_entries=int(data["total_entries"]),
            shard=tuple(data["shard"]) if data.get("shard") else None,  # type: ignore[arg-type]
            files={n: FileRecord(int(r["size"]), str(r["sha256"])) for n, r in data["files"].items()},
            index=IndexInfo.from_json(data["index"]) if data.get("index") else None,
            prompt_index=IndexInfo.from_json(data["prompt_index"]) if data.get("prompt_index") else None,
            adaptive=dict(data.get("adaptive", {})),
            build=dict(data.get("build", {})),
            schema=int(data["schema"]),
            effdiff_version=str(data["effdiff_version"]),
        )

    @classmethod
    def read(cls, folder: Path) -> KBManifest:
        folder = Path(folder)
        if not folder.is_dir():
            raise EffdiffError(f"knowledge base {str(folder)!r} does not exist or is not a folder")
        path = folder / KB_MANIFEST
        if not path.exists():
            if (folder / PARTIAL).exists():
                why = "its build has not finished (run the same build again with --resume)"
            else:
                why = "it is not a knowledge base"
            raise EffdiffError(f"{path} is missing: {why}")
        data = read_json(path, "rebuild the knowledge base")
        if data.get("schema") != KB_SCHEMA:
            raise EffdiffError(
                f"{path} has schema {data.get('schema')!r}; this effdiff reads {KB_SCHEMA}: rebuild it"
            )
        try:
            return cls.from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise EffdiffError(f"{path} is malformed ({type(exc).__name__}: {exc}); rebuild it") from None

    def write(self, folder: Path) -> None:
        write_json(Path(folder) / KB_MANIFEST, self.to_json())


def check_kb_files(folder: Path, files: dict[str, FileRecord], checksum: bool = True) -> None:
    """Every recorded file exists with its size and (unless `checksum` is off) its sha256."""
    for name, record in files.items():
        path = Path(folder) / name
        if not path.is_file():
            raise EffdiffError(f"{path} is missing from the knowledge base; rebuild it")
        if path.stat().st_size != record.size:
            raise EffdiffError(
                f"{path} has {path.stat().st_size} bytes, kb.json says {record.size}: it was changed or "
                "truncated; rebuild the knowledge base"
            )
        if checksum and sha256_file(path) != record.sha256:
            raise EffdiffError(f"{path} fails its sha256 check (corrupted); rebuild the knowledge base")


def record_files(folder: Path, names: list[str]) -> dict[str, FileRecord]:
    return {name: FileRecord.of(Path(folder) / name) for name in names}


@dataclass
class Neighbours:
    """Per query row, the nearest entries after exact re-ranking, nearest first."""

    ids: np.ndarray  # (B, k) int64; -1 where fewer than k were found
    distances: np.ndarray  # (B, k) float32, exact L2 (not squared); inf where no entry


def _prompt_space(space: str) -> bool:
    if space not in SPACES:
        raise EffdiffError(f"search space must be 'latent' or 'prompt', got {space!r}")
    return space == "prompt"


class KnowledgeBase:
    """An opened KB: arrays memory-mapped, indexes memory-mapped read-only. `open` checks it."""

    def __init__(self, folder: Path, manifest: KBManifest) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.settings = manifest.settings
        self.keys = np.load(self.folder / KEYS, mmap_mode="r")
        self.values = np.load(self.folder / VALUES, mmap_mode="r")
        self.prompt_keys = np.load(self.folder / PROMPT_KEYS, mmap_mode="r")
        self.entries = np.load(self.folder / ENTRIES, mmap_mode="r")
        self.index = read_index_mmap(self.folder / INDEX)
        self.prompt_index = read_index_mmap(self.folder / PROMPT_INDEX)
        assert manifest.index is not None and manifest.prompt_index is not None
        set_nprobe(self.index, manifest.index.nprobe)
        set_nprobe(self.prompt_index, manifest.prompt_index.nprobe)
        self.shortlist = manifest.index.shortlist
        loo = self.folder / LOO
        self.loo = np.load(loo) if loo.exists() else np.zeros((0, 2), np.float32)  # absent while building

    @classmethod
    def open(cls, folder: str | Path, checksum: bool = True) -> KnowledgeBase:
        """Read kb.json, check every file (size; sha256 unless `checksum=False`), map the arrays."""
        folder = Path(folder)
        manifest = KBManifest.read(folder)
        if manifest.kind != "kb":
            part = "/".join(map(str, manifest.shard or ()))
            raise EffdiffError(
                f"{folder} is part {part} of a sharded build, not a searchable knowledge base; "
                "join the parts with `effdiff kb merge`"
            )
        check_kb_files(folder, manifest.files, checksum)
        return cls(folder, manifest)

    def __len__(self) -> int:
        return self.manifest.entries

    @property
    def value_steps(self) -> tuple[int, ...]:
        return self.settings.value_steps

    def prompts(self) -> list[str]:
        return (self.folder / PROMPTS).read_text().split("\n")[: self.manifest.num_prompts]

    # ------------------------------------------------------------ compatibility

    def check_compatible(
        self,
        manifest: Manifest,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        latent_shape: tuple[int, ...] | None = None,
    ) -> None:
        """EffdiffError in one line when these artifacts or this run are not what the KB was built for."""
        tie = self.manifest.tie
        if manifest.source.content_hash != tie["source_hash"]:
            raise EffdiffError(
                f"knowledge base {self.folder} was built for other artifacts (model {tie['model']!r}, "
                f"source hash {tie['source_hash'][:12]}); these hold {manifest.source.model!r} "
                f"({manifest.source.content_hash[:12]})"
            )
        for key, files in tie["unet_files"].items():
            graph, precision = key.split(".", 1)
            variant = manifest.variants(graph).get(precision)
            now = {n: r.sha256 for n, r in sorted(variant.files.items())} if variant else None
            if now != files:
                raise EffdiffError(
                    f"knowledge base {self.folder} was built with another {graph} {precision} graph than "
                    "these artifacts hold (re-exported since?); rebuild the knowledge base"
                )
        s = self.settings
        for name, want, got in (("sampler", s.sampler, sampler), ("steps", s.steps, steps)):
            if got is not None and got != want:
                raise EffdiffError(
                    f"knowledge base {self.folder} holds {s.sampler} {s.steps}-step trajectories; "
                    f"this run asks for {name} {got}"
                )
        if guidance is not None and float(guidance) != float(s.guidance):
            raise EffdiffError(
                f"knowledge base {self.folder} was built at guidance {s.guidance:g}; this run asks for "
                f"{guidance:g}"
            )
        if latent_shape is not None and tuple(latent_shape) != tuple(self.manifest.latent_shape):
            raise EffdiffError(
                f"knowledge base {self.folder} holds latents of shape {tuple(self.manifest.latent_shape)}; "
                f"this run's are {tuple(latent_shape)} (another image size)"
            )

    # ------------------------------------------------------------ search

    def policy(
        self,
        space: str = "latent",
        quantiles: tuple[float, ...] | None = None,
        prompt_gate: float | None = DEFAULT_PROMPT_GATE,
        max_error: float | None = DEFAULT_MAX_VALUE_ERROR,
        combine: str = "lstsq",
    ) -> JumpPolicy:
        """The jump thresholds recorded at build time, or ones derived now from other quantiles; in
        latent space with the prompt gate at quantile `prompt_gate` (None: no gate) and no jump past
        the last value step whose leave-one-out value error for `combine` is within `max_error`
        (None: no cap)."""
        prompt = _prompt_space(space)
        q = tuple(self.manifest.adaptive[space]["quantiles"]) if quantiles is None else tuple(quantiles)
        policy = JumpPolicy.from_distances(self.loo[:, 1 if prompt else 0], self.value_steps, q)
        if prompt:
            return policy
        errors = self.manifest.adaptive.get("latent", {}).get("value_rel_error", {})
        cap = longest_jump(errors, self.value_steps, combine, max_error)
        reason = f"value error cap {max_error:g}, {combine}" if cap is not None else ""
        return policy.gated(self.loo[:, 1], prompt_gate).capped(cap, reason)

    def search(
        self,
        queries: np.ndarray,
        k: int = 1,
        space: str = "latent",
        shortlist: int | None = None,
        exclude: list[np.ndarray] | None = None,
        rerank: bool = True,
    ) -> Neighbours:
        """The k nearest entries of each query row: a short list from the compressed index, re-ranked
        exactly from the float16 keys on disk. `exclude[row]` lists entry ids to leave out of that row's
        answer (leave-one-out evaluation); `rerank=False` keeps the index's own order and distances."""
        prompt = _prompt_space(space)
        index = self.prompt_index if prompt else self.index
        keys = self.prompt_keys if prompt else self.keys
        q = np.ascontiguousarray(np.asarray(queries, np.float32).reshape(len(queries), -1))
        if q.shape[1] != keys.shape[1]:
            raise EffdiffError(
                f"queries have {q.shape[1]} dimensions; this KB's {space} keys have {keys.shape[1]}"
            )
        n_ex = 0 if exclude is None else max((len(e) for e in exclude), default=0)
        want = min(len(self), max(k, shortlist or self.shortlist) + n_ex)
        with search_threads(len(q)):
            approx_d, cand = index.search(q, want)
        ids = np.full((len(q), k), -1, np.int64)
        dist = np.full((len(q), k), np.inf, np.float32)
        for row in range(len(q)):
            keep = cand[row] >= 0
            if exclude is not None:
                keep &= ~np.isin(cand[row], exclude[row])
            c = cand[row][keep]
            if rerank:
                order = np.argsort(c)  # ascending ids read the memory map in file order
                c = c[order]
                d = np.linalg.norm(np.asarray(keys[c], np.float32) - q[row], axis=1)
            else:
                d = np.sqrt(np.maximum(approx_d[row][keep], 0))
            best = np.argsort(d, kind="stable")[:k]
            ids[row, : len(best)] = c[best]
            dist[row, : len(best)] = d[best]
        return Neighbours(ids, dist)

    def exact_search(
        self,
        queries: np.ndarray,
        k: int = 1,
        space: str = "latent",
        exclude: list[np.ndarray] | None = None,
    ) -> Neighbours:
        """Brute force over every float16 key, in float64 and in blocks of about 128 MiB: the ground
        truth `search` is measured against."""
        keys = self.prompt_keys if _prompt_space(space) else self.keys
        q = np.asarray(queries, np.float64).reshape(len(queries), -1)
        block = max(1, 2**24 // q.shape[1])
        best_d = np.full((len(q), 0), np.inf, np.float64)
        best_i = np.zeros((len(q), 0), np.int64)
        qq = (q**2).sum(1, keepdims=True)
        for start in range(0, len(keys), block):
            chunk = np.asarray(keys[start : start + block], np.float64)
            d2 = qq - 2 * q @ chunk.T + (chunk**2).sum(1)[None]
            if exclude is not None:
                for row, ex in enumerate(exclude):
                    hit = ex[(ex >= start) & (ex < start + len(chunk))]
                    d2[row, hit - start] = np.inf
            ids = np.broadcast_to(np.arange(start, start + len(chunk)), d2.shape)
            all_d = np.concatenate([best_d, d2], 1)
            all_i = np.concatenate([best_i, ids], 1)
            top = np.argsort(all_d, 1, kind="stable")[:, :k]
            best_d = np.take_along_axis(all_d, top, 1)
            best_i = np.take_along_axis(all_i, top, 1)
        # distances of the winners computed directly, not through the expansion above
        exact = [
            np.linalg.norm(np.asarray(keys[i], np.float64) - row, axis=1)
            for i, row in zip(best_i, q, strict=True)
        ]
        return Neighbours(best_i, np.array(exact, np.float32))

    def blend(
        self,
        query: np.ndarray,
        ids: np.ndarray,
        value_step: int,
        combine: str = "lstsq",
        space: str = "latent",
    ) -> np.ndarray:
        """The value at `value_step` for one query from its neighbours `ids` (nearest first):
        `nearest` takes the first; `lstsq` is ReDi's blend, the weights w minimising
        ||sum_i w_i key_i - query|| applied to the neighbours' values. Returns (D,) float32."""
        j = self.value_steps.index(value_step)
        ids = np.asarray(ids)[np.asarray(ids) >= 0]
        if combine == "nearest" or len(ids) == 1:
            return np.asarray(self.values[ids[0], j], np.float32)
        if combine != "lstsq":
            raise EffdiffError(f"combine must be 'nearest' or 'lstsq', got {combine!r}")
        keys = self.prompt_keys if _prompt_space(space) else self.keys
        ids = np.sort(ids)
        basis = np.asarray(keys[ids], np.float64)  # (k, D)
        w, *_ = np.linalg.lstsq(basis.T, np.asarray(query, np.float64).ravel(), rcond=None)
        vals = np.asarray(self.values[ids, j], np.float64)  # (k, D)
        return (w @ vals).astype(np.float32)
