"""The shipped reference model and attribute classifier, the procedural dataset, and `effdiff demo`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from effdiff.export.models import resolve_model
from effdiff.reference import CLASSIFIER
from effdiff.reference import MODEL_DIR as REFERENCE_MODEL
from effdiff.reference.dataset import HELD_OUT, Scene, all_scenes, render, sample_batch
from effdiff.reference.judge import AttributeClassifier, paired_difference_interval
from effdiff.reference.scenes import REFERENCE_GUIDANCE

from .test_cli import run


def test_dataset_is_deterministic_and_holds_out_pairs() -> None:
    a, scenes_a = sample_batch(8, np.random.default_rng(3))
    b, scenes_b = sample_batch(8, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    assert scenes_a == scenes_b and a.shape == (8, 3, 64, 64) and a.min() >= -1 and a.max() <= 1
    train, held = all_scenes(held_out=False), all_scenes(held_out=True)
    assert not any((s.kind, s.colour) in HELD_OUT for s in train)
    assert {(s.kind, s.colour) for s in held} == set(HELD_OUT)
    scene = Scene("triangle", "red", "small", "top left", "gray")
    assert scene.prompt == "a small red triangle at the top left on a gray background"


def _paired(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([1] * both + [1] * only_a + [0] * only_b + [0] * neither, bool)
    b = np.array([1] * both + [0] * only_a + [1] * only_b + [0] * neither, bool)
    return a, b


def test_paired_difference_interval() -> None:
    """Newcombe's paired interval: the published example (airway hyper-responsiveness before and after
    transplantation, Bentur et al. 2009, in Fagerland, Lydersen and Laake 2014: -0.507 to -0.026), and
    far narrower than two separate Wilson intervals when two configurations agree on most images."""
    diff, lo, hi = paired_difference_interval(*_paired(1, 1, 7, 12))
    assert diff == pytest.approx(-6 / 21) and (lo, hi) == pytest.approx((-0.507, -0.026), abs=1e-3)
    # 192 images, 171 right under both, one more right under each side: about +-0.02, not +-0.09
    diff, lo, hi = paired_difference_interval(*_paired(170, 2, 1, 19))
    assert lo < diff < hi and -0.03 < lo < 0 < hi < 0.035
    same = np.ones(192, bool)
    assert paired_difference_interval(same, same)[0] == 0.0
    with pytest.raises(Exception, match="paired readings"):
        paired_difference_interval(same, same[:10])


def test_classifier_reads_real_renders() -> None:
    clf = AttributeClassifier(CLASSIFIER)
    scenes = all_scenes()[::7]
    images = [render(s, np.random.default_rng(i)) for i, s in enumerate(scenes)]
    adh = clf.adherence(images, scenes)
    assert min(adh.per_attribute.values()) >= 0.97, adh.per_attribute


def test_reference_model_ships_as_a_diffusers_pipeline() -> None:
    source = resolve_model("reference")
    assert source.path == REFERENCE_MODEL and source.family == "sd1"
    assert len(source.unet_config["block_out_channels"]) >= 3
    assert "CrossAttnDownBlock2D" in source.unet_config["down_block_types"]
    size = sum(f.stat().st_size for f in REFERENCE_MODEL.rglob("*") if f.is_file())
    size += CLASSIFIER.stat().st_size
    assert size <= 40 * 2**20, f"reference weights are {size / 2**20:.1f} MiB"
    index = json.loads((REFERENCE_MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"


def test_demo_writes_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = run("effdiff", "demo", "--out", str(out), "--steps", "10", "--no-peers")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report" / "report.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names[:2] == ["full", "fd"]
    for row in report["rows"]:
        assert 0.0 <= row["quality"]["adherence"] <= 1.0
    for name in (
        "report.md",
        "report.csv",
        "latency.png",
        "speed_quality.png",
        "memory.png",
        "grid_full.png",
    ):
        assert (out / "report" / name).stat().st_size > 0
    assert (out / "artifacts" / "manifest.json").exists()


@pytest.mark.slow
def test_reference_model_adheres_to_prompts(reference_artifacts: Path) -> None:
    """The figure README quotes comes from benchmarks/reference_quality.py; this is a smaller check."""
    from effdiff.runtime.pipeline import Pipeline

    pipe = Pipeline.load(reference_artifacts)
    scenes = all_scenes(held_out=False)[::25]
    images = pipe([s.prompt for s in scenes], steps=50, guidance_scale=REFERENCE_GUIDANCE, seed=0).images
    adh = AttributeClassifier().adherence(images, scenes)
    # 24 prompts, so bounds below the 192-prompt figures in README (measured on these 24 with v1.3:
    # 1.00 on every attribute, position included, but colour, 23 of 24)
    per = adh.per_attribute
    assert per["kind"] >= 0.9 and per["size"] >= 0.9 and per["background"] >= 0.9, per
    assert per["colour"] >= 0.8, per
    assert per["position"] >= 0.9, per  # v1.0: 0.23 on 192 prompts (it followed the seed)


def test_reference_architectures() -> None:
    """v1 is the shipped UNet's layout; v2 reaches 2x2 features at the model's 16x16 latents (every
    cell a corner, so the bottleneck can tell quadrants apart) and keeps the whole model under 40 MB."""
    diffusers = pytest.importorskip("diffusers")
    from effdiff.errors import EffdiffError
    from effdiff.reference.architectures import unet_kwargs

    shipped = json.loads((REFERENCE_MODEL / "unet" / "config.json").read_text())
    v1 = unet_kwargs("v1", shipped["sample_size"])
    assert all(list(v) == shipped[k] if isinstance(v, tuple) else v == shipped[k] for k, v in v1.items())
    v2 = unet_kwargs("v2", shipped["sample_size"])
    assert shipped["sample_size"] // 2 ** (len(v2["block_out_channels"]) - 1) == 2
    unet = diffusers.UNet2DConditionModel(**v2)
    others = sum(
        f.stat().st_size for f in REFERENCE_MODEL.rglob("*") if f.is_file() and "unet" not in f.parts
    )
    assert sum(p.numel() for p in unet.parameters()) * 4 + others <= 40e6
    with pytest.raises(EffdiffError, match="unknown reference architecture 'v9'"):
        unet_kwargs("v9", 16)


TRAIN_SCRIPT = Path(__file__).parents[1] / "scripts" / "train_reference.py"


def _training_script() -> types.ModuleType:
    """scripts/train_reference.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_reference", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _training_refusal(tmp_path: Path, flags: list[str]) -> str:
    """Run the training script with `flags`; it must stop with one line before writing anything."""
    proc = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), "--work", str(tmp_path / "work"), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    return lines[0]


def test_training_loss_reaches_the_layout_steps() -> None:
    """Plain min-SNR gives the x0 error of the noisiest steps almost no weight, which is why the shipped
    model never learned position; `--snr-floor 1` weights it at least 1 and `--layout-share` draws
    more of those steps."""
    torch = pytest.importorskip("torch")
    train = _training_script()

    betas = torch.linspace(
        train.REFERENCE_SCHEDULER["beta_start"], train.REFERENCE_SCHEDULER["beta_end"], 1000
    )
    alphas = torch.cumprod(1 - betas, 0)
    snr = alphas / (1 - alphas)
    x0_weight = {floor: train.v_loss_weight(snr, floor) * (snr + 1) for floor in (0.0, 1.0)}
    layout = slice(train.LAYOUT_STEPS, 1000)
    assert float(x0_weight[0.0][layout].max()) < 0.01  # min-SNR: the layout steps barely count
    torch.testing.assert_close(x0_weight[1.0][layout], torch.ones(1000 - train.LAYOUT_STEPS))
    assert float(x0_weight[1.0][0]) == pytest.approx(train.MIN_SNR_GAMMA)  # the cap still holds

    gen = torch.Generator().manual_seed(0)
    for share, expected in ((0.0, 0.3), (0.5, 0.65)):
        t = train.draw_timesteps(20000, share, gen)
        assert int(t.min()) >= 0 and int(t.max()) <= 999
        assert float((t >= train.LAYOUT_STEPS).float().mean()) == pytest.approx(expected, abs=0.02)
    # share 0 draws nothing more: the defaults keep the shipped run's random stream
    gens = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(
        train.draw_timesteps(8, 0.0, gens[0]), torch.randint(0, 1000, (8,), generator=gens[1])
    )
    torch.testing.assert_close(torch.rand(4, generator=gens[0]), torch.rand(4, generator=gens[1]))


def test_vae_latent_noise_is_relative_to_the_latents_spread() -> None:
    """`--vae-latent-noise` perturbs what the decoder sees by a share of the latents' own spread, so an
    encoder cannot shrink the noise by scaling its latents up; 0 leaves them untouched."""
    torch = pytest.importorskip("torch")
    train = _training_script()

    z = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert train.noisy_latents(z, 0.0) is z
    for scale in (1.0, 30.0):
        torch.manual_seed(1)
        added = train.noisy_latents(z * scale, 0.1) - z * scale
        assert float(added.std() / (z * scale).std()) == pytest.approx(0.1, rel=0.05)


def test_vae_checkpoint_records_its_latent_noise(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A resumed VAE phase says so when its `--vae-latent-noise` differs from the checkpoint's."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    train = _training_script()

    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=2)
    train.train_vae(vae, tmp_path, 1, 2, "cpu", 0.03)
    assert torch.load(tmp_path / "vae.pt", weights_only=False)["latent_noise"] == 0.03
    capsys.readouterr()
    train.train_vae(vae, tmp_path, 2, 2, "cpu", 0.03)
    assert "warning" not in capsys.readouterr().out
    train.train_vae(vae, tmp_path, 3, 2, "cpu", 0.0)
    assert "vae.pt was trained with latent_noise=0.03; resuming with 0.0" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--vae-init", "no-such-folder"], "--vae-init no-such-folder: not a diffusers pipeline folder"),
        (["--vae-init", str(REFERENCE_MODEL), "--vae-from", str(REFERENCE_MODEL)], "pass one"),
        (["--vae-latent-noise", "-0.1"], "--vae-latent-noise -0.1: a share of the latents' spread, >= 0"),
        (
            ["--init-from", str(REFERENCE_MODEL), "--vae-latent-noise", "0.03"],
            "which --vae-from/--init-from skip",
        ),
    ],
)
def test_training_refuses_bad_folders_in_one_line(tmp_path: Path, flags: list[str], needle: str) -> None:
    assert needle in _training_refusal(tmp_path, flags)
    assert not (tmp_path / "work").exists()  # refused before anything was written


def test_training_refuses_a_vae_of_another_shape_in_one_line(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=2).save_pretrained(
        tmp_path / "other" / "vae"
    )
    line = _training_refusal(tmp_path, ["--vae-init", str(tmp_path / "other")])
    assert f"--vae-init {tmp_path / 'other'}: its vae is not this model's VAE" in line, line


def test_misread_lists_the_confusions() -> None:
    from effdiff.reference.dataset import ATTRIBUTES
    from effdiff.reference.judge import misread

    scenes = all_scenes(held_out=False)[:4]
    preds = {name: np.array([s.labels()[name] for s in scenes]) for name in ATTRIBUTES}
    assert not misread(preds, scenes, "colour")
    other = next(c for c in ATTRIBUTES["colour"] if c != scenes[1].colour)
    preds["colour"][1] = ATTRIBUTES["colour"].index(other)
    assert misread(preds, scenes, "colour") == {(scenes[1].colour, other): 1}
    assert misread(preds, scenes, "colour", by="background") == {
        (scenes[1].colour, other, scenes[1].background): 1
    }
