"""The torch-free runtime: parity with diffusers, encoder propagation, parallel decoding, lean mode, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from effdiff.compare import psnr
from effdiff.errors import EffdiffError
from effdiff.runtime.pipeline import Pipeline
from effdiff.runtime.propagation import KeySchedule, NoiseInjection

from .test_cli import assert_one_line_error, run


@pytest.fixture(scope="module")
def pipe1(sd1_artifacts: Path) -> Pipeline:
    return Pipeline.load(sd1_artifacts)


def unit_latents(batch: int = 2, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4, size, size)).astype(np.float32)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m", "euler"])
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_image_matches_diffusers_pipeline(family: str, sampler: str, request: pytest.FixtureRequest) -> None:
    torch = pytest.importorskip("torch")
    import diffusers

    artifacts = request.getfixturevalue(f"{family}_artifacts")
    pipe = Pipeline.load(artifacts)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        pipe.manifest.source.path, safety_checker=None, local_files_only=True
    )
    ref.set_progress_bar_config(disable=True)
    cls = {
        "ddim": diffusers.DDIMScheduler,
        "dpmpp-2m": diffusers.DPMSolverMultistepScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
    }[sampler]
    ref.scheduler = cls.from_config(ref.scheduler.config)
    lat = unit_latents()
    ours = pipe(
        "a small red circle", "blue", steps=12, sampler=sampler, guidance_scale=6.0, latents=lat, num_images=2
    )
    with torch.inference_mode():
        want = ref(
            "a small red circle",
            negative_prompt="blue",
            num_inference_steps=12,
            guidance_scale=6.0,
            latents=torch.from_numpy(lat),
            num_images_per_prompt=2,
            height=64,
            width=64,
        ).images
    for got, exp in zip(ours.images, want, strict=True):
        value = psnr(np.asarray(got), np.asarray(exp))
        assert value >= 40.0, f"{family}/{sampler}: PSNR {value:.1f} dB against diffusers"


def test_runtime_imports_no_torch(sd1_artifacts: Path, tmp_path: Path) -> None:
    code = f"""
import sys
from effdiff.runtime.images import save_image
from effdiff.runtime.pipeline import Pipeline
res = Pipeline.load({str(sd1_artifacts)!r})("a red circle", steps=3, propagation="uniform:2")
save_image(res.images, __import__("pathlib").Path({str(tmp_path / "img.png")!r}))
heavy = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
assert not heavy, heavy
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr
    assert (tmp_path / "img.png").stat().st_size > 0


def test_encoder_at_every_step_equals_whole_unet(pipe1: Pipeline) -> None:
    whole = pipe1("a red circle", steps=10, latents=unit_latents(), num_images=2)
    split = pipe1(
        "a red circle",
        steps=10,
        latents=unit_latents(),
        num_images=2,
        propagation="uniform:1",
        noise_injection=None,
    )
    assert whole.calls["unet"] == 10 and whole.calls["unet_encoder"] == 0
    assert split.calls["unet_encoder"] == 10 and split.calls["unet"] == 0
    rel = np.linalg.norm(split.latents - whole.latents) / np.linalg.norm(whole.latents)
    assert rel < 1e-5, f"relative difference {rel:.2e}"


def test_parallel_decoding_equals_sequential(pipe1: Pipeline) -> None:
    kwargs = dict(steps=50, latents=unit_latents(), num_images=2, propagation="fd-ddim50")
    assert pipe1.auto_decoder_batch() == 1  # CPU provider only here
    seq = pipe1("a blue square", max_decoder_batch=1, **kwargs)
    par = pipe1("a blue square", max_decoder_batch=4, **kwargs)
    assert seq.calls["unet_encoder"] == par.calls["unet_encoder"] == 9
    assert seq.calls["unet_decoder"] == 50
    assert par.calls["unet_decoder"] == len(KeySchedule.preset("fd-ddim50").groups(50, 4)) < 50
    rel = np.linalg.norm(par.latents - seq.latents) / np.linalg.norm(seq.latents)
    assert rel < 1e-5, f"batched decoder differs from sequential: {rel:.2e}"


def test_prior_noise_injection(pipe1: Pipeline) -> None:
    kwargs = dict(steps=20, latents=unit_latents(), num_images=2, propagation="uniform:3")
    off = pipe1("a cat", noise_injection=None, **kwargs)
    zero_tau = pipe1("a cat", noise_injection=NoiseInjection(0.003, tau=0.0), **kwargs)
    on = pipe1("a cat", noise_injection=NoiseInjection(0.003, 500.0), **kwargs)
    np.testing.assert_array_equal(off.latents, zero_tau.latents)
    diff = np.abs(on.latents - off.latents).max()
    assert 0 < diff < 1.0, f"injection changed latents by {diff}"


def test_lean_mode_same_result_and_releases_sessions(sd1_artifacts: Path, pipe1: Pipeline) -> None:
    lean = Pipeline.load(sd1_artifacts, lean=True)
    a = lean(
        "a dog", steps=6, latents=unit_latents(), num_images=2, propagation="uniform:2", measure_memory=True
    )
    b = pipe1("a dog", steps=6, latents=unit_latents(), num_images=2, propagation="uniform:2")
    np.testing.assert_allclose(a.latents, b.latents, rtol=0, atol=1e-6)
    assert lean.graphs.open_names == () and a.timings["load"] > 0
    assert a.peak_rss_gib is not None and a.peak_rss_gib > 0 and b.peak_rss_gib is None


def test_sessions_that_take_turns_stop_spinning(pipe1: Pipeline) -> None:
    """Graphs that alternate with another in the loop release the cores when run() returns (an idle
    session's spinning threads would slow the next graph's run); the whole UNet, run back to back,
    keeps ONNX Runtime's spinning, and an explicit option still wins."""
    entry = "session.force_spinning_stop"

    def stops(graph: object) -> str:
        return graph.graph.session.get_session_options().get_session_config_entry(entry)  # type: ignore[attr-defined]

    for name in ("unet_encoder", "unet_decoder", "unet_deep", "unet_shallow", "text_encoder", "vae_decoder"):
        assert stops(pipe1.open_graph(name)) == "1", name
    with pytest.raises(RuntimeError, match="does not have configuration"):  # unset: ORT's default
        stops(pipe1.open_graph("unet"))
    from effdiff.runtime.backends.ort import OrtBackend

    spec = pipe1.specs["unet_decoder"]
    graph = OrtBackend(session_options={f"config:{entry}": "0"}).open(
        pipe1.artifacts / "unet_decoder.onnx", spec
    )
    assert graph.session.get_session_options().get_session_config_entry(entry) == "0"


def test_tiled_vae_close_to_whole(pipe1: Pipeline) -> None:
    lat = unit_latents(1, 16)
    whole = pipe1("a tree", steps=2, latents=lat, height=128, width=128)
    tiled = pipe1("a tree", steps=2, latents=lat, height=128, width=128, vae_tile=8)
    assert tiled.calls["vae_decoder"] == 9  # 3 x 3 overlapping tiles
    value = psnr(np.asarray(whole.images[0]), np.asarray(tiled.images[0]))
    assert value > 25.0, f"tiled VAE PSNR {value:.1f} dB"


def test_long_prompt_truncated_with_warning(pipe1: Pipeline) -> None:
    long_prompt = " ".join(["red"] * 100)
    with pytest.warns(UserWarning, match="truncated to 77"):
        ids = pipe1.tokenizer([long_prompt])
    assert ids.shape == (1, 77) and ids[0, -1] == pipe1.manifest.tokenizer.eos_id


def test_tokenizer_matches_transformers(sd1_folder: Path, pipe1: Pipeline) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.CLIPTokenizer.from_pretrained(sd1_folder / "tokenizer")
    prompts = ["A small RED circle, top-left!", "", "ünïcode & emoji 🐈 text", " ".join(["blue"] * 90)]
    want = ref(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    with pytest.warns(UserWarning):
        got = pipe1.tokenizer(prompts)
    np.testing.assert_array_equal(got, np.array(want))


def test_key_schedules() -> None:
    assert KeySchedule.parse("fd-ddim50").key_steps(50) == (0, 1, 2, 3, 5, 10, 15, 25, 35)
    assert KeySchedule.parse("uniform:3").key_steps(10) == (0, 3, 6, 9)
    assert KeySchedule.parse("0,5,2").key_steps(10) == (0, 2, 5)
    assert KeySchedule.parse("none").key_steps(4) == (0, 1, 2, 3)
    assert KeySchedule.uniform(3).groups(10, 2) == [(0, 1), (2,), (3, 4), (5,), (6, 7), (8,), (9,)]
    assert KeySchedule.uniform(2).allowed_speedup(10, encoder_s=1.0, decoder_s=2.0) == pytest.approx(30 / 25)
    for bad, msg in [
        ("1,2", "start at 0"),
        ("0,99", "out of range"),
        ("uniform:0", ">= 1"),
        ("x", "bad key-step"),
    ]:
        with pytest.raises(EffdiffError, match=msg):
            KeySchedule.parse(bad).key_steps(50)


def test_generate_cli(sd1_artifacts: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    proc = run(
        "effdiff",
        "generate",
        "--artifacts",
        str(sd1_artifacts),
        "--prompt",
        "a red circle",
        "--out",
        str(out),
        "--steps",
        "10",
        "--propagation",
        "uniform:2",
        "--num-images",
        "2",
        "--lean",
    )
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and "unet_decoder" in proc.stdout and "peak RSS" in proc.stdout
    from PIL import Image

    assert Image.open(out).size == (128, 64)


def test_generate_bad_inputs(sd1_artifacts: Path, tmp_path: Path) -> None:
    base = ["effdiff", "generate", "--prompt", "p", "--quiet"]
    a = ["--artifacts", str(sd1_artifacts)]
    o = ["--out", str(tmp_path / "o.png")]
    cases = [
        (["--artifacts", str(tmp_path / "none"), *o], "does not exist"),
        ([*a, *o, "--steps", "0"], "steps must be >= 1"),
        ([*a, *o, "--sampler", "plms"], "unknown sampler"),
        ([*a, *o, "--propagation", "1,2"], "start at 0"),
        ([*a, *o, "--propagation", "0,70"], "out of range"),
        ([*a, *o, "--height", "100"], "multiples of 32"),
        ([*a, "--out", str(tmp_path / "missing" / "o.png")], "cannot write"),
    ]
    for args, needle in cases:
        assert_one_line_error(run(*base, *args), needle)
    old = tmp_path / "old"
    shutil.copytree(sd1_artifacts, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 0}))
    assert_one_line_error(run(*base, "--artifacts", str(old), *o), "schema version 0")
    (old / "manifest.json").write_text(json.dumps(manifest))
    (old / "unet.onnx").unlink()
    assert_one_line_error(run(*base, "--artifacts", str(old), *o), "unet.onnx is missing")
    shutil.copy(sd1_artifacts / "unet.onnx", old / "unet.onnx")
    (old / "scheduler_config.json").write_text('{"beta_schedule": ')
    assert_one_line_error(run(*base, "--artifacts", str(old), *o), "scheduler_config.json has 18 bytes")
