"""Shared fixtures: each tiny model is exported once per test session and reused by every test."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built-in models are cached here, not in the user's home, so tests start clean."""
    path = tmp_path_factory.mktemp("effdiff-cache")
    os.environ["EFFDIFF_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def sd1_folder(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sd1 as a diffusers folder, its tokenizer as vocab.json + merges.txt (the real SD1.5 layout)."""
    from effdiff.export.models import save_builtin
    from effdiff.export.vocab import write_vocab_files

    folder = save_builtin("tiny-sd1", tmp_path_factory.mktemp("models") / "tiny-sd1-folder")
    tok = folder / "tokenizer"
    config = (tok / "tokenizer_config.json").read_text()
    shutil.rmtree(tok)
    write_vocab_files(tok)
    (tok / "tokenizer_config.json").write_text(config)
    return folder


@pytest.fixture(scope="session")
def sd1_artifacts(sd1_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sd1 exported from a folder path."""
    from effdiff.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("artifacts") / "tiny-sd1"
    export_onnx(str(sd1_folder), out, progress=False)
    return out


@pytest.fixture(scope="session")
def sd2_artifacts(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sd2 exported by its built-in name."""
    from effdiff.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("artifacts") / "tiny-sd2"
    export_onnx("tiny-sd2", out, progress=False)
    return out


@pytest.fixture(params=["sd1", "sd2"])
def artifacts(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"{request.param}_artifacts")


@pytest.fixture(scope="session")
def reference_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped reference model, exported once."""
    from effdiff.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("artifacts") / "reference"
    export_onnx("reference", out, progress=False)
    return out
