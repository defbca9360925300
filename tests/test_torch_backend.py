"""The `torch` backend: the export's own split modules, built from the source model, in the same loop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from effdiff.compare import psnr
from effdiff.errors import EffdiffError
from effdiff.runtime.backends import builds_from_source, get_backend
from effdiff.runtime.pipeline import Hooks, Pipeline

torch = pytest.importorskip("torch")


# One torch thread: on a CPU shared with other work, torch's OpenMP threads spin-wait and a tiny UNet
# call takes ~1 s at 2 threads against ~20 ms at 1 (measured on the 2-core CI machine under load).
THREADS = 1


@pytest.fixture(scope="module")
def pipes(sd1_artifacts: Path) -> tuple[Pipeline, Pipeline]:
    return Pipeline.load(sd1_artifacts), Pipeline.load(
        sd1_artifacts, backend=get_backend("torch", threads=THREADS)
    )


def latents(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, 8, 8)).astype(np.float32)


@pytest.mark.parametrize(("propagation", "decoder_batch"), [("none", None), ("uniform:3", 3)])
def test_images_match_onnx_runtime(
    pipes: tuple[Pipeline, Pipeline], propagation: str, decoder_batch: int | None
) -> None:
    ort_pipe, torch_pipe = pipes
    assert torch_pipe.precision.value == "fp32"  # the CPU default
    kwargs = dict(steps=6, latents=latents(), propagation=propagation, max_decoder_batch=decoder_batch)
    want = ort_pipe("a red circle", "blue", **kwargs)
    got = torch_pipe("a red circle", "blue", **kwargs)
    value = psnr(np.asarray(got.images[0]), np.asarray(want.images[0]))
    assert value >= 40.0, f"{propagation}: torch vs onnxruntime PSNR {value:.1f} dB"
    assert got.calls["unet_decoder" if decoder_batch else "unet"] == (2 if decoder_batch else 6)


def test_sd2_matches_onnx_runtime(sd2_artifacts: Path) -> None:
    """SD2 structure (linear projections, v-prediction) through the same modules."""
    kwargs = dict(steps=4, latents=latents(1), propagation="uniform:2")
    want = Pipeline.load(sd2_artifacts)("a blue square", **kwargs)
    got = Pipeline.load(sd2_artifacts, backend=get_backend("torch", threads=THREADS))(
        "a blue square", **kwargs
    )
    value = psnr(np.asarray(got.images[0]), np.asarray(want.images[0]))
    assert value >= 40.0, f"sd2: torch vs onnxruntime PSNR {value:.1f} dB"


def test_features_stay_tensors_between_encoder_and_decoder(pipes: tuple[Pipeline, Pipeline]) -> None:
    """The encoder's outputs with host_outputs=False are tensors on the backend's device; the decoder
    takes them as they are, and the hooks still see host arrays."""
    _, pipe = pipes
    encoder, decoder = pipe.open_graph("unet_encoder"), pipe.open_graph("unet_decoder")
    spec = encoder.spec
    feeds = spec.sample_inputs(2, 8, 8, np.random.default_rng(0), timesteps=np.full(2, 501.0))
    features = encoder.run(feeds, host_outputs=False)
    assert all(isinstance(v, torch.Tensor) for v in features.values())
    timesteps = np.array([501.0, 501.0, 481.0, 481.0], np.float32)
    out = decoder.run(
        {**features, "encoder_hidden_states": feeds["encoder_hidden_states"], "timestep": timesteps}
    )
    assert isinstance(out["noise_pred"], np.ndarray) and out["noise_pred"].shape == (4, 4, 8, 8)
    # the decoder's two steps share features: same timestep in both halves gives the same prediction
    same = decoder.run(
        {
            **features,
            "encoder_hidden_states": feeds["encoder_hidden_states"],
            "timestep": np.full(4, 501.0, np.float32),
        }
    )
    np.testing.assert_allclose(same["noise_pred"][:2], same["noise_pred"][2:], rtol=1e-5, atol=1e-6)
    # a bad tensor is named at the boundary, before PyTorch sees it
    bad = dict(features, mid=features["mid"].half())
    with pytest.raises(ValueError, match=r"expected float32 .* for `mid`, got float16"):
        decoder.run({**bad, "encoder_hidden_states": feeds["encoder_hidden_states"], "timestep": timesteps})
    seen: list[str] = []
    pipe(
        "a red circle",
        steps=2,
        latents=latents(),
        propagation="uniform:2",
        max_decoder_batch=2,
        hooks=Hooks(on_graph=lambda name, f: seen.append(name) or None),
    )
    assert seen.count("unet_decoder") == 1 and "unet_encoder" in seen


def test_same_modules_as_the_export() -> None:
    """The backend runs the classes the export traces: one definition, in the runtime layer."""
    from effdiff.export import split
    from effdiff.export.graphs import EXPORTS
    from effdiff.runtime.backends import torch_modules

    assert split.UNetDecoder is torch_modules.UNetDecoder
    assert {g: (e.component, e.wrapper) for g, e in EXPORTS.items()} == torch_modules.SPLIT_MODULES


def test_backend_options_and_errors(sd1_artifacts: Path, tmp_path: Path) -> None:
    backend = get_backend("torch")
    assert builds_from_source(backend) and not builds_from_source(get_backend("ort"))
    assert backend.batches_pay() is False and "on cpu" in backend.describe()
    if not torch.cuda.is_available():
        with pytest.raises(EffdiffError, match="sees no CUDA GPU"):
            get_backend("torch", device="cuda")
        with pytest.raises(EffdiffError, match="CUDA graphs need a CUDA device"):
            get_backend("torch", cuda_graphs=True)
    with pytest.raises(EffdiffError, match="int8"):
        Pipeline.load(sd1_artifacts, backend="torch", precision="int8")("p", steps=1)
    # a source model that moved away is named, not a deep diffusers failure
    import json
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(sd1_artifacts, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["source"]["path"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EffdiffError, match="builds its graphs from the source model"):
        Pipeline.load(moved, backend="torch")("p", steps=1)


def test_runtime_stays_torch_free_until_the_torch_backend_is_asked_for() -> None:
    code = """
import sys
import effdiff.runtime.backends as b, effdiff.runtime.pipeline
assert "torch" in b.backend_names()
assert "torch" not in sys.modules, "importing the runtime imported torch"
b.get_backend("torch")
assert "torch" in sys.modules
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16, CUDA graphs)")
def test_cuda_fp16_with_cuda_graphs_close_to_fp32(sd1_artifacts: Path) -> None:
    kwargs = dict(steps=6, latents=latents(), propagation="uniform:3", max_decoder_batch=3)
    want = Pipeline.load(sd1_artifacts, backend="torch", precision="fp32")("a red circle", **kwargs)
    for options in ({}, {"cuda_graphs": True}):
        pipe = Pipeline.load(sd1_artifacts, backend=get_backend("torch", **options))
        assert pipe.precision.value == "fp16"
        got = pipe("a red circle", **kwargs)
        value = psnr(np.asarray(got.images[0]), np.asarray(want.images[0]))
        assert value >= 30.0, f"{options}: fp16 CUDA vs fp32 PSNR {value:.1f} dB"


def test_bench_compares_backends_in_one_report(sd1_artifacts: Path, tmp_path: Path) -> None:
    from effdiff.bench.harness import BenchSettings, parse_configs, run_bench, with_backends
    from effdiff.bench.report import markdown

    configs = with_backends(parse_configs(["full", "fd"], "ddim", 4), ["ort", "torch"])
    assert [(c.name, c.backend) for c in configs] == [
        ("full", "ort"),
        ("fd", "ort"),
        ("full@torch", "torch"),
        ("fd@torch", "torch"),
    ]
    torch.set_num_threads(THREADS)
    settings = BenchSettings(prompts=["a red circle"], steps=4, repeat=1, warmup=0)
    report = run_bench(sd1_artifacts, configs, settings, progress=False)
    rows = {r.name: r for r in report.rows}
    assert "torch" in rows["full@torch"].detail and "fp32" in rows["full@torch"].detail
    assert rows["full"].detail == "none"  # ORT rows read as before
    assert rows["full@torch"].quality["psnr_db"] >= 40.0, rows["full@torch"].quality
    assert rows["fd@torch"].components["unet_decoder"].median > 0
    assert rows["full@torch"].disk_mib is None and rows["full"].disk_mib > 0  # no exported file
    assert "full@torch" in markdown(report)
    with pytest.raises(EffdiffError, match="unknown backend"):
        with_backends(configs, ["tensorflow"])


def test_graph_free_artifacts_run_on_torch_only(sd1_folder: Path, tmp_path: Path) -> None:
    """`write_source_manifest` writes what the torch backend needs (no graph); ORT then names what is
    missing, and a folder of another model loses its manifest before anything is written."""
    from effdiff.export.onnx import write_source_manifest

    folder = tmp_path / "src-only"
    manifest = write_source_manifest(str(sd1_folder), folder)
    assert manifest.graphs == {} and (folder / "manifest.json").is_file()
    pipe = Pipeline.load(folder, backend=get_backend("torch", threads=THREADS))
    result = pipe("a red circle", steps=2, latents=latents(), propagation="uniform:2")
    assert result.images[0].size == (64, 64) and result.calls["unet_encoder"] == 1
    with pytest.raises(EffdiffError, match="text_encoder has no fp32 variant"):
        Pipeline.load(folder)
    again = write_source_manifest(str(sd1_folder), folder)  # same model: idempotent
    assert again.source.content_hash == manifest.source.content_hash
