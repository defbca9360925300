"""Atomic writes and resume: an interrupted export leaves nothing that looks complete and resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from effdiff.artifacts import LOCK_FILE, STAMP_FILE, Manifest, atomic_path
from effdiff.export import onnx as exporter
from effdiff.specs import GRAPHS, Precision


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "x.json"
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(final) as tmp:
        tmp.write_text("whole")
    assert final.read_text() == "whole" and list(tmp_path.iterdir()) == [final]


def test_rerun_skips_valid_graphs(sd2_artifacts: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in sd2_artifacts.glob("*.onnx")}
    report = exporter.export_onnx("tiny-sd2", sd2_artifacts, progress=False)
    assert all(r.skipped for r in report.results if r.graph != "chain")
    assert report.passed
    assert {p.name: p.stat().st_mtime_ns for p in sd2_artifacts.glob("*.onnx")} == before


def test_interrupted_export_resumes(
    sd1_artifacts: Path, sd1_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "partial"
    shutil.copytree(sd1_artifacts, out)
    # Forget the last two graphs, as if the export had stopped after the decoder.
    manifest = json.loads((out / "manifest.json").read_text())
    for graph in ("unet", "vae_decoder"):
        del manifest["graphs"][graph]
        (out / f"{graph}.onnx").unlink()
    (out / "manifest.json").write_text(json.dumps(manifest))

    real_export = exporter._export_graph

    def dies_on_vae(module, spec, *args, **kwargs):
        if spec.name == "vae_decoder":
            raise KeyboardInterrupt  # the user pressed Ctrl-C mid-export
        return real_export(module, spec, *args, **kwargs)

    monkeypatch.setattr(exporter, "_export_graph", dies_on_vae)
    with pytest.raises(KeyboardInterrupt):
        exporter.export_onnx(str(sd1_folder), out, progress=False)
    assert (out / "unet.onnx").exists(), "graphs finished before the interruption are kept"
    assert not (out / "vae_decoder.onnx").exists(), "no partial graph file"
    leftovers = [p for p in out.iterdir() if p.name.startswith(".") and p.name not in (LOCK_FILE, STAMP_FILE)]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    # every graph before the VAE in export order is recorded (the cache recipe's pair included)
    assert set(json.loads((out / "manifest.json").read_text())["graphs"]) == set(GRAPHS) - {"vae_decoder"}

    monkeypatch.setattr(exporter, "_export_graph", real_export)
    report = exporter.export_onnx(str(sd1_folder), out, progress=False)
    redone = {r.graph for r in report.results if not r.skipped}
    assert redone == {"vae_decoder", "chain"}
    assert Manifest.read(out).passed is True


def test_beyond_tolerance_exits_nonzero_and_keeps_artifacts(
    sd2_artifacts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "strict"
    shutil.copytree(sd2_artifacts, out)
    # An impossible tolerance: the chain check (always re-run) must fail, loudly, keeping everything.
    monkeypatch.setitem(exporter.TOLERANCE, Precision.FP32, 0.0)
    with pytest.raises(exporter.ValidationFailed, match="NO"):
        exporter.export_onnx("tiny-sd2", out, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["passed"] is False
    assert all((out / f"{g}.onnx").exists() for g in manifest["graphs"])
    assert all(c["tolerance"] == 0.0 for c in manifest["chain_validation"]["fp32"])
