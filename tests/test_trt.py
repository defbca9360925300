"""TensorRT engines: what runs without TensorRT (profiles from the specs, manifest records, refusals of
engines built for another TensorRT or GPU, the LayerNormalization check on a real exported graph, the
one-line errors), and, marked `tensorrt`, the engine build and the backend on a machine that has it."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from effdiff.artifacts import FileRecord, Manifest, Variant, variant_file, variant_name
from effdiff.errors import EffdiffError
from effdiff.export.trt import (
    EngineRecipe,
    check_parser_support,
    engine_profile,
    layernorm_nodes,
    source_variants,
)
from effdiff.runtime.backends.trt import EngineTarget, check_engine_target, version_tuple
from effdiff.specs import Precision

from .test_cli import assert_one_line_error, run

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_profiles_follow_the_specs(sd1_artifacts: Path) -> None:
    manifest = Manifest.read(sd1_artifacts)  # tiny-sd1: latents 8x8, UNet factor 4
    specs = manifest.specs(Precision.FP16)
    recipe = EngineRecipe(max_batch=4, decoder_steps=8)
    enc = engine_profile(manifest, specs["unet_encoder"], recipe).shapes
    assert enc["sample"] == ((1, 4, 4, 4), (2, 4, 8, 8), (4, 4, 8, 8))
    assert enc["timestep"] == ((1,), (2,), (4,))
    dec = engine_profile(manifest, specs["unet_decoder"], recipe).shapes
    # rows of the decoder: up to 8 steps x the largest batch; opt: 8 steps of one guided image
    assert dec["timestep"] == ((1,), (16,), (32,))
    assert dec["mid"] == ((1, 64, 1, 1), (2, 64, 2, 2), (4, 64, 2, 2))
    assert dec["skip_00"] == ((1, 32, 4, 4), (2, 32, 8, 8), (4, 32, 8, 8))
    text = engine_profile(manifest, specs["text_encoder"], EngineRecipe(max_batch=1)).shapes
    assert text["input_ids"] == ((1, 77), (1, 77), (1, 77))
    vae = engine_profile(manifest, specs["vae_decoder"], recipe).to_json()
    assert vae["latent"] == [[1, 4, 4, 4], [2, 4, 8, 8], [4, 4, 8, 8]]
    with pytest.raises(EffdiffError, match="fp16 or int8"):
        EngineRecipe(Precision.FP32).check()
    with pytest.raises(EffdiffError, match=">= 1"):
        EngineRecipe(max_batch=0).check()


def test_layernorm_check_on_exported_graphs(sd1_artifacts: Path) -> None:
    text = sd1_artifacts / "text_encoder.onnx"
    assert layernorm_nodes(text) >= 5  # CLIP: two per layer and the final one
    assert layernorm_nodes(sd1_artifacts / "unet_encoder.onnx") > 0  # transformer blocks
    assert layernorm_nodes(sd1_artifacts / "vae_decoder.onnx") == 0  # group norms only
    with pytest.raises(
        EffdiffError, match=r"TensorRT 8\.5\.2\.2 cannot parse LayerNormalization .*JetPack 6"
    ):
        check_parser_support("8.5.2.2", text)
    check_parser_support("8.5.2.2", sd1_artifacts / "vae_decoder.onnx")  # nothing to refuse there
    check_parser_support("8.6.1", text)
    check_parser_support("10.3.0.26", text)


def test_engine_target_refusals() -> None:
    assert version_tuple("10.3.0.26") == (10, 3, 0, 26) and version_tuple("8.6.1.post1") == (8, 6, 1)
    meta = EngineTarget("10.3.0.26", "NVIDIA L4", "8.9").to_meta()
    check_engine_target(meta, EngineTarget("10.3.0.30", "NVIDIA L4", "8.9"), "unet.trt-fp16.engine", "fp16")
    with pytest.raises(
        EffdiffError, match=r"built with TensorRT 10\.3\.0\.26; this machine has TensorRT 10\.5"
    ):
        check_engine_target(meta, EngineTarget("10.5.0", "NVIDIA L4", "8.9"), "unet.trt-fp16.engine", "fp16")
    with pytest.raises(
        EffdiffError, match=r"built for NVIDIA L4 \(compute capability 8\.9\); this machine has"
    ):
        check_engine_target(meta, EngineTarget("10.3.0", "NVIDIA H100", "9.0"), "u.engine", "int8")
    with pytest.raises(EffdiffError, match="--precision int8"):
        check_engine_target(meta, EngineTarget("10.3.0", "NVIDIA H100", "9.0"), "u.engine", "int8")
    # a GPU this machine cannot name (no NVML) is not held against the engine; the version still is
    check_engine_target(meta, EngineTarget("10.3.0", "unknown", "unknown"), "u.engine", "fp16")


def test_engine_variants_in_the_manifest(sd1_artifacts: Path, tmp_path: Path) -> None:
    """What a build records (format trt, target in meta, the source it came from) survives a write and
    read, is what a TensorRT pipeline picks, and int8 pipelines fall back to fp16 text/VAE engines."""
    folder = tmp_path / "art"
    shutil.copytree(sd1_artifacts, folder)
    manifest = Manifest.read(folder)
    target = EngineTarget("10.3.0", "NVIDIA L4", "8.9")
    for graph in manifest.graphs:
        for precision in (Precision.FP16, Precision.INT8):
            if precision is Precision.INT8 and graph in ("text_encoder", "vae_decoder"):
                continue
            name = variant_name(precision, "trt")
            file = variant_file(graph, name, ".engine")
            (folder / file).write_bytes(b"engine bytes " + graph.encode())
            source = manifest.variants(graph)["fp32"]
            manifest.graphs[graph][name] = Variant(
                name,
                precision,
                file,
                {file: FileRecord.of(folder / file)},
                format="trt",
                meta={
                    **target.to_meta(),
                    "source_variant": "fp32",
                    "source_sha256": source.files[source.file].sha256,
                },
            )
    manifest.write(folder)
    again = Manifest.read(folder)
    engine = again.find("unet_decoder", "fp16", "trt")
    assert engine is not None and engine.format == "trt" and engine.meta["gpu"] == "NVIDIA L4"
    assert engine.file == "unet_decoder.trt-fp16.engine"
    assert again.find("vae_decoder", "int8", "trt").name == "trt-fp16"  # type: ignore[union-attr]
    assert again.default_precision("trt") is Precision.FP16
    assert again.default_precision() is Precision.FP32  # the ONNX side is unchanged
    with pytest.raises(
        EffdiffError, match=r"run `effdiff-export coreml --artifacts DIR --precision fp16 --palettize 6`"
    ):
        again.choose("unet", "fp16", "coreml", "pal6")


def test_int8_build_needs_the_int8_graphs(sd1_artifacts: Path) -> None:
    manifest = Manifest.read(sd1_artifacts)
    with pytest.raises(EffdiffError, match=r"no int8 variant .*effdiff-export int8 --artifacts DIR"):
        source_variants(manifest, Precision.INT8)
    fp16 = source_variants(manifest, Precision.FP16)
    assert {v.name for v in fp16.values()} == {"fp32"}


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown where TensorRT is missing")
def test_cli_without_tensorrt_says_what_is_needed(sd1_artifacts: Path, tmp_path: Path) -> None:
    folder = tmp_path / "art"
    shutil.copytree(sd1_artifacts, folder)
    proc = run("effdiff-export", "trt", "--artifacts", str(folder), "--precision", "fp16")
    assert_one_line_error(proc, "TensorRT engines need TensorRT >= 10 and an NVIDIA GPU")
    assert "effdiff[trt]" in proc.stderr
    proc = run("effdiff-export", "trt", "--artifacts", str(folder), "--precision", "int8")
    assert_one_line_error(proc, "no int8 variant")  # checked before TensorRT is looked for
    proc = run(
        "effdiff", "bench", "--artifacts", str(folder), "--backend", "trt", "--out", str(tmp_path / "r")
    )
    assert_one_line_error(proc, "TensorRT engines need TensorRT")
    assert not list(folder.glob("*.engine"))


@pytest.mark.tensorrt
@pytest.mark.skipif(
    not HAS_TRT, reason="needs TensorRT and an NVIDIA GPU (not installable on the CPU machines)"
)
def test_build_and_run_engines(sd1_artifacts: Path, tmp_path: Path) -> None:
    from effdiff.compare import psnr
    from effdiff.export.trt import build_engines
    from effdiff.runtime.pipeline import Pipeline

    folder = tmp_path / "art"
    shutil.copytree(sd1_artifacts, folder)
    report = build_engines(folder, EngineRecipe(max_batch=2, decoder_steps=4), progress=False)
    assert all(c.passed for r in report.results for c in r.comparisons), report.table()
    again = build_engines(folder, EngineRecipe(max_batch=2, decoder_steps=4), progress=False)
    assert all(r.skipped for r in again.results)
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    kwargs = dict(steps=6, latents=latents, propagation="uniform:3", max_decoder_batch=3)
    want = Pipeline.load(folder)("a red circle", **kwargs)
    got = Pipeline.load(folder, backend="trt")("a red circle", **kwargs)
    assert psnr(np.asarray(got.images[0]), np.asarray(want.images[0])) >= 30.0
