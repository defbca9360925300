"""The artifacts folder: the typed manifest, the one function that names files, atomic writes.

Layout of a folder (schema 2):
  manifest.json                     this file's `Manifest`, written last by every writer
  tokenizer/tokenizer.json          scheduler_config.json
  GRAPH.onnx                        the fp32 variant of each graph (GRAPH.onnx.data beside big ones)
  GRAPH.VARIANT.onnx                other variants: GRAPH.fp16.onnx, GRAPH.int8.onnx ...
Every file the runtime relies on is recorded with its size and sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from effdiff import __version__
from effdiff.compare import Comparison
from effdiff.errors import EffdiffError, FolderBusy
from effdiff.specs import GRAPHS, UNET_GRAPHS, Geometry, GraphSpec, Precision, build_specs

# Bumped when the manifest or a graph interface changes in a way older runtimes cannot read.
# 2: graph variants with checksums; the decoder takes `rows` = steps x batch timesteps.
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = f"{TOKENIZER_DIR}/tokenizer.json"
SCHEDULER_CONFIG = "scheduler_config.json"
REEXPORT = "re-export it with `effdiff-export onnx --model MODEL --out {folder}`"


def variant_file(graph: str, variant: str, suffix: str = ".onnx") -> str:
    """File name of a graph variant: `unet.onnx` for fp32 ONNX, `unet.int8.onnx` and so on otherwise."""
    if graph not in GRAPHS:
        raise ValueError(f"unknown graph {graph!r}")
    return f"{graph}{suffix}" if variant == Precision.FP32.value else f"{graph}.{variant}{suffix}"


def variant_name(precision: Precision | str, fmt: str = "onnx", tag: str = "") -> str:
    """A variant's key in its graph's `variants`: the precision for ONNX graphs ("fp16"), and
    FORMAT-PRECISION[-TAG] for engines and packages ("trt-fp16", "coreml-fp16", "coreml-fp16-pal6")."""
    value = Precision.parse(precision).value
    name = value if fmt == "onnx" else f"{fmt}-{value}"
    return f"{name}-{tag}" if tag else name


# The tag of ONNX variants whose weights are stored fp16 and computed in fp32 ("fp32-w16", written by
# `effdiff-export fp16-weights`): what a CPU holds in half the memory (effdiff.export.weights).
W16_TAG = "w16"


# ---------------------------------------------------------------- atomic writes and hashes


def check_writable_folder(folder: Path) -> Path:
    """Create `folder` if needed and prove it writable, before any work that would write there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise EffdiffError(f"cannot write to {folder}: {exc.strerror}") from None
    return folder


def check_writable_file(path: Path, suffix: str | None = None) -> Path:
    """Fail before the work, not after it, when a file cannot be written where the user asked."""
    path = Path(path)
    if suffix is not None and path.suffix.lower() != suffix:
        raise EffdiffError(f"{path} must be a {suffix} file")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise EffdiffError(f"cannot write {path}: folder {parent} does not exist")
    if path.is_dir():
        raise EffdiffError(f"cannot write {path}: it is a folder")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise EffdiffError(f"cannot write {path}: permission denied")
    return path


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; artifacts are ordinary files
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files and folders a killed writer left (`.tmp-*` folders, `.NAME.*.tmp` files). Call
    only while holding the folder's lock: then no live writer owns them."""
    for stale in [*Path(folder).glob(".tmp-*"), *Path(folder).glob(".*.tmp")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, fix: str = "") -> dict[str, Any]:
    """A JSON object from `path`; EffdiffError naming the file (and `fix`, if given) when absent or broken."""
    hint = f"; {fix}" if fix else ""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EffdiffError(f"{path} is missing{hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" ({exc.msg} at line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise EffdiffError(f"{path} is not valid JSON{where}{hint}") from None
    except OSError as exc:
        raise EffdiffError(f"cannot read {path}: {exc.strerror}{hint}") from None
    if not isinstance(data, dict):
        raise EffdiffError(f"{path} holds a JSON {type(data).__name__}, not an object{hint}")
    return data


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> FileRecord:
        return cls(Path(path).stat().st_size, sha256_file(path))


def files_in_place(folder: Path, records: Mapping[str, FileRecord]) -> bool:
    """Whether every recorded file is in `folder` at its recorded size (a cheap check, no hashing:
    what a resumed job relies on before keeping what an earlier run made)."""
    return all(
        (Path(folder) / n).is_file() and (Path(folder) / n).stat().st_size == r.size
        for n, r in records.items()
    )


def move_into_place(
    files: list[Path], folder: Path, graph_file: str, replaced: Mapping[str, FileRecord] | None = None
) -> dict[str, FileRecord]:
    """Move a variant's files, written in a temporary folder inside `folder`, into place: data first and
    the graph last, so a run killed in between leaves no graph that looks complete; then remove the
    files of the variant it replaces that it no longer uses. Returns the files' records."""
    records: dict[str, FileRecord] = {}
    for f in sorted(files, key=lambda p: p.name == graph_file):
        records[f.name] = FileRecord.of(f)
        os.replace(f, Path(folder) / f.name)
    for stale in set(replaced or {}) - set(records):
        (Path(folder) / stale).unlink(missing_ok=True)
    return records


def _files_json(files: dict[str, FileRecord]) -> dict[str, Any]:
    return {name: {"size": r.size, "sha256": r.sha256} for name, r in files.items()}


def _files_from(data: dict[str, Any]) -> dict[str, FileRecord]:
    return {name: FileRecord(int(r["size"]), str(r["sha256"])) for name, r in data.items()}


# ---------------------------------------------------------------- the manifest


@dataclass
class Variant:
    """One way to run a graph: an fp32/fp16/int8 ONNX file, later a TensorRT engine or CoreML package."""

    name: str  # key in its graph's `variants`: "fp32", "fp16", "int8", ...
    precision: Precision
    file: str  # the file a backend opens
    files: dict[str, FileRecord]  # every file it relies on (the graph and its external data)
    format: str = "onnx"
    validation: list[Comparison] = field(default_factory=list)
    recipe_key: str = ""  # what produced it; an export or quantization with the same key reuses it
    stats: dict[str, float] = field(default_factory=dict)  # seconds, peak RSS of its creation
    meta: dict[str, Any] = field(default_factory=dict)  # format-specific (calibration, engine target)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.validation)

    @property
    def float_dtype(self) -> str:
        return self.precision.float_dtype

    @property
    def size_bytes(self) -> int:
        return sum(r.size for r in self.files.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "precision": self.precision.value,
            "format": self.format,
            "file": self.file,
            "files": _files_json(self.files),
            "passed": self.passed,
            "validation": [c.to_json() for c in self.validation],
            "recipe_key": self.recipe_key,
            "stats": self.stats,
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> Variant:
        return cls(
            name=name,
            precision=Precision(data["precision"]),
            file=data["file"],
            files=_files_from(data["files"]),
            format=data.get("format", "onnx"),
            validation=[Comparison.from_json(c) for c in data.get("validation", [])],
            recipe_key=data.get("recipe_key", ""),
            stats=dict(data.get("stats", {})),
            meta=dict(data.get("meta", {})),
        )


@dataclass(frozen=True)
class TokenizerInfo:
    file: str
    max_length: int
    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int


@dataclass(frozen=True)
class SourceInfo:
    model: str  # what the user passed: a folder or a built-in name
    path: str
    content_hash: str


@dataclass
class Manifest:
    """What an artifacts folder holds and how it was made. `Manifest.read` checks the schema."""

    source: SourceInfo
    family: str
    prediction_type: str
    geometry: Geometry
    export_size: tuple[int, int]  # latent (height, width) the graphs were validated at
    tokenizer: TokenizerInfo
    recipe: dict[str, Any]  # opset and validation size of the export
    support_files: dict[str, FileRecord] = field(default_factory=dict)  # tokenizer, scheduler config
    graphs: dict[str, dict[str, Variant]] = field(default_factory=dict)  # graph -> variant name -> Variant
    chain_validation: dict[str, list[Comparison]] = field(default_factory=dict)  # float variant -> checks
    schema_version: int = SCHEMA_VERSION
    effdiff_version: str = __version__

    # ------------------------------------------------------------ queries

    @property
    def passed(self) -> bool:
        variants = all(v.passed for vs in self.graphs.values() for v in vs.values())
        return variants and all(c.passed for cs in self.chain_validation.values() for c in cs)

    @property
    def is_reference(self) -> bool:
        return self.source.model == "reference"

    def specs(self, precision: Precision | str = Precision.FP32) -> dict[str, GraphSpec]:
        """The graph specs at a precision's float dtype (INT8 graphs keep float32 inputs and outputs)."""
        dtype = Precision.parse(precision).float_dtype
        return build_specs(self.geometry, dtype, self.tokenizer.vocab_size)

    def spec(self, graph: str, variant: Variant) -> GraphSpec:
        """The spec a variant runs with; its meta says "quantized" for INT8 graphs and "fp16_weights"
        when float weights are stored fp16 (INT8 graphs' float layers, `fp32-w16` variants), which a
        backend's options may key on (weight pre-packing, keeping fp16 weights fp16)."""
        spec = self.specs(variant.precision)[graph]
        meta = {
            **({"quantized": True} if variant.precision is Precision.INT8 else {}),
            **({"fp16_weights": True} if variant.meta.get("float_weights") == "fp16" else {}),
        }
        return replace(spec, meta={**spec.meta, **meta}) if meta else spec

    def variants(self, graph: str) -> dict[str, Variant]:
        return self.graphs.get(graph, {})

    def variant(self, graph: str, name: str) -> Variant:
        """A graph's variant by name; EffdiffError naming what exists and how to make it when absent."""
        found = self.variants(graph)
        if name in found:
            return found[name]
        have = ", ".join(found) or "none"
        how = {
            "int8": "run `effdiff-export int8 --artifacts DIR`",
            "fp16": "run `effdiff-export onnx --precision fp16` into this folder",
            variant_name(
                Precision.FP32, "onnx", W16_TAG
            ): "run `effdiff-export fp16-weights --artifacts DIR`",
        }.get(name, "re-run the export")
        fmt, _, rest = name.partition("-")
        precision, _, tag = rest.partition("-")
        if fmt in ("trt", "coreml") and precision:
            how = f"run `effdiff-export {fmt} --artifacts DIR --precision {precision}`"
            if tag.startswith("pal"):
                how = how[:-1] + f" --palettize {tag[3:]}`"
        raise EffdiffError(f"{graph} has no {name} variant in this folder (it has: {have}); {how}")

    def find(
        self, graph: str, precision: Precision | str, fmt: str = "onnx", tag: str = ""
    ) -> Variant | None:
        """The variant of format `fmt` a pipeline at `precision` runs for `graph`: the same precision
        when the folder has it; else, for graphs that have no INT8 form (text encoder, VAE), the best
        float variant. With the fp16-weights tag (W16_TAG) an INT8 UNet graph is the plain INT8 one: its
        float layers' storage is its own (meta "float_weights")."""
        want = Precision.parse(precision)
        found = self.variants(graph)
        if tag == W16_TAG and want is Precision.INT8 and graph in UNET_GRAPHS:
            tag = ""
        if variant_name(want, fmt, tag) in found:
            return found[variant_name(want, fmt, tag)]
        if want is Precision.INT8 and graph not in UNET_GRAPHS:
            for fallback in (Precision.FP32, Precision.FP16):
                if variant_name(fallback, fmt, tag) in found:
                    return found[variant_name(fallback, fmt, tag)]
        return None

    def choose(self, graph: str, precision: Precision | str, fmt: str = "onnx", tag: str = "") -> Variant:
        """`find`, or EffdiffError naming the variants the folder has and how to make the missing one."""
        return self.find(graph, precision, fmt, tag) or self.variant(graph, variant_name(precision, fmt, tag))

    def default_precision(self, fmt: str = "onnx") -> Precision:
        """ONNX: fp32 when every graph has it, else fp16 (an fp16-only export). Engines and packages:
        the first of fp32, fp16, int8 that every graph with a variant of that format has."""
        if fmt == "onnx":
            fp32 = all(Precision.FP32.value in self.variants(g) for g in GRAPHS if g in self.graphs)
            return Precision.FP32 if fp32 else Precision.FP16
        graphs = [g for g in GRAPHS if any(v.format == fmt for v in self.variants(g).values())]
        for precision in Precision:
            if graphs and all(self.find(g, precision, fmt) for g in graphs):
                return precision
        return Precision.FP16  # nothing of that format: `choose` then names what to build

    # ------------------------------------------------------------ JSON

    def to_json(self) -> dict[str, Any]:
        geom = self.geometry
        skip_layout = [
            {"name": f"skip_{i:02d}", "channels": c, "downsample": 2**lv}
            for i, (c, lv) in enumerate(geom.skips)
        ]
        specs = self.specs()
        return {
            "schema_version": self.schema_version,
            "effdiff_version": self.effdiff_version,
            "source": vars(self.source),
            "family": self.family,
            "prediction_type": self.prediction_type,
            "recipe": self.recipe,
            "geometry": geom.to_json(),
            "export_size": {"latent_height": self.export_size[0], "latent_width": self.export_size[1]},
            "tokenizer": vars(self.tokenizer),
            "scheduler_config": SCHEDULER_CONFIG,
            "support_files": _files_json(self.support_files),
            "skip_layout": skip_layout,
            "graphs": {
                g: {
                    "io": specs[g].to_json(),
                    "dynamic_axes": {
                        k: {str(i): n for i, n in v.items()} for k, v in specs[g].dynamic_axes().items()
                    },
                    "variants": {name: v.to_json() for name, v in vs.items()},
                }
                for g, vs in self.graphs.items()
            },
            "chain_validation": {k: [c.to_json() for c in cs] for k, cs in self.chain_validation.items()},
            "passed": self.passed,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        size = data["export_size"]
        return cls(
            source=SourceInfo(**data["source"]),
            family=data["family"],
            prediction_type=data["prediction_type"],
            geometry=Geometry.from_json(data["geometry"]),
            export_size=(int(size["latent_height"]), int(size["latent_width"])),
            tokenizer=TokenizerInfo(**data["tokenizer"]),
            recipe=dict(data["recipe"]),
            support_files=_files_from(data.get("support_files", {})),
            graphs={
                g: {name: Variant.from_json(name, v) for name, v in rec["variants"].items()}
                for g, rec in data["graphs"].items()
            },
            chain_validation={
                k: [Comparison.from_json(c) for c in cs] for k, cs in data.get("chain_validation", {}).items()
            },
            schema_version=int(data["schema_version"]),
            effdiff_version=str(data["effdiff_version"]),
        )

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """Read and check a folder's manifest; EffdiffError with the fix when absent, broken or too old."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not folder.exists():
            raise EffdiffError(
                f"artifacts folder {str(folder)!r} does not exist; run `effdiff-export onnx` first"
            )
        if not folder.is_dir():
            raise EffdiffError(f"{folder} is a file, not an artifacts folder")
        if not path.exists():
            raise EffdiffError(
                f"{path} is missing: {folder} is not an effdiff artifacts folder (or an export "
                "into it did not finish)"
            )
        data = read_json(path, REEXPORT.format(folder=folder))
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise EffdiffError(
                f"{path} has schema version {version!r} (written by effdiff {data.get('effdiff_version')}); "
                f"this effdiff {__version__} reads version {SCHEMA_VERSION}: {REEXPORT.format(folder=folder)}"
            )
        try:
            return cls.from_json(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            fix = REEXPORT.format(folder=folder)
            raise EffdiffError(
                f"{path} is incomplete or malformed ({type(exc).__name__}: {exc}); {fix}"
            ) from None

    def write(self, folder: Path) -> None:
        write_json(Path(folder) / MANIFEST, self.to_json())


# ---------------------------------------------------------------- integrity

# Which files were last hashed and found whole, keyed by what `stat` says of them then. A file whose
# size, mtime, ctime and inode are unchanged since is trusted without hashing it again; any write to
# it (even in place, keeping its size) or a copy of the folder changes ctime, so it is hashed again
# before use. ctime cannot be set back by a user; a deliberate forger with root can, which is out of
# scope (`effdiff verify` and `verify=True` always hash).
STAMP_FILE = ".effdiff-verified.json"


@dataclass
class FileCheck:
    name: str
    size: int
    ok: bool
    hashed: bool  # False: trusted from the stamp of an earlier verification
    problem: str = ""
    seconds: float = 0.0


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _stamp_path(folder: Path) -> Path:
    """In the folder when it is writable, else in the user's cache (a read-only install)."""
    folder = Path(folder).resolve()
    if os.access(folder, os.W_OK):
        return folder / STAMP_FILE
    cache = Path(os.environ.get("EFFDIFF_CACHE", Path.home() / ".cache" / "effdiff")) / "verified"
    return cache / (hashlib.sha256(str(folder).encode()).hexdigest()[:24] + ".json")


def _read_stamp(folder: Path) -> dict[str, list[Any]]:
    try:
        data = json.loads(_stamp_path(folder).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_stamp(folder: Path, stamp: dict[str, list[Any]]) -> None:
    with contextlib.suppress(OSError):  # best effort: an unwritable cache only costs a re-hash next time
        write_json(_stamp_path(folder), stamp)


def mark_verified(folder: Path, records: dict[str, FileRecord]) -> None:
    """Record files just written and hashed (by an export) as verified, so the first load trusts them."""
    stamp = _read_stamp(folder)
    for name, record in records.items():
        stamp[name] = [record.sha256, *_stat_key(Path(folder) / name)]
    _write_stamp(folder, stamp)


def verify_files(folder: Path, records: dict[str, FileRecord], full: bool = False) -> list[FileCheck]:
    """Check each file against its record: existence and size always; sha256 when `full`, or when the
    file changed since it was last verified. Never raises for a bad file: see `check_files`."""
    import time

    folder = Path(folder)
    stamp = _read_stamp(folder)
    checks, changed = [], False
    for name, record in records.items():
        path = folder / name
        if not path.is_file():
            checks.append(FileCheck(name, record.size, False, False, "is missing"))
            continue
        key = _stat_key(path)
        if key[0] != record.size:
            problem = f"has {key[0]} bytes, the manifest says {record.size}"
            checks.append(FileCheck(name, record.size, False, False, problem))
            continue
        if not full and stamp.get(name) == [record.sha256, *key]:
            checks.append(FileCheck(name, record.size, True, False))
            continue
        start = time.perf_counter()
        digest = sha256_file(path)
        ok = digest == record.sha256
        problem = (
            ""
            if ok
            else f"does not match its sha256 in the manifest ({digest[:12]}... != {record.sha256[:12]}...)"
        )
        checks.append(FileCheck(name, record.size, ok, True, problem, time.perf_counter() - start))
        if ok:
            stamp[name], changed = [digest, *key], True
    if changed:
        _write_stamp(folder, stamp)
    return checks


def check_files(folder: Path, records: dict[str, FileRecord], full: bool = False) -> None:
    """What every load does before using files: `verify_files`, and the first problem as EffdiffError
    naming the file (a missing file, a wrong size, content that no longer matches its checksum)."""
    for check in verify_files(folder, records, full):
        if not check.ok:
            file = Path(folder) / check.name
            raise EffdiffError(
                f"{file} {check.problem}; it was changed, truncated or corrupted after the export: "
                f"{REEXPORT.format(folder=folder)}"
            )


LOCK_FILE = ".effdiff.lock"


@contextlib.contextmanager
def folder_lock(folder: Path, what: str = "an export") -> Iterator[None]:
    """An exclusive lock on a folder for one writer (filelock: an OS-level lock the kernel releases when
    the process dies, so a SIGKILLed writer never leaves the folder locked). A second writer fails at
    once with a clear message rather than interleaving its files with the first one's."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    lock = FileLock(str(folder / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FolderBusy(
            f"{folder} is being written by another effdiff process ({what} or a quantization); "
            "wait for it to finish or choose another folder"
        ) from None
    try:
        yield
    finally:
        lock.release()


@dataclass
class VerifyReport:
    folder: Path
    checks: list[FileCheck]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def table(self) -> str:
        lines = [f"{'file':<36} {'MiB':>9} {'sha256':>8}  {'s':>6}  result", "-" * 72]
        for c in self.checks:
            how, result = "hashed" if c.hashed else "-", "ok" if c.ok else c.problem
            lines.append(f"{c.name:<36} {c.size / 2**20:>9.1f} {how:>8}  {c.seconds:>6.2f}  {result}")
        size = sum(c.size for c in self.checks) / 2**20
        bad = sum(not c.ok for c in self.checks)
        lines.append(
            f"{len(self.checks)} files, {size:.0f} MiB, {self.seconds:.2f} s: "
            + ("all match the manifest" if not bad else f"{bad} do NOT match the manifest")
        )
        return "\n".join(lines)


def verify_artifacts(folder: Path, full: bool = True) -> VerifyReport:
    """Every file the manifest relies on (support files, every variant of every graph), hashed."""
    import time

    start = time.perf_counter()
    manifest = Manifest.read(folder)
    records = dict(manifest.support_files)
    for variants in manifest.graphs.values():
        for variant in variants.values():
            records.update(variant.files)
    checks = verify_files(folder, records, full)
    return VerifyReport(Path(folder), checks, time.perf_counter() - start)
