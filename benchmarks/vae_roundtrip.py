"""What the reference VAE keeps: the attribute classifier's accuracy on real renders after an encode and
decode (the ceiling of what the UNet can be scored at), the colour confusions, and how far apart the
encoder puts each pair of colours (mean latent distance of the same shapes in different colours), and
the closest pair on each background.

  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vae_roundtrip.py                 # the shipped VAE, ~1 minute
  ... --checkpoint runs/reference/vae.pt     # a checkpoint of scripts/train_reference.py instead
"""

from __future__ import annotations

import argparse
from itertools import product
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from effdiff.reference import MODEL_DIR as REFERENCE_MODEL
from effdiff.reference.dataset import BACKGROUNDS, COLOURS, KINDS, Scene, all_scenes, render
from effdiff.reference.judge import Adherence, AttributeClassifier, misread


def load_vae(checkpoint: Path | None) -> torch.nn.Module:
    import diffusers

    folder = REFERENCE_MODEL / "vae"
    if checkpoint is None:
        return diffusers.AutoencoderKL.from_pretrained(folder).eval()
    vae = diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(folder)).eval()
    vae.load_state_dict(torch.load(checkpoint, weights_only=False, map_location="cpu")["model"])
    return vae


@torch.no_grad()
def encode(vae: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images.transpose(0, 3, 1, 2) / 127.5 - 1.0).float()
    return torch.cat([vae.encode(c).latent_dist.mean for c in x.split(100)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", type=Path, help="training checkpoint (.pt) with the VAE under 'model'"
    )
    args = parser.parse_args()
    if args.checkpoint is not None and not args.checkpoint.is_file():
        parser.error(f"checkpoint {args.checkpoint} does not exist")
    vae = load_vae(args.checkpoint)
    scenes = all_scenes(held_out=False)
    real = np.stack(
        [np.asarray(render(s, np.random.default_rng(i)), np.float32) for i, s in enumerate(scenes)]
    )
    with torch.no_grad():
        z = encode(vae, real)
        rec = torch.cat([vae.decode(c).sample for c in z.split(100)]).clamp(-1, 1)
    rec_u8 = ((rec.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    preds = AttributeClassifier().run([Image.fromarray(r) for r in rec_u8])[0]
    adh = Adherence.of(preds, scenes)
    print(f"round trip of {adh.count} training renders:")
    print("| " + " | ".join(adh.per_attribute) + " |")
    print("|" + "---|" * len(adh.per_attribute))
    print("| " + " | ".join(f"{v:.3f}" for v in adh.per_attribute.values()) + " |")
    misses = misread(preds, scenes, "colour")
    colours = list(COLOURS)
    print(
        "colour misses: "
        + (", ".join(f"{a} read as {b}: {n}" for (a, b), n in misses.most_common()) or "none")
    )

    # the same large centred shape in each colour, on each background: how far apart are the latents?
    per_bg = {bg: np.zeros((len(colours), len(colours))) for bg in BACKGROUNDS}
    for kind, bg in product(KINDS, BACKGROUNDS):
        imgs = np.stack(
            [np.asarray(render(Scene(kind, c, "large", "center", bg)), np.float32) for c in colours]
        )
        zc = encode(vae, imgs).flatten(1)
        per_bg[bg] += torch.cdist(zc, zc).numpy() / len(KINDS)
    dist = sum(per_bg.values()) / len(per_bg)
    norm = float(z.flatten(1).norm(dim=1).mean())
    print(f"\nmean latent distance between colours (mean latent norm {norm:.1f}):")
    print("| | " + " | ".join(colours) + " |")
    print("|---|" + "---|" * len(colours))
    for name, row in zip(colours, dist, strict=True):
        print(f"| {name} | " + " | ".join(f"{d:.1f}" for d in row) + " |")
    # the mean hides a background where two colours nearly share a latent: the UNet's small errors
    # then flip one into the other, though the round trip above reads them right
    print("\nclosest two colours on each background:")
    print("| background | colours | latent distance | share of the mean latent norm |")
    print("|---|---|---|---|")
    for bg, d in per_bg.items():
        masked = np.where(np.eye(len(colours), dtype=bool), np.inf, d)
        i, j = np.unravel_index(np.argmin(masked), masked.shape)
        print(f"| {bg} | {colours[i]} / {colours[j]} | {d[i, j]:.1f} | {d[i, j] / norm:.3f} |")


if __name__ == "__main__":
    main()
