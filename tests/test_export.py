"""Split-UNet export: graphs, manifest, validation, and the graphs run in onnxruntime against diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from effdiff.artifacts import check_complete, graph_path, manifest_specs, read_manifest
from effdiff.runtime.backend import OrtGraph
from effdiff.specs import GRAPHS


def test_every_graph_exported_and_validated(artifacts: Path) -> None:
    manifest = read_manifest(artifacts)
    check_complete(artifacts, manifest, GRAPHS)
    assert manifest["passed"] is True
    for graph in GRAPHS:
        record = manifest["graphs"][graph]
        cases = {c["case"] for c in record["validation"]}
        expected = 2 if graph == "text_encoder" else 4  # batch sizes (x resolutions where spatial)
        assert len(cases) == expected, f"{graph}: expected {expected} cases, got {sorted(cases)}"
        worst = max(c["rel_l2"] for c in record["validation"])
        assert worst < 1e-4, f"{graph}: worst relative L2 {worst:.2e}"
    chain = manifest["chain_validation"]
    assert len(chain) == 4 and max(c["rel_l2"] for c in chain) < 1e-4
    for key in (
        "effdiff_version",
        "source",
        "family",
        "prediction_type",
        "recipe",
        "skip_layout",
        "tokenizer",
    ):
        assert key in manifest, key
    assert len(manifest["source"]["content_hash"]) == 64
    assert (artifacts / "tokenizer" / "tokenizer.json").exists()
    assert (artifacts / "scheduler_config.json").exists()


def test_family_and_prediction_type(sd1_artifacts: Path, sd2_artifacts: Path) -> None:
    m1, m2 = read_manifest(sd1_artifacts), read_manifest(sd2_artifacts)
    assert (m1["family"], m1["prediction_type"]) == ("sd1", "epsilon")
    assert (m2["family"], m2["prediction_type"]) == ("sd2", "v_prediction")


def test_onnx_io_matches_spec_with_named_dynamic_axes(artifacts: Path) -> None:
    manifest = read_manifest(artifacts)
    specs = manifest_specs(manifest)
    for graph, spec in specs.items():
        model = onnx.load(str(graph_path(artifacts, graph)), load_external_data=False)
        assert [i.name for i in model.graph.input] == spec.input_names
        assert [o.name for o in model.graph.output] == spec.output_names
        for value in model.graph.input:
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert dims[0] == "batch", f"{graph}.{value.name}: first axis {dims[0]!r}"


def test_decoder_of_encoder_matches_diffusers_at_a_new_shape(artifacts: Path) -> None:
    """Independent of the exporter's own checks: batch 3, non-square latents, a mixed-timestep batch."""
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel

    manifest = read_manifest(artifacts)
    specs = manifest_specs(manifest)
    unet = UNet2DConditionModel.from_pretrained(Path(manifest["source"]["path"]) / "unet").eval()
    rng = np.random.default_rng(7)
    feeds = specs["unet"].sample_inputs(3, 12, 8, rng, timesteps=np.array([999.0, 500.0, 1.0]))
    encoder = OrtGraph(graph_path(artifacts, "unet_encoder"), specs["unet_encoder"])
    decoder = OrtGraph(graph_path(artifacts, "unet_decoder"), specs["unet_decoder"])
    features = encoder.run(feeds)
    got = decoder.run({**feeds, **features})["noise_pred"]
    with torch.inference_mode():
        want = unet(*(torch.from_numpy(feeds[n]) for n in specs["unet"].input_names)).sample.numpy()
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1e-4, f"decoder(encoder(x)) vs diffusers: relative L2 {rel:.2e}"
    # the whole-UNet graph agrees too
    whole = OrtGraph(graph_path(artifacts, "unet"), specs["unet"]).run(feeds)["noise_pred"]
    assert np.linalg.norm(whole - want) / np.linalg.norm(want) < 1e-4


def test_session_boundary_names_expected_and_actual(sd1_artifacts: Path) -> None:
    specs = manifest_specs(read_manifest(sd1_artifacts))
    encoder = OrtGraph(graph_path(sd1_artifacts, "unet_encoder"), specs["unet_encoder"])
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
