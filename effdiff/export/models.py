"""Model sources: a local diffusers pipeline folder, or a built-in tiny config saved as one.

Built-in models are written to a diffusers folder first, so one code path loads both.
Components are loaded one at a time so an SD1.5-size model fits a 24 GB machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from effdiff._deps import require
from effdiff.artifacts import read_json
from effdiff.errors import EffdiffError
from effdiff.export.vocab import write_vocab_files
from effdiff.reference import MODEL_DIR as REFERENCE_MODEL
from effdiff.reference import MODEL_NAME as REFERENCE_NAME

# tiny-*: a few MB, for tests and demos. sd15-arch: SD1.5's published architecture with random
# weights (860 M-parameter UNet), for speed and memory work only.
BUILTIN_MODELS = ("tiny-sd1", "tiny-sd2", "sd15-arch")
REQUIRED_COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
_SCHEDULER_FILES = ("scheduler_config.json",)


@dataclass(frozen=True)
class ModelSource:
    """A diffusers pipeline folder and what effdiff needs to know about it."""

    path: Path
    name: str  # what the user asked for: a builtin name or the folder path
    family: str  # "sd1" or "sd2"
    prediction_type: str
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    text_config: dict[str, Any]
    scheduler_config: dict[str, Any]

    def content_hash(self) -> str:
        return folder_hash(self.path)


def folder_hash(path: Path) -> str:
    """sha256 over relative paths and contents of every file, in sorted order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- built-in tiny models


def text_config(
    vocab_size: int,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    act: str,
    bos: int,
    eos: int,
    pad: int,
) -> dict[str, Any]:
    """A CLIPTextConfig's arguments: 77 positions, as every SD text encoder."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=hidden,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )


def vae_config(
    channels: tuple[int, ...],
    layers_per_block: int,
    norm_groups: int,
    sample_size: int,
    scaling_factor: float = 0.18215,
) -> dict[str, Any]:
    """An AutoencoderKL's arguments: RGB, 4 latent channels, 2^(levels-1) downsampling."""
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_groups,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def sd_scheduler_config(prediction_type: str = "epsilon") -> dict[str, Any]:
    """The DDIM config Stable Diffusion ships: scaled-linear betas 0.00085..0.012, steps offset 1."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _builtin_configs(name: str, vocab_size: int, bos: int, eos: int, pad: int) -> dict[str, dict[str, Any]]:
    """UNet/VAE/text/scheduler configs: tiny ones with SD1.x or SD2.x structure, or SD1.5's own."""
    scheduler = sd_scheduler_config("v_prediction" if name == "tiny-sd2" else "epsilon")
    if name == "sd15-arch":
        unet = dict(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        vae = vae_config((128, 256, 512, 512), 2, 32, 512)
        # CLIP ViT-L/14's vocabulary size; our small tokenizer uses the first ids only
        text = text_config(49408, 768, 12, 12, 3072, "quick_gelu", bos, eos, pad)
        return {"unet": unet, "vae": vae, "text": text, "scheduler": scheduler}
    sd2 = name == "tiny-sd2"
    hidden = 64 if sd2 else 32
    unet = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden,
        norm_num_groups=8,
        # SD2: per-block head dims, linear projections, upcast attention.
        attention_head_dim=(2, 4, 4) if sd2 else 4,
        use_linear_projection=sd2,
        upcast_attention=sd2,
    )
    vae = vae_config((8, 16, 16, 16), 1, 8, 64)
    text = text_config(vocab_size, hidden, 2, 4, hidden * 2, "gelu" if sd2 else "quick_gelu", bos, eos, pad)
    return {"unet": unet, "vae": vae, "text": text, "scheduler": scheduler}


def quiet_libraries() -> None:
    """Keep third-party progress bars and notices off the user's terminal; ours say what happens."""
    for name in ("diffusers", "transformers", "torch.onnx", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    require("transformers").utils.logging.disable_progress_bar()
    require("diffusers").utils.logging.disable_progress_bar()


def save_builtin(name: str, folder: Path, seed: int = 0) -> Path:
    """Build a built-in model with seeded random weights and save it as a diffusers pipeline folder."""
    if name not in BUILTIN_MODELS:
        raise EffdiffError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}")
    torch = require("torch")
    diffusers = require("diffusers")
    transformers = require("transformers")
    quiet_libraries()  # saving writes shards behind a progress bar

    # SD2 pads with "!" (id of the byte symbol), SD1 with end-of-text, as the real tokenizers do.
    pad_token = "!" if name == "tiny-sd2" else "<|endoftext|>"
    with tempfile.TemporaryDirectory(prefix="effdiff-vocab-") as vocab_dir:
        write_vocab_files(Path(vocab_dir))
        tokenizer = transformers.CLIPTokenizer.from_pretrained(
            vocab_dir, pad_token=pad_token, model_max_length=77
        )
    cfg = _builtin_configs(
        name, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**cfg["unet"])
    vae = diffusers.AutoencoderKL(**cfg["vae"])
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg["text"]))
    scheduler = diffusers.DDIMScheduler(**cfg["scheduler"])
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def builtin_folder(name: str) -> Path:
    """Where a built-in model is saved: a per-user cache, rebuilt when absent (deterministic seed)."""
    root = Path(os.environ.get("EFFDIFF_CACHE", Path.home() / ".cache" / "effdiff")) / "models"
    folder = root / name
    if not (folder / "model_index.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        save_builtin(name, tmp)
        # another process may have won the race; its folder is equivalent
        with contextlib.suppress(OSError):
            tmp.rename(folder)
    return folder


# ---------------------------------------------------------------- loading and checks


def check_unet_supported(config: dict[str, Any]) -> None:
    """Refuse UNets whose forward needs inputs the encoder/decoder split does not carry."""
    cls = config.get("_class_name", "UNet2DConditionModel")
    if cls != "UNet2DConditionModel":
        raise EffdiffError(f"unet is a {cls}; only UNet2DConditionModel (SD 1.x / 2.x) can be split")
    unsupported = {
        "addition_embed_type": "SDXL-style added conditions (text_embeds/time_ids)",
        "class_embed_type": "class embeddings",
        "encoder_hid_dim_type": "an encoder_hid_proj",
        "time_cond_proj_dim": "a timestep condition (LCM-style)",
        "num_class_embeds": "class embeddings",
    }
    for key, what in unsupported.items():
        if config.get(key) is not None:
            raise EffdiffError(
                f"unet uses {what} ({key}={config[key]!r}); this split does not support it yet"
            )
    if config.get("attention_type", "default") != "default":
        raise EffdiffError(f"unet attention_type={config['attention_type']!r} (GLIGEN) is not supported")
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is None:
        raise EffdiffError("unet has no mid block; the encoder/decoder split needs one")


def model_family(unet_config: dict[str, Any]) -> str:
    return "sd2" if unet_config.get("use_linear_projection") else "sd1"


def resolve_model(model: str) -> ModelSource:
    """Turn `--model` (a folder or a built-in name) into a checked ModelSource. Raises EffdiffError."""
    if model == REFERENCE_NAME:
        if not (REFERENCE_MODEL / "model_index.json").exists():
            raise EffdiffError(
                f"the reference model is not installed at {REFERENCE_MODEL}; "
                "train it with scripts/train_reference.py"
            )
        path = REFERENCE_MODEL
    else:
        path = builtin_folder(model) if model in BUILTIN_MODELS else Path(model).expanduser()
    if not path.exists():
        hint = f" (built-in models: {', '.join(BUILTIN_MODELS)})"
        raise EffdiffError(f"model path {str(path)!r} does not exist{hint}")
    if not path.is_dir():
        raise EffdiffError(f"model path {str(path)!r} is a file; expected a diffusers pipeline folder")
    if not (path / "model_index.json").exists():
        if (path / "config.json").exists() and (path / "diffusion_pytorch_model.safetensors").exists():
            raise EffdiffError(f"{path} holds a single model, not a pipeline; pass the folder above it")
        raise EffdiffError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    index = read_json(path / "model_index.json")
    missing = [c for c in REQUIRED_COMPONENTS if c not in index or not (path / c).is_dir()]
    if missing:
        raise EffdiffError(f"{path} lacks pipeline component(s): {', '.join(missing)}")
    unet_cfg = read_json(path / "unet" / "config.json")
    check_unet_supported(unet_cfg)
    if "controlnet" in index:
        raise EffdiffError(f"{path} is a ControlNet pipeline; ControlNet inputs are not supported yet")
    sched_cfg = read_json(path / "scheduler" / "scheduler_config.json")
    tok_dir = path / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists() and not (tok_dir / "vocab.json").exists():
        raise EffdiffError(f"{tok_dir} has neither tokenizer.json nor vocab.json + merges.txt")
    return ModelSource(
        path=path,
        name=model,
        family=model_family(unet_cfg),
        prediction_type=sched_cfg.get("prediction_type", "epsilon"),
        unet_config=unet_cfg,
        vae_config=read_json(path / "vae" / "config.json"),
        text_config=read_json(path / "text_encoder" / "config.json"),
        scheduler_config=sched_cfg,
    )


def load_component(source: ModelSource, component: str) -> Any:
    """Load one component in fp32 eval mode, offline (the same loader the `torch` backend uses)."""
    from effdiff.runtime.backends.torch_modules import load_pretrained

    return load_pretrained(source.path, component)
