"""Model sources: built-in configs saved as diffusers folders load back through the same path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from effdiff.errors import EffdiffError
from effdiff.export.models import folder_hash, resolve_model, save_builtin


def test_builtin_models_have_sd1_and_sd2_structure(cache_dir: Path) -> None:
    sd1, sd2 = resolve_model("tiny-sd1"), resolve_model("tiny-sd2")
    assert sd1.family == "sd1" and sd1.prediction_type == "epsilon"
    assert sd2.family == "sd2" and sd2.prediction_type == "v_prediction"
    assert sd2.unet_config["use_linear_projection"] is True
    assert isinstance(sd2.unet_config["attention_head_dim"], list)
    assert len(sd1.unet_config["block_out_channels"]) >= 3


def test_saved_folder_round_trip(sd1_folder: Path, cache_dir: Path, tmp_path: Path) -> None:
    """A saved built-in loads with diffusers' own pipeline offline, and saving again is byte-identical."""
    torch = pytest.importorskip("torch")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None, local_files_only=True)
    with torch.inference_mode():
        image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
    again = save_builtin("tiny-sd1", tmp_path / "again")
    assert folder_hash(again / "unet") == folder_hash(sd1_folder / "unet"), (
        "built-in weights not deterministic"
    )
    source = resolve_model(str(sd1_folder))
    assert source.family == "sd1" and source.path == sd1_folder


def _fake_pipeline(root: Path, unet_config: dict) -> Path:
    root.mkdir(parents=True)
    index = {c: ["x", "y"] for c in ("text_encoder", "tokenizer", "unet", "vae", "scheduler")}
    (root / "model_index.json").write_text(json.dumps(index))
    for c in index:
        (root / c).mkdir()
    (root / "unet" / "config.json").write_text(json.dumps(unet_config))
    return root


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time"}, "SDXL"),
        ({"_class_name": "UNet2DConditionModel", "class_embed_type": "timestep"}, "class embeddings"),
        ({"_class_name": "ControlNetModel"}, "ControlNetModel"),
        ({"_class_name": "UNet2DConditionModel", "time_cond_proj_dim": 256}, "timestep condition"),
    ],
)
def test_unsupported_unets_are_refused(tmp_path: Path, config: dict, message: str) -> None:
    folder = _fake_pipeline(tmp_path / "m", config)
    with pytest.raises(EffdiffError, match=message):
        resolve_model(str(folder))


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(EffdiffError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(EffdiffError, match="is a file"):
        resolve_model(str(tmp_path / "file.bin"))
    with pytest.raises(EffdiffError, match=r"no model_index\.json"):
        resolve_model(str(tmp_path))
    broken = _fake_pipeline(tmp_path / "broken", {"_class_name": "UNet2DConditionModel"})
    (broken / "vae").rmdir()
    with pytest.raises(EffdiffError, match="lacks pipeline component"):
        resolve_model(str(broken))
