"""CLIPScore, FID and IS from locally stored models only (nothing is downloaded).

These need torch and transformers (the `export` extra); FID/IS also need torchmetrics (`bench`),
torch-fidelity and Inception weights on disk. Each says what is missing in one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from effdiff._deps import require
from effdiff.errors import EffdiffError


def _images_to_uint8_tensor(images: list[Image.Image]):  # -> torch.Tensor (torch is imported lazily)
    torch = require("torch")
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images]).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(arr))


def clip_score(images: list[Image.Image], prompts: list[str], clip_dir: Path) -> float:
    """CLIPScore (100 x cosine of image and prompt embeddings, floored at 0, averaged) with a CLIP model
    folder saved by transformers' save_pretrained (model + processor)."""
    clip_dir = Path(clip_dir)
    if not (clip_dir / "config.json").exists():
        raise EffdiffError(
            "CLIPScore needs a local CLIP model folder (CLIPModel + CLIPProcessor saved with "
            f"save_pretrained); none at {clip_dir}"
        )
    torch = require("torch")
    transformers = require("transformers")
    # Computed here rather than by torchmetrics' CLIPScore, which fails on transformers 5
    # ('BaseModelOutputWithPooling' object has no attribute 'norm').
    model = transformers.CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    processor = transformers.CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    inputs = processor(
        text=list(prompts),
        images=[im.convert("RGB") for im in images],
        return_tensors="pt",
        padding=True,
        truncation=True,
    )
    with torch.inference_mode():
        out = model(**inputs)
    img = torch.nn.functional.normalize(out.image_embeds, dim=-1)
    txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)
    return float((100 * (img * txt).sum(-1).clamp(min=0)).mean())


def fid_and_is(
    generated: list[Image.Image], real: list[Image.Image], inception_weights: Path
) -> dict[str, float]:
    """FID (generated vs real) and Inception Score of the generated images, with local Inception weights
    (torch-fidelity's pt_inception-2015-12-05 file)."""
    weights = Path(inception_weights)
    if not weights.exists():
        raise EffdiffError(
            f"FID/IS need Inception weights stored locally (pt_inception-2015-12-05-*.pth); none at {weights}"
        )
    require("torchmetrics")
    try:
        require("torch_fidelity")
    except ImportError as exc:
        raise EffdiffError("FID/IS need torch-fidelity: pip install torch-fidelity") from exc
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore

    fid = FrechetInceptionDistance(feature_extractor_weights_path=str(weights))
    fid.update(_images_to_uint8_tensor(real), real=True)
    fid.update(_images_to_uint8_tensor(generated), real=False)
    inception = InceptionScore(feature_extractor_weights_path=str(weights))
    inception.update(_images_to_uint8_tensor(generated))
    is_mean, _ = inception.compute()
    return {"fid": float(fid.compute()), "inception_score": float(is_mean)}
