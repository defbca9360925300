"""The CLI as a user runs it: help for every command, and bad input as one line with a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "cmd",
    [
        ["effdiff", "--help"],
        ["effdiff-export", "--help"],
        ["effdiff-export", "onnx", "--help"],
        ["effdiff-export", "int8", "--help"],
        ["effdiff", "export", "onnx", "--help"],
    ],
)
def test_help(cmd: list[str]) -> None:
    proc = run(*cmd)
    assert proc.returncode == 0 and "Usage:" in proc.stdout, proc.stderr


def test_export_bad_inputs(tmp_path: Path) -> None:
    assert_one_line_error(
        run("effdiff-export", "onnx", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")),
        "does not exist",
    )
    assert_one_line_error(
        run("effdiff-export", "onnx", "--model", str(tmp_path), "--out", str(tmp_path / "o")),
        "not a diffusers pipeline",
    )
    sdxl = tmp_path / "sdxl"
    for c in ("text_encoder", "tokenizer", "unet", "vae", "scheduler"):
        (sdxl / c).mkdir(parents=True)
    (sdxl / "model_index.json").write_text(json.dumps({c: ["a", "b"] for c in os.listdir(sdxl)}))
    (sdxl / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "text_time"}))
    assert_one_line_error(
        run("effdiff-export", "onnx", "--model", str(sdxl), "--out", str(tmp_path / "o")), "SDXL"
    )


def test_export_unwritable_and_bad_size(tmp_path: Path, cache_dir: Path) -> None:
    env = {"EFFDIFF_CACHE": str(cache_dir)}
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line_error(
        run("effdiff-export", "onnx", "--model", "tiny-sd1", "--out", str(blocker / "out"), env=env),
        "cannot write",
    )
    assert_one_line_error(
        run(
            "effdiff-export",
            "onnx",
            "--model",
            "tiny-sd1",
            "--out",
            str(tmp_path / "o"),
            "--height",
            "100",
            env=env,
        ),
        "multiple of 32",
    )
