"""Reliability: integrity checks, no mixed folders, one writer at a time, numeric guards, and property
tests that search the argument space (every outcome is an image or a one-line error)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effdiff.artifacts import LOCK_FILE, FileRecord, Manifest, verify_files
from effdiff.cli import main
from effdiff.errors import EffdiffError
from effdiff.runtime.pipeline import GenerationResult, Pipeline
from effdiff.runtime.schedulers import make_scheduler
from effdiff.runtime.tokenizer import PromptTokenizer

from .test_cli import BIN, assert_one_line_error, run


@pytest.fixture()
def folder(sd1_artifacts: Path, tmp_path: Path) -> Path:
    out = tmp_path / "art"
    shutil.copytree(sd1_artifacts, out)
    return out


def generate(folder: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run(
        "effdiff",
        "generate",
        "--artifacts",
        str(folder),
        "--prompt",
        "a red circle",
        "--out",
        str(tmp_path / "o.png"),
        "--steps",
        "3",
        "--quiet",
        *extra,
    )


def test_same_size_corruption_is_caught(folder: Path, tmp_path: Path) -> None:
    manifest = Manifest.read(folder)
    records = {n: r for v in manifest.graphs.values() for var in v.values() for n, r in var.files.items()}
    # A folder copied as a whole is hashed once on first use, then trusted by its stamp.
    assert any(c.hashed for c in verify_files(folder, records))
    assert not any(c.hashed for c in verify_files(folder, records))
    with (folder / "unet.onnx").open("r+b") as fh:  # overwrite bytes in place: same size
        fh.seek((folder / "unet.onnx").stat().st_size // 2)
        fh.write(b"\x00" * 256)
    assert_one_line_error(generate(folder, tmp_path), "unet.onnx does not match its sha256")
    proc = run("effdiff", "verify", str(folder))
    assert proc.returncode != 0 and "1 do NOT match" in proc.stdout, proc.stdout
    assert not (tmp_path / "o.png").exists()


def test_verify_reports_every_file(folder: Path) -> None:
    proc = run("effdiff", "verify", str(folder))
    assert proc.returncode == 0, proc.stderr
    assert "9 files" in proc.stdout and "all match the manifest" in proc.stdout


def _forge(folder: Path, name: str) -> None:
    """Re-record a changed file in the manifest, as if it had been exported that way."""
    data = json.loads((folder / "manifest.json").read_text())
    record = FileRecord.of(folder / name)
    for graph in data["graphs"].values():
        for variant in graph["variants"].values():
            if name in variant["files"]:
                variant["files"][name] = {"size": record.size, "sha256": record.sha256}
    if name in data["support_files"]:
        data["support_files"][name] = {"size": record.size, "sha256": record.sha256}
    (folder / "manifest.json").write_text(json.dumps(data))


def test_nan_inside_a_graph_stops_with_the_graph_and_step(folder: Path, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    model = onnx.load(str(folder / "unet.onnx"))
    init = max(model.graph.initializer, key=lambda t: "conv_out" in t.name and "bias" in t.name)
    nan = numpy_helper.to_array(init).copy()
    nan[:] = np.nan
    init.CopyFrom(numpy_helper.from_array(nan, init.name))
    onnx.save(model, str(folder / "unet.onnx"))
    _forge(folder, "unet.onnx")
    assert_one_line_error(generate(folder, tmp_path), "unet returned NaN or infinity at step 0")
    assert not (tmp_path / "o.png").exists()


def test_third_party_boundaries_raise_our_error(folder: Path, tmp_path: Path) -> None:
    broken = tmp_path / "tokenizer.json"
    broken.write_text('{"model": {"type": "BPE", "vocab": 3')
    with pytest.raises(EffdiffError, match="cannot be read as a tokenizer"):
        PromptTokenizer(broken, 77, 0, 1)
    config = json.loads((folder / "scheduler_config.json").read_text())
    with pytest.raises(EffdiffError, match="does not fit the ddim sampler"):
        make_scheduler("ddim", {**config, "beta_start": "small"})
    with pytest.raises(EffdiffError, match="does not fit the euler sampler"):
        make_scheduler("euler", {**config, "num_train_timesteps": None})


def _wait(
    condition: Callable[[], bool], proc: subprocess.Popen[str], what: str, timeout: float = 300
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the export ended (rc {proc.returncode}) before {what}: {proc.stderr}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _export(model: str, out: Path, cache: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EFFDIFF_CACHE": str(cache)}
    return subprocess.Popen(
        [str(BIN / "effdiff-export"), "onnx", "--model", model, "--out", str(out), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_export_killed_in_another_models_folder_is_never_used(
    folder: Path, tmp_path: Path, cache_dir: Path
) -> None:
    """SIGKILL an export of tiny-sd2 into tiny-sd1's folder at two moments: right after it starts
    replacing the model, and after its first graph is in place. The runtime refuses the folder both
    times; it never makes an image from a mix of the two models."""
    from effdiff.export.models import resolve_model

    resolve_model("tiny-sd2")  # built once here, so the subprocess starts exporting at once
    sd1_text = (folder / "text_encoder.onnx").stat().st_mtime_ns
    proc = _export("tiny-sd2", folder, cache_dir)
    _wait(lambda: not (folder / "manifest.json").exists(), proc, "the old manifest went")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert_one_line_error(generate(folder, tmp_path), "manifest.json is missing")

    proc = _export("tiny-sd2", folder, cache_dir)
    _wait(lambda: (folder / "text_encoder.onnx").stat().st_mtime_ns != sd1_text, proc, "a new graph")
    _wait(lambda: (folder / "manifest.json").exists(), proc, "the new manifest")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert Manifest.read(folder).source.model == "tiny-sd2"
    assert_one_line_error(generate(folder, tmp_path), "has no fp32 variant")
    assert not (tmp_path / "o.png").exists()


def test_second_writer_fails_at_once(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "shared"
    first = _export("tiny-sd1", out, cache_dir)
    try:
        _wait(lambda: (out / "tokenizer").exists(), first, "the first export to hold the folder")
        start = time.monotonic()
        second = run(
            "effdiff-export",
            "onnx",
            "--model",
            "tiny-sd1",
            "--out",
            str(out),
            "--quiet",
            env={"EFFDIFF_CACHE": str(cache_dir)},
        )
        assert time.monotonic() - start < 60
        assert_one_line_error(second, "is being written by another effdiff process")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the kernel released the dead writer's lock: a new export can take the folder (and cleans up)
    from filelock import FileLock

    with FileLock(str(out / LOCK_FILE), timeout=0):
        pass


# ---------------------------------------------------------------- property tests

SCHEDULES = ["none", "uniform:2", "fd-ddim50", "0,2", "1,2", "uniform:0", "0,99", "cache:x", ""]
SAMPLERS = ["ddim", "dpmpp-2m", "euler", "plms", ""]


@pytest.fixture(scope="module")
def pipe(sd1_artifacts: Path) -> Pipeline:
    return Pipeline.load(sd1_artifacts)


def _outcome(fn: Callable[[], GenerationResult]) -> GenerationResult | None:
    try:
        return fn()
    except EffdiffError as exc:
        message = str(exc)
        assert message and "\n" not in message, f"not a one-line error: {message!r}"
        return None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.one_of(st.integers(-2, 5), st.just(10**9)),
    guidance=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 12)),
    seed=st.one_of(st.none(), st.integers(-5, 2**70)),
    height=st.one_of(st.none(), st.integers(-32, 160), st.just(10**6)),
    width=st.one_of(st.none(), st.sampled_from([0, 32, 64, 96, 100])),
    num_images=st.integers(-1, 2),
    propagation=st.sampled_from(SCHEDULES),
    sampler=st.sampled_from(SAMPLERS),
    vae_tile=st.one_of(st.none(), st.integers(-3, 10)),
    max_decoder_batch=st.one_of(st.none(), st.integers(-1, 4)),
)
def test_api_outcome_is_an_image_or_one_line_error(pipe: Pipeline, **kwargs: object) -> None:
    h, w = kwargs["height"], kwargs["width"]
    result = _outcome(lambda: pipe("a red circle", guidance_scale=kwargs.pop("guidance"), **kwargs))
    if result is None:
        return
    assert np.isfinite(result.latents).all()
    expected = ((w if w is not None else 64), (h if h is not None else 64))
    assert all(im.size == expected for im in result.images)
    assert len(result.images) == max(1, int(kwargs["num_images"]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    args=st.lists(
        st.sampled_from(
            [
                ["--steps", "3"],
                ["--steps", "0"],
                ["--steps", "x"],
                ["--guidance", "nan"],
                ["--guidance", "inf"],
                ["--guidance", "-1"],
                ["--guidance", "2"],
                ["--seed", "-4"],
                ["--height", "0"],
                ["--width", "96"],
                ["--vae-tile", "-2"],
                ["--vae-tile", "4"],
                ["--num-images", "0"],
                ["--propagation", "uniform:2"],
                ["--propagation", "bogus"],
                ["--providers", "NoSuchProvider"],
                ["--noise-alpha", "nan"],
                ["--noise-alpha", "0.01"],
                ["--max-decoder-batch", "0"],
                ["--precision", "int8"],
                ["--sampler", "euler"],
            ]
        ),
        max_size=4,
    )
)
def test_cli_outcome_is_an_image_or_one_line_error(sd1_artifacts: Path, tmp_path: Path, args: list) -> None:
    out = tmp_path / "img.png"
    out.unlink(missing_ok=True)
    flat = [a for pair in args for a in pair]
    steps = [] if "--steps" in flat else ["--steps", "2"]
    result = CliRunner().invoke(
        main,
        [
            "generate",
            "--artifacts",
            str(sd1_artifacts),
            "--prompt",
            "p",
            "--out",
            str(out),
            "--quiet",
            *steps,
            *flat,
        ],
        catch_exceptions=False,
    )
    if result.exit_code == 0:
        from PIL import Image

        assert out.exists() and np.asarray(Image.open(out)).size > 0
    else:
        lines = [line for line in result.output.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.output
        assert not out.exists()


def test_numeric_guards_cost_under_one_percent_of_a_step() -> None:
    """The finiteness checks run on host latents of (2B, 4, h, w): at SD1.5's 64x64 latents with CFG,
    far below a millisecond, against a step of tens of milliseconds even on a datacenter GPU."""
    x = np.random.default_rng(0).standard_normal((2, 4, 64, 64)).astype(np.float32)
    start = time.perf_counter()
    for _ in range(200):
        assert np.isfinite(x).all()
    per_check = (time.perf_counter() - start) / 200
    assert per_check < 1e-3 and math.isfinite(per_check)


def test_python_api_types_are_checked(sd1_artifacts: Path) -> None:
    with pytest.raises(EffdiffError, match="artifacts must be a folder path"):
        Pipeline.load(123)  # type: ignore[arg-type]
    with pytest.raises(EffdiffError, match="providers must be a list"):
        Pipeline.load(sd1_artifacts, providers="CPUExecutionProvider")  # type: ignore[arg-type]
    with pytest.raises(EffdiffError, match="unknown precision"):
        Pipeline.load(sd1_artifacts, precision="int4")
    with pytest.raises(EffdiffError, match="has no int8 variant"):
        Pipeline.load(sd1_artifacts, precision="int8")("a cat", steps=2)


def test_unwritable_output_is_refused_before_the_work(sd1_artifacts: Path, tmp_path: Path) -> None:
    assert_one_line_error(generate(sd1_artifacts, tmp_path / "nope"), "does not exist")
    (tmp_path / "f.png").write_text("")  # a file where the report folder should go
    start = time.monotonic()
    proc = run(
        "effdiff",
        "bench",
        "--artifacts",
        str(sd1_artifacts),
        "--out",
        str(tmp_path / "f.png" / "x"),
        "--steps",
        "50",
        "--quiet",
    )
    assert_one_line_error(proc, "cannot write")
    assert time.monotonic() - start < 60, "refused before the benchmark ran"
