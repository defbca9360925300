"""CoreML packages: a real coremltools conversion of the tiny model's split graphs (on Linux), read back
from the package's spec (inputs, outputs, shapes and their flexibility, size after palettization) and
recorded file by file in the manifest; prediction and the `coreml` backend need macOS (marked)."""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import numpy as np
import pytest

from effdiff.artifacts import Manifest, check_files
from effdiff.errors import EffdiffError

ct = pytest.importorskip("coremltools")
pytest.importorskip("torch")

from effdiff.export.coreml import CoreMLRecipe, export_coreml  # noqa: E402

from .test_cli import assert_one_line_error, run  # noqa: E402

GRAPHS = ("text_encoder", "unet_decoder")  # the flexible-batch graph and the variadic fixed-batch one


@pytest.fixture(scope="module")
def converted(sd1_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("coreml") / "art"
    shutil.copytree(sd1_artifacts, folder)
    recipe = CoreMLRecipe(palettize=6, palette_mode="uniform", graphs=GRAPHS)
    return folder, export_coreml(folder, recipe, progress=False)


def _spec(path: Path) -> object:
    return ct.utils.load_spec(str(path))


def test_packages_carry_the_spec_names_shapes_and_dtypes(converted: tuple[Path, object]) -> None:
    folder, _ = converted
    manifest = Manifest.read(folder)
    specs = manifest.specs("fp16")
    for graph in GRAPHS:
        variant = manifest.variants(graph)["coreml-fp16"]
        assert variant.format == "coreml" and variant.file == f"{graph}.coreml-fp16.mlpackage"
        desc = _spec(folder / variant.file).description
        assert [i.name for i in desc.input] == specs[graph].input_names
        assert [o.name for o in desc.output] == specs[graph].output_names
    types = ct.proto.FeatureTypes_pb2.ArrayFeatureType
    text = _spec(folder / "text_encoder.coreml-fp16.mlpackage").description.input[0].type.multiArrayType
    assert text.dataType == types.INT32  # CoreML has no int64 inputs
    assert [(r.lowerBound, r.upperBound) for r in text.shapeRange.sizeRanges] == [(1, 16), (77, 77)]
    dec = {
        i.name: i.type.multiArrayType
        for i in _spec(folder / "unet_decoder.coreml-fp16.mlpackage").description.input
    }
    assert dec["timestep"].dataType == types.FLOAT32 and list(dec["timestep"].shape) == [2]  # one step, CFG
    assert dec["skip_00"].dataType == types.FLOAT16
    # tiny-sd1: latents 8x8, UNet factor 4 -> latent sides 4..16; skip_00 at full size, mid at 1/4
    ranges = [(r.lowerBound, r.upperBound) for r in dec["skip_00"].shapeRange.sizeRanges]
    assert ranges == [(2, 2), (32, 32), (4, 16), (4, 16)]
    assert [(r.lowerBound, r.upperBound) for r in dec["mid"].shapeRange.sizeRanges][2:] == [(1, 4), (1, 4)]


def test_palettized_packages_are_smaller_and_every_file_is_recorded(converted: tuple[Path, object]) -> None:
    folder, report = converted
    manifest = Manifest.read(folder)
    for graph in GRAPHS:
        fp16, pal = manifest.variants(graph)["coreml-fp16"], manifest.variants(graph)["coreml-fp16-pal6"]
        assert pal.meta["palettize_bits"] == 6 and fp16.meta["palettize_bits"] is None
        assert pal.meta["prediction_checked"] is False
        on_disk = {str(p.relative_to(folder)) for p in (folder / fp16.file).rglob("*") if p.is_file()}
        assert set(fp16.files) == on_disk and any(f.endswith("weight.bin") for f in on_disk)
        check_files(folder, fp16.files, full=True)
        check_files(folder, pal.files, full=True)
    dec16 = manifest.variants("unet_decoder")["coreml-fp16"].size_bytes
    dec6 = manifest.variants("unet_decoder")["coreml-fp16-pal6"].size_bytes
    assert dec6 < 0.6 * dec16, (dec6, dec16)  # 6-bit indices + a palette against 16-bit weights
    assert "6-bit palettized" in report.table()  # type: ignore[attr-defined]
    # a corrupted weight file is named by the integrity check like any other artifact
    weights = next(
        f for f in manifest.variants("text_encoder")["coreml-fp16"].files if f.endswith("weight.bin")
    )
    data = bytearray((folder / weights).read_bytes())
    data[-1] ^= 0xFF
    (folder / weights).write_bytes(bytes(data))
    with pytest.raises(EffdiffError, match="does not match its sha256"):
        check_files(folder, manifest.variants("text_encoder")["coreml-fp16"].files)


def test_recipe_and_cli_errors(sd1_artifacts: Path, tmp_path: Path) -> None:
    with pytest.raises(EffdiffError, match="--palettize must be one of 8, 6, 4"):
        CoreMLRecipe(palettize=5).check()
    with pytest.raises(EffdiffError, match="converted at fp16"):
        CoreMLRecipe(precision="fp32").check()  # type: ignore[arg-type]
    proc = run("effdiff-export", "coreml", "--artifacts", str(tmp_path / "none"))
    assert_one_line_error(proc, "does not exist")
    folder = tmp_path / "art"
    shutil.copytree(sd1_artifacts, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["source"]["path"] = str(tmp_path / "moved")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    proc = run("effdiff-export", "coreml", "--artifacts", str(folder))
    assert_one_line_error(proc, "source model")


@pytest.mark.skipif(platform.system() == "Darwin", reason="checks the message shown off macOS")
def test_coreml_backend_off_macos_says_what_is_needed(sd1_artifacts: Path) -> None:
    from effdiff.runtime.pipeline import Pipeline

    with pytest.raises(EffdiffError, match="CoreML prediction needs macOS 14"):
        Pipeline.load(sd1_artifacts, backend="coreml")


@pytest.mark.macos
@pytest.mark.skipif(platform.system() != "Darwin", reason="CoreML prediction needs macOS")
def test_prediction_matches_onnx_runtime(converted: tuple[Path, object]) -> None:
    from effdiff.runtime.backends import get_backend
    from effdiff.runtime.pipeline import Pipeline

    folder, _ = converted
    specs = Manifest.read(folder).specs("fp16")
    ort = Pipeline.load(folder)
    coreml = get_backend("coreml")
    ids = ort.tokenizer(["a red circle", ""])
    want = ort.open_graph("text_encoder").run({"input_ids": ids})["last_hidden_state"]
    text = coreml.open(folder / "text_encoder.coreml-fp16.mlpackage", specs["text_encoder"])
    got = text.run({"input_ids": ids})["last_hidden_state"].astype(np.float32)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
    feeds = specs["unet_decoder"].sample_inputs(2, 8, 8, np.random.default_rng(0), np.full(2, 501.0))
    decoder = coreml.open(folder / "unet_decoder.coreml-fp16.mlpackage", specs["unet_decoder"])
    out = decoder.run(feeds)["noise_pred"]
    assert out.shape == (2, 4, 8, 8) and np.isfinite(out).all()
