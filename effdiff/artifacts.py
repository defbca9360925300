"""The artifacts folder: one place that names its files, writes them atomically and reads the manifest."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from effdiff import __version__
from effdiff.errors import EffdiffError
from effdiff.specs import GRAPHS, Geometry, GraphSpec, build_specs

# Bumped when the manifest or a graph interface changes in a way older runtimes cannot read.
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SCHEDULER_CONFIG = "scheduler_config.json"


def graph_path(artifacts: Path, graph: str) -> Path:
    if graph not in GRAPHS:
        raise ValueError(f"unknown graph {graph!r}")
    return artifacts / f"{graph}.onnx"


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


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_manifest(artifacts: Path, manifest: dict[str, Any]) -> None:
    write_json(artifacts / MANIFEST, manifest)


def new_manifest() -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "effdiff_version": __version__, "graphs": {}}


def read_json(path: Path, fix: str = "") -> dict[str, Any]:
    """A JSON object from `path`; EffdiffError naming the file (and `fix`, if given) when absent or broken."""
    hint = f"; {fix}" if fix else ""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EffdiffError(f"{path} is missing{hint}") from None
    except json.JSONDecodeError as exc:
        raise EffdiffError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}){hint}") from None
    if not isinstance(data, dict):
        raise EffdiffError(f"{path} holds a JSON {type(data).__name__}, not an object{hint}")
    return data


def read_manifest(artifacts: Path) -> dict[str, Any]:
    """Read and check a manifest; EffdiffError with a fix when missing or from an incompatible version."""
    path = Path(artifacts) / MANIFEST
    if not Path(artifacts).is_dir():
        raise EffdiffError(
            f"artifacts folder {str(artifacts)!r} does not exist; run `effdiff-export onnx` first"
        )
    if not path.exists():
        raise EffdiffError(f"{path} is missing: {artifacts} is not an effdiff artifacts folder")
    manifest = read_json(path, "re-run the export")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise EffdiffError(
            f"{path} has schema version {version!r} (written by effdiff {manifest.get('effdiff_version')}); "
            f"this effdiff {__version__} reads version {SCHEMA_VERSION}: re-export the model"
        )
    return manifest


def manifest_specs(manifest: dict[str, Any]) -> dict[str, GraphSpec]:
    """The graph specs the artifacts were exported with."""
    geom = Geometry.from_json(manifest["geometry"])
    return build_specs(geom, manifest["recipe"]["float_dtype"], manifest["tokenizer"]["vocab_size"])


def check_complete(artifacts: Path, manifest: dict[str, Any], graphs: tuple[str, ...]) -> None:
    """Refuse artifacts whose graphs are missing or whose files differ from what the manifest records."""
    for graph in graphs:
        record = manifest.get("graphs", {}).get(graph)
        if record is None:
            raise EffdiffError(f"{artifacts} has no {graph} graph in its manifest; the export did not finish")
        for name, size in record["files"].items():
            file = artifacts / name
            if not file.exists():
                raise EffdiffError(f"{file} is missing; re-run the export")
            if file.stat().st_size != size:
                raise EffdiffError(f"{file} has {file.stat().st_size} bytes, manifest says {size}; re-export")
