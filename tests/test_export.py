"""Split-UNet export: graphs, manifest, validation, and the graphs run in onnxruntime against diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from effdiff.artifacts import Manifest, check_files, sha256_file
from effdiff.runtime.backends.ort import OrtGraph
from effdiff.specs import GRAPHS


def graph_file(artifacts: Path, graph: str) -> Path:
    return artifacts / Manifest.read(artifacts).variant(graph, "fp32").file


def test_every_graph_exported_and_validated(artifacts: Path) -> None:
    manifest = Manifest.read(artifacts)
    assert manifest.passed is True
    for graph in GRAPHS:
        variant = manifest.variant(graph, "fp32")
        check_files(artifacts, variant.files)
        for name, record in variant.files.items():
            assert record.sha256 == sha256_file(artifacts / name), name
        cases = {c.case for c in variant.validation}
        # batch sizes (x resolutions where spatial; the decoder also decodes 2 steps per call)
        expected = {"text_encoder": 2, "unet_decoder": 6}.get(graph, 4)
        assert len(cases) == expected, f"{graph}: expected {expected} cases, got {sorted(cases)}"
        worst = max(c.rel_l2 for c in variant.validation)
        assert worst < 1e-4, f"{graph}: worst relative L2 {worst:.2e}"
    chain = manifest.chain_validation["fp32"]
    assert len(chain) == 8 and max(c.rel_l2 for c in chain) < 1e-4  # encoder>decoder, deep>shallow
    data = json.loads((artifacts / "manifest.json").read_text())
    for key in (
        "effdiff_version",
        "source",
        "family",
        "prediction_type",
        "recipe",
        "skip_layout",
        "tokenizer",
    ):
        assert key in data, key
    assert len(manifest.source.content_hash) == 64
    assert set(manifest.support_files) == {"tokenizer/tokenizer.json", "scheduler_config.json"}
    check_files(artifacts, manifest.support_files)


def test_family_and_prediction_type(sd1_artifacts: Path, sd2_artifacts: Path) -> None:
    m1, m2 = Manifest.read(sd1_artifacts), Manifest.read(sd2_artifacts)
    assert (m1.family, m1.prediction_type) == ("sd1", "epsilon")
    assert (m2.family, m2.prediction_type) == ("sd2", "v_prediction")


def test_onnx_io_matches_spec_with_named_dynamic_axes(artifacts: Path) -> None:
    manifest = Manifest.read(artifacts)
    for graph, spec in manifest.specs().items():
        model = onnx.load(str(graph_file(artifacts, graph)), load_external_data=False)
        assert [i.name for i in model.graph.input] == spec.input_names
        assert [o.name for o in model.graph.output] == spec.output_names
        for value in model.graph.input:
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            # the decoder's timesteps carry steps x batch rows over the features' batch
            first = "rows" if (graph, value.name) == ("unet_decoder", "timestep") else "batch"
            assert dims[0] == first, f"{graph}.{value.name}: first axis {dims[0]!r}"


def test_decoder_of_encoder_matches_diffusers_at_a_new_shape(artifacts: Path) -> None:
    """Independent of the exporter's own checks: batch 3, non-square latents, a mixed-timestep batch."""
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel

    manifest = Manifest.read(artifacts)
    specs = manifest.specs()
    unet = UNet2DConditionModel.from_pretrained(Path(manifest.source.path) / "unet").eval()
    rng = np.random.default_rng(7)
    feeds = specs["unet"].sample_inputs(3, 12, 8, rng, timesteps=np.array([999.0, 500.0, 1.0]))
    encoder = OrtGraph(graph_file(artifacts, "unet_encoder"), specs["unet_encoder"])
    decoder = OrtGraph(graph_file(artifacts, "unet_decoder"), specs["unet_decoder"])
    features = encoder.run(feeds)
    got = decoder.run({**feeds, **features})["noise_pred"]
    with torch.inference_mode():
        want = unet(*(torch.from_numpy(feeds[n]) for n in specs["unet"].input_names)).sample.numpy()
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1e-4, f"decoder(encoder(x)) vs diffusers: relative L2 {rel:.2e}"
    # the whole-UNet graph agrees too
    whole = OrtGraph(graph_file(artifacts, "unet"), specs["unet"]).run(feeds)["noise_pred"]
    assert np.linalg.norm(whole - want) / np.linalg.norm(want) < 1e-4
    # one decoder call over two steps (features repeated inside the graph) equals two calls
    ts = np.array([999.0, 500.0, 1.0, 20.0, 300.0, 700.0], np.float32)
    two = decoder.run({**feeds, **features, "timestep": ts})["noise_pred"]
    second = decoder.run({**feeds, **features, "timestep": ts[3:]})["noise_pred"]
    np.testing.assert_allclose(two[3:], second, rtol=1e-5, atol=1e-5)


def test_session_boundary_names_expected_and_actual(sd1_artifacts: Path) -> None:
    specs = Manifest.read(sd1_artifacts).specs()
    encoder = OrtGraph(graph_file(sd1_artifacts, "unet_encoder"), specs["unet_encoder"])
    feeds = specs["unet_encoder"].sample_inputs(2, 8, 8, np.random.default_rng(0))
    feeds["sample"] = feeds["sample"].astype(np.float16)
    with pytest.raises(
        ValueError, match=r"expected float32 \(batch,4,latent_height,latent_width\) for `sample`"
    ):
        encoder.run(feeds)


def test_manifest_is_plain_json_with_skip_layout(sd1_artifacts: Path) -> None:
    manifest = json.loads((sd1_artifacts / "manifest.json").read_text())
    layout = manifest["skip_layout"]
    assert [s["name"] for s in layout] == [f"skip_{i:02d}" for i in range(len(layout))]
    assert layout[0]["downsample"] == 1 and layout[-1]["downsample"] == manifest["geometry"]["unet_factor"]


def test_decoder_boundary_checks_rows_against_batch(sd1_artifacts: Path) -> None:
    specs = Manifest.read(sd1_artifacts).specs()
    decoder = OrtGraph(graph_file(sd1_artifacts, "unet_decoder"), specs["unet_decoder"])
    feeds = specs["unet_decoder"].sample_inputs(2, 8, 8, np.random.default_rng(0))
    feeds["timestep"] = np.zeros(3, np.float32)  # 3 rows over features of batch 2
    with pytest.raises(ValueError, match="not a multiple of the features' batch 2"):
        decoder.run(feeds)
    feeds["timestep"] = np.zeros(4, np.float32)
    feeds["skip_00"] = feeds["skip_00"][:1]
    with pytest.raises(ValueError, match="does not agree"):
        decoder.run(feeds)


def test_fused_attention_graph_matches_the_standard_one(sd1_artifacts: Path, tmp_path: Path) -> None:
    """`--attention fused`: ONNX Runtime's MultiHeadAttention in place of MatMul-Softmax-MatMul, the same
    outputs at a shape other than the traced one (batch 3, non-square), self- and cross-attention."""
    pytest.importorskip("torch")
    from effdiff.export.graphs import EXPORTS
    from effdiff.export.models import load_component, resolve_model
    from effdiff.export.onnx import _export_graph
    from effdiff.specs import Precision

    manifest = Manifest.read(sd1_artifacts)
    spec = manifest.specs()["unet_encoder"]
    export = EXPORTS["unet_encoder"]
    module = export.module(load_component(resolve_model(manifest.source.path), "unet"), manifest.geometry)
    trace = spec.sample_inputs(1, 8, 8, np.random.default_rng(0), timesteps=np.array([500.0]))
    files = _export_graph(module, spec, trace, tmp_path / "enc.onnx", 20, Precision.FP32, "fused")
    path = next(f for f in files if f.suffix == ".onnx")
    ops = {(n.domain, n.op_type) for n in onnx.load(str(path)).graph.node}
    assert ("com.microsoft", "MultiHeadAttention") in ops and ("", "Softmax") not in ops
    feeds = spec.sample_inputs(3, 12, 8, np.random.default_rng(1), timesteps=np.array([999.0, 500.0, 1.0]))
    fused = OrtGraph(path, spec).run(feeds)
    standard = OrtGraph(graph_file(sd1_artifacts, "unet_encoder"), spec).run(feeds)
    for name, want in standard.items():
        rel = np.linalg.norm(fused[name] - want) / np.linalg.norm(want)
        assert rel < 1e-5, f"{name}: fused vs standard attention, relative L2 {rel:.2e}"


def test_fused_attention_refused_where_it_cannot_run(sd1_artifacts: Path, tmp_path: Path) -> None:
    from effdiff.errors import EffdiffError
    from effdiff.export.attention import translation_table
    from effdiff.export.onnx import ExportRecipe, export_onnx
    from effdiff.export.trt import build_engines

    assert translation_table("fused", "text_encoder") is None  # causal attention stays standard
    assert translation_table("standard", "unet") is None
    with pytest.raises(EffdiffError, match="attention must be one of standard, fused"):
        export_onnx("tiny-sd1", tmp_path / "x", ExportRecipe(attention="flash"), progress=False)
    folder = tmp_path / "fused"
    folder.mkdir()
    data = json.loads((sd1_artifacts / "manifest.json").read_text())
    data["recipe"]["attention"] = "fused"
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EffdiffError, match="export with --attention standard for TensorRT"):
        build_engines(folder, progress=False)
